"""`accel bench caches` on the lab core, on a tiny random-weight digits pipeline: records, calibrations,
anchors, resuming, outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from accel.bench import caches
from accel.bench._cache_anchors import cache_dit_anchor, cache_dit_available, diffusers_anchor
from accel.embedded import build_flux_digits
from accel.embedded.pipeline import FluxDigitsPipeline
from accel.lab.job import Job

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))
PLAIN = ("taylorseer", {"steps": "calibrated 3", "warmup": 0.0})
GAINS = ("taylorseer", {"steps": "calibrated 3", "warmup": 0.0, "gains": "calibrated"})


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-digits") / "pipe"
    build_flux_digits(seed=3, **TINY).save_pretrained(folder)
    return folder


def _overrides(folder, *more):
    return [f"model.name={folder}", "inputs.classes=[1, 7]", "inputs.samples_per_class=1", "eval.reference.steps=12",
            "eval.timing_batch=2", "eval.timing_repeats=1", "eval.real_samples=64", "calibrate.samples=2", *more]


def _anchors(job):
    steps = int(job.recipe.sampler.steps)
    found = [diffusers_anchor("TaylorSeerCache", steps, {"cache_interval": 4, "use_lite_mode": True})]
    if cache_dit_available():
        found.append(cache_dit_anchor("SCM fast", steps, mask_policy="fast", static=True, calibrator="taylorseer"))
    return found


def _sweep(ours=(("fbcache", {"threshold": 0.2}), PLAIN, GAINS)):
    return caches.Sweep({"euler": (4,), "unipc_bh2": (4,)}, list(ours), _anchors)


@pytest.fixture(scope="module")
def bench(tiny_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    records = caches.run(True, out / "out.json", out / "bench", overrides=_overrides(tiny_digits), sweep=_sweep())
    return out / "bench", records


def test_every_configuration_is_one_record_beside_the_reference_and_both_baselines(bench):
    folder, records = bench
    reference, *rest = records
    assert reference["family"] == "reference" and reference["psnr"] == 100.0 and reference["flops_speedup"] == 1.0
    assert [r["kind"] for r in rest[:2]] == ["equal-flops-baseline"] * 2
    assert {r["method"] for r in rest[:2]} == {"euler", "unipc_bh2"}
    assert [r["family"] for r in rest[2:5]] == ["cache"] * 3 and rest[5]["family"] == "anchor"
    assert rest[5]["anchor"]["version"] and rest[5]["solver"] == "pipeline scheduler"
    for record in rest:
        assert record["fingerprint"] and 0 < record["flops_speedup"] and 0 < record["psnr"] < 100
    for name in ("caches.json", "caches.md", "caches.png"):
        assert (folder / name).stat().st_size > 100
    assert json.loads((folder.parent / "out.json").read_text())[0]["family"] == "reference"
    assert "Best FLOPs speedup reaching each PSNR level" in (folder / "caches.md").read_text()


def test_calibrated_variants_come_from_calibration_files_of_the_calibrate_machinery(bench):
    folder, records = bench
    plain, gains = [r for r in records if r["method"] == "taylorseer"]
    steps = plain["calibrated"]["cache.params.steps"]
    assert len(steps) == 3 and steps[0] == 0.0
    assert 3.0 < plain["flops_speedup"] < 4.0  # 3 of 12 steps per branch, plus the embedders
    # the gains variant's placement search replays the plain variant's trials from the shared journal
    assert gains["calibrated"]["cache.params.steps"] == steps and len(gains["calibrated"]["cache.params.gains"]) == 2
    assert gains["flops_speedup"] == pytest.approx(plain["flops_speedup"])
    for record in (plain, gains):
        stored = json.loads((folder / "calibrations" / f"{caches.variant_name('taylorseer', record['params'])}.json")
                            .read_text())
        assert stored["values"]["cache.params.steps"] == steps and record["calibration"].endswith(".json")
    assert (folder / "calibrations" / caches.JOURNAL).is_file()


def test_a_rerun_measures_nothing_again(bench, tiny_digits, capsys):
    folder, records = bench
    again = caches.run(True, None, folder, overrides=_overrides(tiny_digits), sweep=_sweep())
    assert [r["fingerprint"] for r in again] == [r["fingerprint"] for r in records]
    assert [r["wall_seconds"] for r in again[1:]] == [r["wall_seconds"] for r in records[1:]]
    measured = len(records) - 1  # 6, or 7 with cache-dit installed (its anchor)
    assert f"resuming: {measured} of {measured} configurations already measured" in capsys.readouterr().out


def test_a_shipped_calibration_is_used_only_with_the_same_provenance(bench, tiny_digits, tmp_path, monkeypatch):
    folder, _ = bench
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    name = caches.variant_name(*PLAIN)
    shutil.copy(folder / "calibrations" / f"{name}.json", shipped / "anything.json")
    monkeypatch.setattr(caches, "SHIPPED_CALIBRATIONS", shipped)
    no_anchors = caches.Sweep({}, [PLAIN], lambda job: [])
    records = caches.run(True, None, tmp_path / "b", overrides=_overrides(tiny_digits), sweep=no_anchors)
    assert records[1]["calibration"] == str(shipped / "anything.json")
    assert not (tmp_path / "b" / "calibrations").exists()  # found, not searched
    records = caches.run(True, None, tmp_path / "c", overrides=_overrides(tiny_digits, "calibrate.seed=5"),
                         sweep=no_anchors)
    assert records[1]["calibration"] == str(tmp_path / "c" / "calibrations" / f"{name}.json")
    assert json.loads((tmp_path / "c" / "calibrations" / f"{name}.json").read_text())["provenance"]["calibration"][
        "seed"] == 5


def test_without_cache_dit_its_anchors_are_skipped_with_a_note(tiny_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(caches, "cache_dit_available", lambda: False)
    job = Job.open(caches.bench_recipe(True, tmp_path, _overrides(tiny_digits)), "accel bench caches", tmp_path)
    found = caches.anchors(job, quick=True)
    assert {a.origin for a in found} == {"diffusers"}
    intervals = [a.params["cache_interval"] for a in found if a.params.get("use_lite_mode")]
    assert intervals == [4, 6, 8, 10, 12]
    caches.run(True, None, tmp_path / "d", overrides=_overrides(tiny_digits), sweep=caches.Sweep({}, [], lambda j: []))
    assert "skipping cache-dit's configurations" in capsys.readouterr().out


@pytest.mark.parametrize("anchor", [
    lambda steps: diffusers_anchor("TaylorSeerCache", steps, {"cache_interval": 4, "use_lite_mode": True}),
    lambda steps: diffusers_anchor("FirstBlockCache", steps, {"threshold": 0.2}),
    lambda steps: diffusers_anchor("PyramidAttentionBroadcast", steps, {"spatial_attention_block_skip_range": 2}),
    pytest.param(lambda steps: cache_dit_anchor("SCM ultra", steps, mask_policy="ultra", static=True,
                                                calibrator="foca"),
                 marks=pytest.mark.skipif(not cache_dit_available(), reason="cache-dit (bench extra) not installed")),
])
def test_an_anchor_changes_the_output_and_leaves_the_pipeline_as_it_was(anchor, tiny_digits):
    pipe = FluxDigitsPipeline.from_pretrained(str(tiny_digits))
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(class_labels=[1, 7], num_inference_steps=12, generator=[torch.Generator().manual_seed(s)
                                                                             for s in (0, 1)]).images

    before = generate()
    with anchor(12).install(pipe):
        cached = generate()
    assert not torch.equal(cached, before) and torch.isfinite(cached).all()
    assert torch.equal(generate(), before)


def test_levels_name_the_best_speedup_of_each_family():
    def rec(kind, origin, speed, psnr, label):
        return {"kind": kind, "origin": origin, "flops_speedup": speed, "psnr": psnr, "label": label}
    records = [rec("stack", "accel", 5.0, 36.0, "taylorseer"), rec("stack", "accel", 2.0, 41.0, "fora"),
               rec("anchor", "diffusers", 4.0, 35.0, "lite 6"), rec("anchor", "cache-dit", 2.5, 30.0, "scm"),
               rec("equal-flops-baseline", "baseline", 6.0, 30.0, "unipc 8")]
    rows = {row["psnr"]: row for row in caches.level_rows(records, levels=(30, 36, 41, 42))}
    assert (rows[30]["ours"], rows[30]["anchor"], rows[30]["baseline"]) == (5.0, 4.0, 6.0)
    assert rows[36]["ours_label"] == "taylorseer" and rows[36]["anchor"] == 1.0 and rows[36]["baseline"] == 1.0
    assert rows[41]["ours"] == 2.0 and rows[41]["flops_ratio"] == 0.5
    assert rows[42]["ours_label"] == "reference"
