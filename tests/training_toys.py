"""Tiny objectives for the training-loop tests (imported by tests and by launched scripts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from distill.objective import seeded_generator


class SimulatedKill(RuntimeError):
    """Raised from inside an objective to stand for a killed process."""


@dataclass
class MLPObjective:
    """Regress a fixed random function with a small MLP; one layer frozen.

    `kill_at` raises SimulatedKill when that step starts; `nan_at` returns a NaN loss at that step;
    `history` records the trainable weights seen at micro-batch 0 of every step.
    """

    seed: int = 0
    batch: int = 16
    kill_at: Optional[int] = None
    nan_at: Optional[int] = None
    name: str = "toy-mlp"
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.manual_seed(1234)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.net[2].bias.requires_grad_(False)  # a frozen parameter

    def module(self) -> nn.Module:
        return self.net

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        if step == self.kill_at:
            raise SimulatedKill(f"killed at step {step}")
        if micro_batch == 0:
            self.history.append({k: v.detach().clone() for k, v in self.net.named_parameters() if v.requires_grad})
        generator = seeded_generator(self.seed, step, micro_batch)
        x = torch.randn(self.batch, 4, generator=generator)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def export(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(path))
        return path


@dataclass
class LinearObjective:
    """Least squares y = X w: micro-batch k of step s holds rows drawn from (seed, s, k).

    With `merge` > 1 one micro-batch holds the rows of micro-batches 0..merge-1 of the unmerged
    objective, so A micro-batches of n rows equal one micro-batch of A * n rows.
    """

    rows: int = 8
    merge: int = 1
    seed: int = 0
    name: str = "toy-linear"

    def __post_init__(self) -> None:
        self.w = nn.Linear(3, 1, bias=False)
        nn.init.zeros_(self.w.weight)
        self.true_w = torch.tensor([[1.0, -2.0, 0.5]])

    def data(self, step: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [micro_batch] if self.merge == 1 else list(range(self.merge))
        xs = [torch.randn(self.rows, 3, generator=seeded_generator(self.seed, step, k)) for k in parts]
        x = torch.cat(xs)
        return x, x @ self.true_w.T

    def module(self) -> nn.Module:
        return self.w

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        x, y = self.data(step, micro_batch)
        return ((self.w(x) - y) ** 2).mean()

    def export(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "w.safetensors"
        save_file({"weight": self.w.weight.detach().contiguous()}, str(path))
        return path


def _launched(mode: str, out: str) -> None:
    """Entry point for launched processes: `python training_toys.py MODE OUT`.

    "plain": one MLP run in OUT/whole. "resume": also a run killed at step 7 and resumed, in OUT/pieces.
    """
    from distill.training import TrainConfig, train

    def config(folder: str) -> TrainConfig:
        return TrainConfig(steps=12, out_dir=Path(out) / folder, lr=1e-2, warmup_steps=2, checkpoint_every=4,
                           ema_decay=0.9, log_every=3, grad_accumulation=1, threads=1)

    train(MLPObjective(), config("whole"))
    if mode == "resume":
        try:
            train(MLPObjective(kill_at=7), config("pieces"))
        except SimulatedKill:
            pass
        train(MLPObjective(), config("pieces"))


if __name__ == "__main__":
    import sys

    _launched(sys.argv[1], sys.argv[2])
