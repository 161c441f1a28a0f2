"""`accel ablate` on a tiny setting: records, baselines, outputs, fingerprinted resumption, failures."""

import json

import pytest

from accel.cli import main
from accel.embedded import build_flux_digits

TINY = ["inputs.classes=[0,1]", "inputs.samples_per_class=2", "inputs.batch_size=4", "eval.reference.steps=6",
        "eval.real_samples=40", "eval.timing_batch=2", "eval.timing_repeats=1",
        "ablation.baseline_solvers=[euler]", "ablation.baseline_steps=[2,3]",
        "ablation.axes={sampler.steps: [4], cache: [{preset: null}, {preset: fora, params: {interval: 2}}]}"]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    build_flux_digits(seed=4).save_pretrained(folder)
    return folder


def _records(folder):
    return json.loads((folder / "ablation.json").read_text())["records"]


def test_ablation_writes_every_output_with_baselines_and_resumes(tmp_path, model_dir, capsys, monkeypatch):
    args = ["ablate", "embedded-demo", f"model.name={model_dir}", f"output.dir={tmp_path}", "name=abl", *TINY]
    assert main(args) == 0
    folder = tmp_path / "abl"
    records = _records(folder)
    assert [r["kind"] for r in records] == ["reference", "equal-flops-baseline", "equal-flops-baseline", "stack",
                                            "stack"]
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
    import accel.lab.job

    def no_generation(*args, **kwargs):
        raise AssertionError("every configuration is stored: nothing may be generated again")

    monkeypatch.setattr(accel.lab.job, "generate_counted", no_generation)
    assert main(args) == 0  # a rerun reuses every record by fingerprint
    assert "resuming: 4 of 4 configurations already measured" in capsys.readouterr().out
    assert [r["psnr"] for r in _records(folder)] == [r["psnr"] for r in records]


def test_a_rerun_with_other_settings_measures_anew_and_names_what_differs(tmp_path, model_dir, capsys):
    base = ["ablate", "embedded-demo", f"model.name={model_dir}", f"output.dir={tmp_path}", "name=abl", *TINY]
    assert main(base) == 0
    first = {r["label"]: r for r in _records(tmp_path / "abl")}
    capsys.readouterr()
    assert main([*base, "inputs.seed=7", "guidance.scale=3.0"]) == 0
    out = capsys.readouterr().out
    assert "also holds records made with other settings" in out and "inputs.seeds" in out
    second = {r["label"]: r for r in _records(tmp_path / "abl")}
    assert set(first) == set(second)
    for label in first:  # nothing mixed: every row is the new settings' own
        assert second[label]["fingerprint"] != first[label]["fingerprint"]
        assert second[label]["determined_by"]["inputs"]["seeds"][0] == 7 * 1_000_003


def test_adapters_axis_and_failed_cells(tmp_path, model_dir, capsys):
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from accel.embedded.pipeline import FluxDigitsPipeline

    transformer = build_flux_digits(seed=4).transformer
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False))
    FluxDigitsPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
    axes = ("ablation.axes={sampler.steps: [2, 4], cache: [{preset: null}, {preset: fora, params: {interval: 2}}], "
            f"adapters: [[], [{{path: {tmp_path / 'lora'}}}]]}}")
    args = ["ablate", "embedded-demo", f"model.name={model_dir}", f"output.dir={tmp_path}", "name=axes",
            *TINY[:-1], axes]
    assert main(args) == 1  # fora at 2 steps cannot work: the ablation stops there and says so
    err = capsys.readouterr().err
    assert "cell 'steps=2 cache=fora(interval=2) adapters=none' failed" in err and "--keep-going" in err
    assert main([*args, "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "2 cell(s) failed and were left out (--keep-going)" in err and "below 4 steps no cache pays off" in err
    records = {r["label"]: r for r in _records(tmp_path / "axes")}
    with_lora, without = records["steps=4 cache=none adapters=lora"], records["steps=4 cache=none adapters=none"]
    assert with_lora["family"] == "adapter" and without["family"] == "sampler"
    assert with_lora["psnr"] != without["psnr"]
    assert not any("steps=2 cache=fora" in label for label in records)


def test_two_launched_processes_give_the_single_process_ablation(tmp_path, model_dir):
    import os
    import subprocess
    import sys

    from accel.recipe import RECIPES_DIR

    args = ["embedded-demo", f"model.name={model_dir}", "name=split", *TINY]
    assert main(["ablate", *args, f"output.dir={tmp_path / 'one'}"]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(RECIPES_DIR / "launch" / "accelerate-cpu-2proc.yaml"), "-m", "accel", "ablate", *args,
         f"output.dir={tmp_path / 'two'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    measured = ("label", "kind", "nfe", "flops", "flops_speedup", "psnr", "ssim", "fd", "accuracy",
                "beats_equal_flops_baseline")
    one, two = _records(tmp_path / "one" / "split"), _records(tmp_path / "two" / "split")
    assert [{k: r.get(k) for k in measured} for r in one] == [{k: r.get(k) for k in measured} for r in two]
