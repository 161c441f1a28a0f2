"""The lab on a user's own saved pipeline: `accel run` and `accel ablate` on tiny FLUX, SD3 and Wan folders."""

import json

import pytest
import yaml

from accel.cli import main
from tiny_text_pipelines import TINY_CALL, save_tiny_pipeline


def _recipe(tmp_path, family: str, name: str, extra: dict | None = None):
    """A recipe file for the tiny pipeline of `family`, saved like a user's download."""
    folder = save_tiny_pipeline(family, tmp_path / f"{family}-pipe")
    call = dict(TINY_CALL[family])
    recipe = {
        "name": name,
        "model": {"name": str(folder)},
        "sampler": {"solver": "euler", "steps": 4},
        "cache": {"preset": "fora", "params": {"interval": 2}},
        "guidance": {"scale": 2.0},
        "inputs": {"prompts": ["a red cube", "two dogs on a table", "a house at night"], "batch_size": 2,
                   "resolution": [call.pop("height"), call.pop("width")], "frames": call.pop("num_frames", None),
                   "call_kwargs": call},
        "eval": {"reference": {"solver": None, "steps": 8}, "metrics": ["psnr", "ssim"], "timing_batch": 1,
                 "timing_repeats": 1},
        "output": {"dir": "runs"},
        **(extra or {}),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text("# accel run " + path.name + "\n" + yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_accel_run_measures_a_stack_on_a_saved_pipeline(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_recipe(tmp_path, family, f"{family}-run"))]) == 0
    folder = tmp_path / "runs" / f"{family}-run"
    summary = json.loads((folder / "summary.json").read_text())
    reference, run = summary["runs"]
    assert reference["solver"] == "pipeline scheduler" and reference["steps"] == 8
    assert run["flops"] < 0.5 * reference["flops"]  # half the steps, and a cache on top
    assert run["flops_total"] > run["flops"]  # the text encoders and the VAE are counted too
    assert 0 < run["psnr"] < 100 and 0 < run["ssim"] <= 1 and reference["psnr"] == 100.0
    assert summary["stack"]["stack"]["cache"]["preset"] == "fora"
    branches = {b["branch"] for b in run["last_call"]["branches"]}
    assert branches == ({"batched"} if family == "sd3" else {"cond", "uncond"})
    assert (folder / "grid.png").stat().st_size > 1000 and "| reference |" in (folder / "report.md").read_text()


def test_a_two_cell_ablation_on_a_saved_pipeline_compares_with_the_fewer_steps_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ablation = {"axes": {"cache": [{"preset": None}, {"preset": "fora", "params": {"interval": 2}}]},
                "baseline_solvers": ["euler", "unipc_bh2"], "baseline_steps": [2]}
    assert main(["ablate", str(_recipe(tmp_path, "wan", "wan-grid", {"ablation": ablation}))]) == 0
    records = json.loads((tmp_path / "runs" / "wan-grid" / "ablation.json").read_text())["records"]
    assert [r["kind"] for r in records] == ["reference", "equal-flops-baseline", "equal-flops-baseline", "stack",
                                            "stack"]
    stacks = records[3:]
    assert stacks[1]["flops"] < stacks[0]["flops"] and all(isinstance(r["beats_equal_flops_baseline"], bool)
                                                           for r in stacks)
    assert stacks[0]["equal_flops_baseline"]["label"] in ("euler 2 steps", "unipc_bh2 2 steps")
    assert (tmp_path / "runs" / "wan-grid" / "pareto.png").stat().st_size > 1000


def test_module_identity_changes_with_any_sampled_weight_and_dtype():
    import torch

    from accel.lab.fingerprint import module_identity

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    first = module_identity(model)
    assert module_identity(model) == first  # deterministic
    with torch.no_grad():
        model[1].bias[-1] += 1e-3  # the last element of a tensor is sampled too
    assert module_identity(model) != first
    assert module_identity(model.to(torch.bfloat16)) != module_identity(model.to(torch.float32))
