"""`accel run` end to end on a shortened setting, and seeded reproducibility."""

import json

import torch

from accel.cli import main
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
    for key in ("tflops", "wall_seconds", "wall_speedup", "psnr", "ssim", "fd", "accuracy"):
        assert key in run, key
    assert reference["psnr"] == 100.0 and reference["ssim"] > 0.999
    assert summary["recipe"]["sampler"]["steps"] == 2
    assert (folder / "grid.png").stat().st_size > 1000
    assert "| reference |" in (folder / "report.md").read_text()
    assert "speedup (FLOPs)" in capsys.readouterr().out
