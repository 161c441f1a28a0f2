"""`accel bench distill`: its configurations, and a shortened run through the lab on the shipped model."""

from __future__ import annotations

import json

import pytest

from accel.bench import distill
from accel.bench.distill import _metadata, configurations


def test_configurations_name_the_adapters_they_need_and_build_valid_stacks(tmp_path):
    configs = configurations(quick=True)
    labels = [c.label for c in configs]
    assert "euler 4" in labels and "step LoRA 4" in labels
    assert {(c.label.split()[0]) for c in configs if c.kind == "equal-flops-baseline"} == {"dpmpp_2m", "unipc_bh2"}
    step = next(c for c in configs if c.label == "step LoRA 4")
    assert step.needs == ("step-4",) and step.adapter == "step" and step.family == "adapter"
    trained = _metadata("step-4").get("accel.guidance", "distilled")
    if trained == "distilled":
        assert "guidance.scale=1.0" in step.overrides
    else:  # an adapter trained with CFG runs with the same scale, and also with CFG reuse
        assert f"guidance.scale={float(trained)}" in step.overrides
        reuse = next(c for c in configs if c.label == "step LoRA 4 + CFG reuse")
        assert reuse.cache == "cfg-reuse" and "guidance.uncond_interval=2" in reuse.overrides
        assert reuse.family == "cache+adapter"
    assert any("fuse: true" in o for o in step.overrides)
    assert all(c.adapter is None for c in configs if c.label.startswith(("euler 4", "unipc_bh2 4")))
    for config in configs:  # every recipe validates; files the stack reads are fingerprinted by content
        lab = distill.configuration(config, True, tmp_path)
        assert lab.kind == config.kind and lab.stack is not None
        if config.adapter in ("step", "cache-aware", "router"):
            assert len(next(iter(lab.identity["files"].values()))) == 16, config.label


def test_a_short_run_compares_each_stack_with_its_equal_flops_baseline_and_resumes(tmp_path, monkeypatch, capsys):
    import accel.lab.job as lab_job

    short = ["inputs.classes=[0,1]", "inputs.samples_per_class=2", "inputs.batch_size=4", "eval.real_samples=40",
             "eval.timing_batch=1", "eval.timing_repeats=1", "eval.reference.steps=8"]
    base = distill.base_recipe
    monkeypatch.setattr(distill, "base_recipe", lambda quick, out, overrides=(): base(quick, out, (*short, *overrides)))
    chosen = ("dpmpp_2m 2", "unipc_bh2 2", "unipc_bh2 4", "euler 4", "step LoRA 4")
    monkeypatch.setattr(distill, "configurations",
                        lambda quick: [c for c in configurations(quick) if c.label in chosen])
    out = tmp_path / "bench"
    rows = distill.run(True, tmp_path / "d.json", out)
    assert [r["method"] for r in rows] == ["reference (euler 50)", "dpmpp_2m 2", "unipc_bh2 2", "unipc_bh2 4",
                                           "euler 4", "step LoRA 4"]
    reference, *measured = rows
    assert reference["nfe"] == 8 and reference["model_calls"] == 16 and reference["flops_speedup"] == 1.0
    step = rows[-1]
    assert step["adapter"] == "step" and step["nfe"] == 4 and step["model_calls"] == 8
    assert step["flops_speedup"] == pytest.approx(2.0, rel=1e-12)  # fused: no LoRA FLOPs, 8 / 4 steps
    eligible = [r for r in measured if r["kind"] == "equal-flops-baseline" and r["flops"] <= step["flops"] * 1.02]
    best = max(eligible, key=lambda r: r["psnr"])
    assert step["equal_flops_baseline"]["label"] == best["label"]
    assert step["beats_equal_flops_baseline"] == (step["psnr"] > best["psnr"])
    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary == json.loads((out / "distill.json").read_text()) and "targets" not in summary
    assert (out / "distill.png").stat().st_size > 1000
    assert "| step LoRA 4 |" in (out / "distill.md").read_text()
    assert "equal or lower FLOPs" in capsys.readouterr().out

    monkeypatch.setattr(lab_job, "generate_counted", lambda *a, **k: pytest.fail("a stored record was measured again"))
    monkeypatch.setattr(lab_job, "time_generation", lambda *a, **k: 1.0)  # the cached reference is timed anew
    again = distill.run(True, None, out)
    assert [{k: v for k, v in r.items() if "wall" not in k} for r in again[1:]] == \
        [{k: v for k, v in r.items() if "wall" not in k} for r in measured]
