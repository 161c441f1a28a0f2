"""`accel ablate` on a tiny setting: records, baselines, outputs and resumption."""

import json

from accel.cli import main
from accel.embedded import build_flux_digits

TINY = ["inputs.classes=[0,1]", "inputs.samples_per_class=2", "inputs.batch_size=4", "eval.reference.steps=6",
        "eval.real_samples=40", "eval.timing_batch=2", "eval.timing_repeats=1",
        "ablation.baseline_solvers=[euler]", "ablation.baseline_steps=[2,3]",
        "ablation.axes={sampler.steps: [4], cache: [{preset: null}, {preset: fora, params: {interval: 2}}]}"]


def test_ablation_writes_every_output_with_baselines_and_resumes(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    build_flux_digits(seed=4).save_pretrained(model_dir)
    args = ["ablate", "embedded-demo", f"model.name={model_dir}", f"output.dir={tmp_path}", "name=abl", *TINY]
    assert main(args) == 0
    folder = tmp_path / "abl"
    records = json.loads((folder / "ablation.json").read_text())["records"]
    kinds = [r["kind"] for r in records]
    assert kinds == ["reference", "equal-flops-baseline", "equal-flops-baseline", "stack", "stack"]
    for record in records:
        for key in ("flops_speedup", "wall_speedup", "psnr", "ssim", "fd", "accuracy", "beats_equal_flops_baseline"):
            assert key in record, (record["label"], key)
    reference, base2, base3, plain4, fora4 = records
    assert reference["flops_speedup"] == 1.0 and abs(base3["flops_speedup"] - 2.0) < 1e-9
    assert abs(plain4["flops_speedup"] - 1.5) < 1e-9 and fora4["flops"] < plain4["flops"]
    assert plain4["equal_flops_baseline"]["label"] == base3["label"]  # the best plain run within its FLOPs
    assert isinstance(plain4["beats_equal_flops_baseline"], bool)
    for name in ("ablation.csv", "ablation.md", "pareto.png", "grid.png"):
        assert (folder / name).stat().st_size > 100, name
    capsys.readouterr()
    import accel.ablate

    def no_timing(*args):
        raise AssertionError("nothing left to measure: the reference must not be re-timed")

    monkeypatch.setattr(accel.ablate, "time_plan", no_timing)
    assert main(args) == 0  # a rerun resumes every finished cell and measures nothing again
    assert "resuming: 4 of 4 cells already finished" in capsys.readouterr().out
    rerun = json.loads((folder / "ablation.json").read_text())["records"]
    assert [r["psnr"] for r in rerun] == [r["psnr"] for r in records]
    # A new cell on resume: the reference is timed again and the new cell compared with that timing;
    # finished cells keep the wall-clock speedups they were measured with.
    monkeypatch.setattr(accel.ablate, "time_plan", lambda *args: 123.0)
    wider = [a.replace("{preset: fora, params: {interval: 2}}]",
                       "{preset: fora, params: {interval: 2}}, {preset: fora, params: {interval: 3}}]") for a in args]
    assert main(wider) == 0
    assert "resuming: 4 of 5 cells already finished" in capsys.readouterr().out
    assert json.loads((folder / "reference.json").read_text())["wall_seconds"] == 123.0
    grown = {r["label"]: r for r in json.loads((folder / "ablation.json").read_text())["records"]}
    for record in records[1:]:
        assert grown[record["label"]]["wall_speedup"] == record["wall_speedup"]
    new = next(r for label, r in grown.items() if "interval=3" in label)
    assert new["wall_speedup"] == 123.0 / new["wall_seconds"]
