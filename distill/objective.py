"""The contract between the one training loop (`distill.training`) and what it trains.

An objective owns the model(s), knows which parameters train, computes a scalar loss for a step,
and exports the result. The loop owns everything else: accelerate, the optimizer and learning
rate, gradient accumulation and clipping, EMA, atomic checkpoints and resume, NaN checks, the
progress bar and the loss log. Objectives never import the loop, and the loop never knows which
method it runs, so a new method is a new objective, not a copied script.

Determinism: `loss(step, micro_batch)` must draw its batch, noise and times from a generator
seeded by `(seed, step, micro_batch)` only, so that a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Objective(Protocol):
    """What the training loop needs from a method.

    Attributes:
        name: short method name for logs and metadata ("flow-matching", "step-distill", ...).
    """

    name: str

    def module(self) -> nn.Module:
        """The module holding every trainable parameter (passed to `accelerator.prepare`).

        Parameters with `requires_grad=False` are frozen; the loop optimises, EMAs and
        checkpoints only the trainable ones (by name).
        """
        ...

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        """The scalar loss of micro-batch `micro_batch` of optimizer step `step` (0-based).

        `micro_batch` is global across processes: with P processes and A accumulation
        micro-batches, process p computes micro-batches p * A .. p * A + A - 1, so every run with
        the same P * A sees the same data. The loop calls this inside a forward of a wrapper that
        holds `module()` (accelerate's autocast, DDP and DeepSpeed apply) and may have moved that
        module to an accelerator: put the batch on the device of its parameters.
        """
        ...

    def export(self, out_dir: Path) -> Path:
        """Writes the trained result (current weights, EMA already swapped in) under `out_dir`.

        Returns:
            The main file or folder written (a LoRA .safetensors, a model folder, a router file).
        """
        ...


def seeded_generator(seed: int, step: int, micro_batch: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro_batch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 997 + micro_batch)
