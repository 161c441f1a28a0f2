"""`accel run` end to end on a shortened setting, and seeded reproducibility."""

import json

import torch

from accel.cli import main
from accel.recipe import RECIPES_DIR
from accel.embedded import build_flux_digits
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise

SHORT = ["inputs.classes=[0,1]", "inputs.samples_per_class=2", "inputs.batch_size=2",
         "sampler.steps=2", "eval.reference.steps=4", "eval.real_samples=40",
         "eval.timing_batch=2", "eval.timing_repeats=1"]


def test_generation_is_bitwise_reproducible_and_split_invariant():
    model = build_flux_digits(seed=3).eval()
    denoiser = flux_digits_denoiser(model, guidance_scale=3.0)
    noise = sample_noise(5, range(4), (1, 16, 16))
    torch.testing.assert_close(sample_noise(5, range(2, 4), (1, 16, 16)), noise[2:], rtol=0, atol=0)
    labels = torch.tensor([0, 1, 2, 3])
    plan = SamplingPlan("euler", 3)
    first = generate(denoiser, plan, noise, labels, batch_size=4)
    second = generate(denoiser, plan, noise, labels, batch_size=4)
    assert torch.equal(first, second)
    assert first.shape == (4, 1, 16, 16) and torch.isfinite(first).all()


def test_accel_run_end_to_end_writes_summary_report_and_grid(tmp_path, capsys):
    model_dir = tmp_path / "model"
    build_flux_digits(seed=1).save_pretrained(model_dir)
    code = main(["run", f"model.name={model_dir}", f"output.dir={tmp_path / 'runs'}", "name=short", *SHORT])
    assert code == 0
    folder = tmp_path / "runs" / "short"
    summary = json.loads((folder / "summary.json").read_text())
    reference, run = summary["runs"]
    assert reference["kind"] == "reference" and run["kind"] == "run"
    assert reference["nfe"] == 8 and run["nfe"] == 4  # steps x 2 guidance passes
    assert abs(reference["flops"] / run["flops"] - 2.0) < 1e-9  # counted, not estimated
    assert reference["flops_speedup"] == 1.0 and abs(run["flops_speedup"] - 2.0) < 1e-9
    for key in ("tflops", "flops_total", "wall_seconds", "wall_speedup", "psnr", "ssim", "fd", "accuracy",
                "fingerprint", "determined_by"):
        assert key in run, key
    assert run["determined_by"]["model"]["weights"] == reference["determined_by"]["model"]["weights"]
    assert reference["psnr"] == 100.0 and reference["ssim"] > 0.999
    assert summary["recipe"]["sampler"]["steps"] == 2
    assert (folder / "grid.png").stat().st_size > 1000
    assert "| reference |" in (folder / "report.md").read_text()
    assert "speedup (FLOPs)" in capsys.readouterr().out


def test_accelerate_launch_with_two_processes_gives_the_single_process_summary(tmp_path):
    import os
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    build_flux_digits(seed=2).save_pretrained(model_dir)
    common = [f"model.name={model_dir}", *SHORT, "inputs.samples_per_class=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = main(["run", f"output.dir={tmp_path / 'one'}", "name=split", *common])
    assert single == 0
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(RECIPES_DIR / "launch" / "accelerate-cpu-2proc.yaml"), "-m", "accel", "run",
         f"output.dir={tmp_path / 'two'}", "name=split", *common],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "split" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "split" / "summary.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    timing_free = ("wall_seconds", "wall_speedup", "fingerprint", "determined_by")  # threads differ
    for a, b in zip(one["runs"], two["runs"]):
        assert {k: v for k, v in a.items() if k not in timing_free} == \
               {k: v for k, v in b.items() if k not in timing_free}


def test_accel_run_with_a_cache_preset_counts_fewer_flops_and_saves_the_resolved_stack(tmp_path):
    model_dir = tmp_path / "model"
    build_flux_digits(seed=1).save_pretrained(model_dir)
    overrides = [f"model.name={model_dir}", f"output.dir={tmp_path / 'runs'}", "name=cached", *SHORT,
                 "sampler.steps=8", "eval.reference.steps=8", "cache.preset=fora", "cache.params={interval: 2}"]
    assert main(["run", *overrides]) == 0
    summary = json.loads((tmp_path / "runs" / "cached" / "summary.json").read_text())
    reference, run = summary["runs"]
    assert run["nfe"] == reference["nfe"] == 16
    assert run["flops"] < 0.8 * reference["flops"]
    assert summary["stack"]["stack"]["cache"]["preset"] == "fora"
    assert any(line.startswith("guidance-branches: cond and uncond are separate calls") for line in summary["stack"]["decisions"])
    assert (tmp_path / "runs" / "cached" / "stack.json").is_file()


def test_unknown_cache_preset_is_a_recipe_error(capsys):
    assert main(["run", "cache.preset=warpcache"]) == 2
    assert "cache.preset: 'warpcache' is not allowed; choose one of:" in capsys.readouterr().err
