"""The one training loop: resume equality, corrupt checkpoints, NaN stop, accumulation, EMA, logs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_toys import LinearObjective, MLPObjective, SimulatedKill

from distill.training import TrainConfig, TrainingError, train
from distill.training.loss_log import read_loss_log


def _config(out, **overrides) -> TrainConfig:
    values = dict(steps=12, out_dir=out, lr=1e-2, warmup_steps=2, checkpoint_every=4, ema_decay=0.9,
                  log_every=3, grad_accumulation=2, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def _weights(out, step, name="weights.safetensors"):
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / name))


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    train(MLPObjective(), _config(whole))
    with pytest.raises(SimulatedKill):
        train(MLPObjective(kill_at=7), _config(pieces))  # killed after the step-4 checkpoint
    result = train(MLPObjective(), _config(pieces))
    assert result.resumed_from == 4 and result.steps_done == 12
    for name in ("weights.safetensors", "ema.safetensors"):
        a, b = _weights(whole, 12, name), _weights(pieces, 12, name)
        assert a.keys() == b.keys() and "2.bias" not in a  # only trainable weights are checkpointed
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    exported_a, exported_b = load_file(str(whole / "export" / "model.safetensors")), load_file(str(result.exported))
    for key in exported_a:
        torch.testing.assert_close(exported_a[key], exported_b[key], rtol=0, atol=1e-6)
    rows = read_loss_log(result.loss_log)
    assert [row[0] for row in rows] == list(range(12))  # no duplicated steps after the resume
    assert [row[1] for row in rows] == pytest.approx([row[1] for row in read_loss_log(whole / "loss.csv")], abs=1e-6)
    assert result.loss_plot.stat().st_size > 1000
    assert sorted(p.name for p in (pieces / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]


@pytest.mark.parametrize("damage", ["corrupt", "missing", "manifest"])
def test_a_corrupt_or_partial_checkpoint_is_skipped_with_a_message(tmp_path, capsys, damage):
    out = tmp_path / "run"
    train(MLPObjective(), _config(out, steps=8))
    newest = out / "checkpoints" / "step-0000008"
    if damage == "corrupt":
        data = bytearray((newest / "weights.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (newest / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "missing":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / "checkpoint.json").write_text("{not json")
    capsys.readouterr()
    result = train(MLPObjective(), _config(out, steps=8))
    assert result.resumed_from == 4
    assert f"skipping checkpoint {newest}" in capsys.readouterr().out
    assert json.loads((newest / "checkpoint.json").read_text())["step"] == 8  # rewritten, valid


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    stopped = r"loss is nan at step 6; training stopped, the last good checkpoint is .*step-0000004"
    with pytest.raises(TrainingError, match=stopped):
        train(MLPObjective(nan_at=6), _config(out, log_every=100))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004"]
    assert all(torch.isfinite(v).all() for v in _weights(out, 4).values())
    assert [row[0] for row in read_loss_log(out / "loss.csv")] == list(range(6))
    result = train(MLPObjective(), _config(out))  # the good checkpoint resumes
    assert result.resumed_from == 4


def test_gradient_accumulation_equals_one_bigger_batch(tmp_path):
    common = dict(steps=5, lr=0.05, warmup_steps=0, ema_decay=None, max_grad_norm=None, checkpoint_every=5)
    train(LinearObjective(rows=8), _config(tmp_path / "acc", grad_accumulation=4, **common))
    train(LinearObjective(rows=8, merge=4), _config(tmp_path / "big", grad_accumulation=1, **common))
    torch.testing.assert_close(_weights(tmp_path / "acc", 5)["weight"], _weights(tmp_path / "big", 5)["weight"],
                               rtol=0, atol=1e-6)


def test_one_accumulated_step_matches_the_closed_form_gradient(tmp_path):
    # With a huge Adam epsilon the first AdamW step is lr * g / (|g| + eps): the gradient's scale shows.
    toy = LinearObjective(rows=8)
    eps, lr = 1e3, 1.0
    train(toy, _config(tmp_path / "one", steps=1, grad_accumulation=4, lr=lr, warmup_steps=0, adam_eps=eps,
                       max_grad_norm=None, ema_decay=None, min_lr_fraction=1.0))
    x, y = LinearObjective(rows=8, merge=4).data(0, 0)
    gradient = 2 * (x @ torch.zeros(3, 1) - y).T @ x / x.shape[0]  # d/dw mean((x w - y)^2) at w = 0
    expected = -lr * gradient / (gradient.abs() + eps)
    torch.testing.assert_close(_weights(tmp_path / "one", 1)["weight"], expected, rtol=1e-5, atol=1e-9)


def test_ema_follows_the_warmed_up_decay(tmp_path):
    toy = MLPObjective()
    config = _config(tmp_path / "ema", steps=6, grad_accumulation=1, checkpoint_every=6, ema_decay=0.5)
    result = train(toy, config)
    history = toy.history + [_weights(tmp_path / "ema", 6)]  # weights before each step, then the final
    ema = {k: v.clone() for k, v in history[0].items()}
    for step in range(6):
        decay = min(0.5, (1 + step) / (10 + step))
        for key in ema:
            ema[key] = decay * ema[key] + (1 - decay) * history[step + 1][key]
    saved = _weights(tmp_path / "ema", 6, "ema.safetensors")
    exported = load_file(str(result.exported))
    for key in ema:
        torch.testing.assert_close(saved[key], ema[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(exported[key], ema[key], rtol=0, atol=1e-6)
    assert config.ema_decay_at(0) == pytest.approx(0.1) and config.ema_decay_at(100) == 0.5


def test_checkpoints_of_another_run_are_refused(tmp_path):
    out = tmp_path / "run"
    train(MLPObjective(), _config(out, steps=4))
    with pytest.raises(TrainingError, match="belongs to a run with other training settings"):
        train(MLPObjective(), _config(out, steps=4, lr=0.5))


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps: 0 must be >= 1"),
    ({"lr": -1.0}, "lr: -1.0 must be > 0.0"),
    ({"betas": (0.9, 1.0)}, "betas[1]: 1.0 must be < 1.0"),
    ({"mixed_precision": "fp8"}, "mixed_precision: 'fp8' is not allowed; choose one of: no, bf16, fp16"),
    ({"ema_decay": 1.5}, "ema_decay: 1.5 must be < 1.0"),
    ({"grad_accumulation": 2.5}, "grad_accumulation: 2.5 must be an integer"),
    ({"max_grad_norm": 0}, "max_grad_norm: 0 must be > 0.0"),
    ({"out_dir": ""}, "out_dir: give a folder"),
])
def test_bad_settings_are_one_line_value_errors(tmp_path, overrides, message):
    values = dict(steps=3, out_dir=tmp_path)
    values.update(overrides)
    with pytest.raises(ValueError) as error:
        TrainConfig(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=110, out_dir="x", lr=1.0, warmup_steps=10, min_lr_fraction=0.1)
    assert config.learning_rate(0) == pytest.approx(0.1) and config.learning_rate(9) == pytest.approx(1.0)
    assert config.learning_rate(10) == pytest.approx(1.0) and config.learning_rate(60) == pytest.approx(0.55)
    assert config.learning_rate(110) == pytest.approx(0.1)
