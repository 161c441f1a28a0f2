"""`accel calibrate` on tiny random-weight pipelines saved to a folder: searches, files, provenance, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

import accel
from accel.calibration import Calibration, CalibrationError, find_markers, replace_markers
from accel.cli import main
from accel.embedded import build_flux_digits
from accel.embedded.pipeline import FluxDigitsPipeline
from accel.lab import calibrate as lab_calibrate
from accel.recipe import load_recipe
from accel.stack import Stack
from tiny_text_pipelines import TINY_CALL, save_tiny_pipeline

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))


def _digits(folder, seed=3):
    build_flux_digits(seed=seed, **TINY).save_pretrained(folder)
    return folder


def _write(path, recipe: dict):
    path.write_text(f"# accel calibrate {path.name}\n" + yaml.safe_dump(recipe))
    return path


def _cache_recipe(tmp_path, model, name="tiny-cache", extra=None):
    return _write(tmp_path / f"{name}.yaml", {
        "name": name, "model": {"name": str(model)},
        "sampler": {"solver": "euler", "steps": 8},
        "cache": {"preset": "taylorseer", "params": {"order": 2, "warmup": 0.0, "steps": "calibrated 2",
                                                     "gains": "calibrated"}},
        "inputs": {"classes": [1, 7], "samples_per_class": 1},
        "eval": {"reference": {"steps": 8}, "metrics": ["psnr"], "timing_batch": 1, "timing_repeats": 1},
        "calibrate": {"samples": 2}, **(extra or {})})


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One `accel calibrate` of steps and gains on a tiny digits pipeline: (tmp folder, recipe, file)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    recipe = _cache_recipe(tmp, _digits(tmp / "digits"))
    assert main(["calibrate", str(recipe), "--out", str(tmp / "out")]) == 0
    return tmp, recipe, tmp / "out" / "calibrations" / "tiny-cache.json"


def test_calibrate_places_the_steps_then_the_gains_and_run_uses_them(calibrated, monkeypatch, capsys):
    tmp, recipe, path = calibrated
    stored = json.loads(path.read_text())
    assert stored["markers"] == {"cache.params.steps": "calibrated 2", "cache.params.gains": "calibrated"}
    fractions, gains = stored["values"]["cache.params.steps"], stored["values"]["cache.params.gains"]
    assert len(fractions) == 2 and fractions[0] == 0.0 and len(gains) == 1
    steps = stored["search"]["cache.params.steps"]
    assert steps["objective"] <= steps["initial_objective"] and steps["trials"] == len(steps["trial_log"])
    assert [round(f * 8) for f in fractions] == steps["steps"]
    gain_search = stored["search"]["cache.params.gains"]
    assert gain_search["initial_objective"] == pytest.approx(steps["objective"])  # gains 1 = the placement's run
    provenance = stored["provenance"]
    assert provenance["sampler"]["steps"] == 8 and provenance["calibration"] == {
        "seed": 0, "samples": 2, "prompts": provenance["calibration"]["prompts"]}
    journal = path.with_suffix(".trials.jsonl").read_text().splitlines()
    assert len(journal) == len({json.loads(line)["key"] for line in journal})  # each trial measured once
    # `accel run` on the same recipe naming the file runs the searched values
    monkeypatch.chdir(tmp)
    ran = _cache_recipe(tmp, tmp / "digits", "tiny-cache-run", {"calibration": str(path)})
    assert main(["run", str(ran)]) == 0
    summary = json.loads((tmp / "runs" / "tiny-cache-run" / "summary.json").read_text())
    params = summary["stack"]["stack"]["cache"]["params"]
    assert params["steps"] == fractions and params["gains"] == gains


def test_a_calibration_file_round_trips_and_replaces_only_the_markers(calibrated, tmp_path):
    _, recipe_path, path = calibrated
    calibration = Calibration.read(str(path))
    assert calibration.to_dict() == json.loads(path.read_text())
    calibration.write(tmp_path / "copy.json")
    assert Calibration.read(str(tmp_path / "copy.json")).to_dict() == calibration.to_dict()
    recipe = load_recipe(str(recipe_path), calibrated=False)
    assert find_markers(recipe) == calibration.markers
    replaced = replace_markers(recipe, calibration.values)
    assert find_markers(replaced) == {} and replaced.cache.params.order == 2
    assert list(replaced.cache.params.gains) == calibration.values["cache.params.gains"]


def test_other_weights_or_steps_are_refused_in_one_line_by_run_and_apply(calibrated, monkeypatch, capsys):
    tmp, _, path = calibrated
    monkeypatch.chdir(tmp)
    other = _digits(tmp / "other-digits", seed=4)
    recipe = _cache_recipe(tmp, other, "tiny-other", {"calibration": str(path)})
    assert main(["run", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "other model weights" in error and "model.identity" in error
    pipe = FluxDigitsPipeline.from_pretrained(str(other))
    with pytest.raises(CalibrationError, match="model.identity") as raised:
        accel.apply(pipe, str(recipe))
    assert "\n" not in str(raised.value)
    same = _cache_recipe(tmp, tmp / "digits", "tiny-steps", {"calibration": str(path)})
    capsys.readouterr()  # the loading bar of from_pretrained above
    assert main(["run", str(same), "sampler.steps=6"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "sampler.steps: file 8, now 6" in error
    pipe = FluxDigitsPipeline.from_pretrained(str(tmp / "digits"))  # the calibrated weights: accepted
    resolved = accel.apply(pipe, str(same))
    assert list(resolved.stack.cache.params["gains"]) == json.loads(path.read_text())["values"]["cache.params.gains"]
    accel.remove(pipe)


def test_markers_without_a_calibration_file_say_to_run_accel_calibrate(calibrated, capsys, monkeypatch):
    tmp, recipe, _ = calibrated
    monkeypatch.chdir(tmp)
    assert main(["run", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "accel calibrate" in error and "cache.params.steps" in error


def test_a_rerun_replays_the_journal_without_calling_the_model(calibrated, tmp_path, monkeypatch):
    _, recipe_path, path = calibrated
    out = tmp_path / "again"
    (out / "calibrations").mkdir(parents=True)
    shutil.copy(path.with_suffix(".trials.jsonl"), out / "calibrations" / "tiny-cache.trials.jsonl")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was called")

    monkeypatch.setattr(FluxDigitsPipeline, "__call__", refuse)
    written = lab_calibrate.calibrate_recipe(load_recipe(str(recipe_path), calibrated=False), out)
    again, first = json.loads(written.read_text()), json.loads(path.read_text())
    assert again["values"] == first["values"] and again["search"] == first["search"]


def test_teacache_coefficients_come_from_one_full_compute_run(calibrated, tmp_path):
    tmp = calibrated[0]
    recipe = _cache_recipe(tmp_path, tmp / "digits", "tiny-teacache", {
        "cache": {"preset": "teacache", "params": {"threshold": 0.1, "coefficients": "calibrated"}}})
    loaded = load_recipe(str(recipe), calibrated=False)
    written = lab_calibrate.calibrate_recipe(loaded, tmp_path)
    values = json.loads(written.read_text())["values"]["cache.params.coefficients"]
    assert len(values) == 5 and all(math.isfinite(v) for v in values)  # a degree-4 polynomial


def test_calibrate_searches_a_walk_and_its_compensation_on_a_text_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_calibrate, "WALK_SEARCH", {"sweeps": 1, "iterations": 2, "margin": 0.05})
    monkeypatch.setattr(lab_calibrate, "RATIO_SEARCH", {"sweeps": 1, "iterations": 1, "width": 1.0,
                                                        "penalty": 0.2})
    folder = save_tiny_pipeline("flux", tmp_path / "flux")
    call = dict(TINY_CALL["flux"])
    recipe = _write(tmp_path / "walk.yaml", {
        "name": "tiny-walk", "model": {"name": str(folder)},
        "sampler": {"solver": "euler", "steps": 3, "schedule": "optimized", "schedule_params": {"path": "calibrated"},
                    "solver_params": {"compensation": "calibrated"}},
        "guidance": {"scale": 1.0},
        "inputs": {"prompts": ["a red cube"], "resolution": [call.pop("height"), call.pop("width")],
                   "call_kwargs": call},
        "eval": {"reference": {"steps": 8}, "metrics": ["psnr"]},
        "calibrate": {"samples": 1, "prompts": ["two dogs on a table"]}})
    written = lab_calibrate.calibrate_recipe(load_recipe(str(recipe), calibrated=False), tmp_path)
    stored = json.loads(written.read_text())
    walk = stored["values"]["sampler.schedule_params.path"]
    assert walk["solver"] == "euler" and len(walk["sigmas"]) == 4 and walk["sigmas"][-1] == 0.0
    assert all(a > b for a, b in zip(walk["sigmas"], walk["sigmas"][1:]))
    assert len(stored["values"]["sampler.solver_params.compensation"]) == 3
    search = stored["search"]["sampler.schedule_params.path"]
    assert search["objective"] <= search["initial_objective"]
    loaded = load_recipe(str(recipe), [f"calibration={written}"])
    stack = Stack.from_recipe(loaded)
    assert stack.sampler.schedule == "optimized"
    assert stack.sampler.solver_params["compensation"] == stored["values"]["sampler.solver_params.compensation"]
    pipe = lab_calibrate.load_model(loaded.model).pipe
    accel.apply(pipe, loaded)
    images = pipe(prompt=["a red cube"], num_inference_steps=3, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(images).all()
    assert [round(s, 6) for s in pipe.scheduler.solver_sigmas.tolist()] == [round(s, 6) for s in walk["sigmas"]]
    accel.remove(pipe)


def test_two_launched_processes_write_the_single_process_calibration(calibrated, tmp_path):
    import os
    import subprocess
    import sys

    from accel.data_files import RECIPES_DIR

    tmp, recipe, _ = calibrated
    split = ["inputs.batch_size=1"]  # two batches of one calibration sample: one per process
    assert main(["calibrate", str(recipe), *split, "--out", str(tmp_path / "one")]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(RECIPES_DIR / "launch" / "accelerate-cpu-2proc.yaml"), "-m", "accel", "calibrate", str(recipe), *split,
         "--out", str(tmp_path / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "calibrations" / "tiny-cache.json").read_text())
                for name in ("one", "two"))
    assert one["values"] == two["values"] and one["search"] == two["search"]
