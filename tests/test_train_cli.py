"""`accel train RECIPE [key=value ...]`: tiny runs of the registered objectives, resume, bad input."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from accel.cli import main
from accel.recipe import RecipeError
from accel.recipe.train_schema import load_train_recipe, train_config
from accel.train import OBJECTIVES
from distill.training.loss_log import read_loss_log

TINY_FLUX = ("objective.params.model_config="
             "{num_layers: 1, num_single_layers: 1, attention_head_dim: 8, axes_dims_rope: [2, 2, 4]}")


def _recipe(tmp_path, text: str):
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def test_accel_train_writes_logs_plot_and_export_and_resumes(tmp_path, capsys):
    recipe = _recipe(tmp_path, "# accel train tiny.yaml\nname: tiny\nobjective:\n  name: flow-matching\n"
                               "  params: {batch_size: 4}\ntrain:\n  steps: 3\n  checkpoint_every: 2\n"
                               "  ema_decay: 0.9\n  threads: 1\n")
    args = [recipe, f"output.dir={tmp_path / 'runs'}", TINY_FLUX]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "tiny"
    out = capsys.readouterr().out
    assert f"result: {run / 'export'}" in out and "loss plot:" in out
    assert [row[0] for row in read_loss_log(run / "loss.csv")] == [0, 1, 2]
    assert (run / "loss.png").stat().st_size > 1000 and (run / "recipe.yaml").is_file()
    assert json.loads((run / "export" / "transformer" / "config.json").read_text())["num_layers"] == 1
    recipe_yaml = (run / "recipe.yaml").read_text()
    assert main(["train", *args, "train.steps=4"]) == 1  # another run's checkpoints: refused...
    assert "holds checkpoints of a run with other settings (differing in train.steps)" in capsys.readouterr().err
    assert main(["train", *args, "objective.params.cfg_dropout=0.2"]) == 1  # the objective's params count too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds checkpoints of a run with other settings (differing in " \
        "objective.params.cfg_dropout)" in err[0]
    assert (run / "recipe.yaml").read_text() == recipe_yaml  # a refused run records nothing
    assert main(["train", *args]) == 0  # ...the same run resumes (here: is already done)
    assert "resumed from step 3" in capsys.readouterr().out


def test_accel_train_ddpm_lora_exports_a_diffusers_lora_file(tmp_path):
    recipe = _recipe(tmp_path, "name: unet-lora\nobjective:\n  name: ddpm\n  params: {batch_size: 2, lora_rank: 2}\n"
                               "train: {steps: 2, threads: 1}\n")
    assert main(["train", recipe, f"output.dir={tmp_path}"]) == 0
    exported = tmp_path / "unet-lora" / "export" / "pytorch_lora_weights.safetensors"
    with safe_open(str(exported), framework="pt") as handle:
        assert handle.metadata()["accel.method"] == "ddpm"
        assert all(key.startswith("unet.") and ".lora_" in key for key in handle.keys())


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=nope"], "objective.name: 'nope' is not allowed; choose one of: cache-aware, ddpm, flow-matching, router, step-distill"),
    (["train.steps=0"], "train.steps: 0 must be >= 1"),
    (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not allowed"),
    (["train.stepz=3"], "unknown key 'train.stepz'"),
    (["train.lr=abc"], "wrong type for 'train.lr'"),
    (["objective.params.colour=red"], "unknown key 'objective.params.colour' for objective 'flow-matching'"),
    (["objective.params.batch_size=0"], "objective.params.batch_size: 0 must be an integer >= 1"),
])
def test_bad_training_recipes_are_one_line_errors_with_exit_2(tmp_path, capsys, overrides, message):
    assert main(["train", "train/flow-digits", f"output.dir={tmp_path}", "train.steps=1", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accel: error: ") and message in err and "\n" not in err


def test_the_shipped_training_recipe_loads_and_every_objective_is_registered(tmp_path):
    recipe = load_train_recipe("train/flow-digits")
    config = train_config(recipe)
    assert config.steps == 2000 and config.betas == (0.9, 0.99) and str(config.out_dir) == "runs/flow-digits"
    assert {"flow-matching", "ddpm"} <= set(OBJECTIVES)
    with pytest.raises(RecipeError, match="^name: missing; a training recipe must set name, objective.name"):
        load_train_recipe(_recipe(tmp_path, "objective: {name: ddpm}\ntrain: {steps: 3}\n"))


def test_the_embedded_training_scripts_write_the_model_to_out_and_the_state_beside_it(tmp_path):
    from accel.embedded.unet import load_unet_digits
    from accel.train import embedded_script_parser, run_embedded_script

    parser = embedded_script_parser("scripts/train_embedded_unet.py", out=tmp_path / "unet", lr=5e-4, ema_decay=0.999)
    args = parser.parse_args(["--out", str(tmp_path / "unet"), "--steps", "2", "--batch-size", "2", "--threads", "1",
                              "--checkpoint-every", "1"])
    result = run_embedded_script("ddpm", args, beta_schedule="scaled_linear")
    assert result.exported == tmp_path / "unet" and (tmp_path / "unet" / "training.json").is_file()
    assert result.loss_log == tmp_path / "unet-checkpoint" / "loss.csv"
    assert sorted(p.name for p in (tmp_path / "unet-checkpoint" / "checkpoints").iterdir()) == ["step-0000001",
                                                                                                 "step-0000002"]
    assert load_unet_digits(tmp_path / "unet").betas["beta_schedule"] == "scaled_linear"
