"""The training loop under `accelerate launch`: two CPU processes (gloo), and DeepSpeed ZeRO-2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_toys import MLPObjective

from accel.recipe import RECIPES_DIR
from distill.training import TrainConfig, train

TOYS = Path(__file__).with_name("training_toys.py")


def _launch(config_file: str, mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES_DIR / "launch" / config_file),
         str(TOYS), mode, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]


def _single_process(out: Path, grad_accumulation: int) -> None:
    train(MLPObjective(), TrainConfig(steps=12, out_dir=out, lr=1e-2, warmup_steps=2, checkpoint_every=4,
                                      ema_decay=0.9, log_every=3, grad_accumulation=grad_accumulation, threads=1))


def _assert_same(a_dir: Path, b_dir: Path, atol: float) -> None:
    for name in ("weights.safetensors", "ema.safetensors"):
        a = load_file(str(a_dir / "checkpoints" / "step-0000012" / name))
        b = load_file(str(b_dir / "checkpoints" / "step-0000012" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


def test_two_processes_equal_one_process_accumulating_their_micro_batches(tmp_path):
    # 2 processes x 1 micro-batch see micro-batches 0 and 1 of every step, as 1 process x 2 does.
    _launch("accelerate-cpu-2proc.yaml", "plain", tmp_path / "two")
    _single_process(tmp_path / "one", grad_accumulation=2)
    _assert_same(tmp_path / "one", tmp_path / "two" / "whole", atol=1e-6)
    assert (tmp_path / "two" / "whole" / "loss.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (the `deepspeed` extra)")
def test_deepspeed_zero2_trains_like_the_plain_loop_and_resumes_exactly(tmp_path):
    _launch("deepspeed-zero2.yaml", "resume", tmp_path / "ds")
    checkpoint = tmp_path / "ds" / "whole" / "checkpoints" / "step-0000012"
    assert (checkpoint / "optimizer-rank0.safetensors").is_file()  # DeepSpeed's partition, not the plain file
    assert not (checkpoint / "optimizer.safetensors").exists()
    _assert_same(tmp_path / "ds" / "whole", tmp_path / "ds" / "pieces", atol=1e-6)  # killed at 7, resumed from 4
    _single_process(tmp_path / "plain", grad_accumulation=1)
    _assert_same(tmp_path / "plain", tmp_path / "ds" / "whole", atol=1e-5)
