"""`accel bench distill`: configurations and target checks on synthetic records."""

from __future__ import annotations

from accel.bench import _distill_report as report
from accel.bench.distill import _metadata, configurations


def record(method, nfe, psnr, fd, flops_speedup, cache=None, adapter=None, steps=None):
    return {"method": method, "nfe": nfe, "psnr": psnr, "fd": fd, "flops_speedup": flops_speedup,
            "cache": cache, "adapter": adapter, "steps": steps}


def test_targets_are_judged_against_the_right_rows():
    records = [record("reference", 50, 100.0, 1.0, 1.0),
               record("euler 4", 4, 22.0, 1.3, 12.5), record("unipc 4", 4, 25.0, 1.1, 12.5),
               record("step LoRA 4", 4, 28.5, 1.15, 25.0, adapter="step"),
               record("euler 10 + fora", 10, 24.0, 1.2, 8.0, cache="fora", steps=10),
               record("cache-aware", 10, 25.5, 1.1, 16.0, cache="fora", adapter="cache-aware", steps=10),
               record("router", 50, 33.0, 1.0, 1.6, cache="router", adapter="router")]
    targets = {t["target"].split(":")[0]: t for t in report.check_targets(records)}
    assert targets["step LoRA at 4 NFE"]["met"]  # +3.5 dB over unipc 4, FD 1.15 <= 1.2
    assert not targets["cache-aware LoRA"]["met"]  # +1.5 dB only
    assert targets["router"]["met"]
    assert targets["best full stack (solver + cache + adapter)"]["met"]  # 16x, FD 1.1 <= 1.15
    records[3]["fd"] = 1.3
    assert not {t["target"].split(":")[0]: t for t in report.check_targets(records)}["step LoRA at 4 NFE"]["met"]


def test_configurations_name_the_adapters_they_need():
    configs = configurations(quick=True)
    labels = [c.label for c in configs]
    assert "euler 4" in labels and "step LoRA 4" in labels
    step = next(c for c in configs if c.label == "step LoRA 4")
    assert step.needs == ("step-4",) and step.adapter == "step"
    trained = _metadata("step-4").get("accel.guidance", "distilled")
    if trained == "distilled":
        assert "guidance.distilled=true" in step.overrides and "guidance.scale=1.0" in step.overrides
    else:  # an adapter trained with CFG runs with the same scale, and also with CFG reuse
        assert f"guidance.scale={float(trained)}" in step.overrides
        reuse = next(c for c in configs if c.label == "step LoRA 4 + CFG reuse")
        assert reuse.cache == "cfg-reuse" and "guidance.uncond_interval=2" in reuse.overrides
    assert any("fuse: true" in o for o in step.overrides)
    assert all(c.adapter is None for c in configs if c.label.startswith(("euler 4", "unipc_bh2 4")))
