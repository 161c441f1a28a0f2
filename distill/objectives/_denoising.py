"""What the denoising pretraining objectives share: batches with condition dropout, and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from distill.objective import seeded_generator

BatchSampler = Callable[[torch.Generator, int], tuple[torch.Tensor, Any]]
"""(generator, batch_size) -> (clean data x0, condition): draws only from the generator."""

DropCondition = Callable[[Any, torch.Tensor], Any]
"""(condition, drop mask (B,) bool) -> the condition with the masked entries made unconditional."""


def label_dropout(null_label: int) -> DropCondition:
    """Condition dropout for class labels: dropped labels become `null_label` (the uncond class)."""
    def drop(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.to(labels.device), torch.full_like(labels, null_label), labels)

    return drop


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


@dataclass(kw_only=True)
class DenoisingObjective:
    """Shared fields of `FlowMatching` and `DDPMEpsilon`.

    Attributes:
        model: the module holding every trainable parameter (requires_grad marks which).
        sample: draws a batch of clean data and its condition from a generator.
        batch_size: samples per micro-batch.
        seed: the run's seed; micro-batch k of step s draws from seeded_generator(seed, s, k).
        cond_dropout: probability of replacing a sample's condition by the unconditional one
            (classifier-free guidance training); needs `drop_condition` when > 0.
        drop_condition: how a condition is made unconditional (e.g. `label_dropout(10)`).
        save: writes the trained result under a folder and returns what it wrote; None saves
            `model`'s state dict as model.safetensors.
    """

    model: nn.Module
    sample: BatchSampler
    batch_size: int
    seed: int = 0
    cond_dropout: float = 0.0
    drop_condition: Optional[DropCondition] = None
    save: Optional[Callable[[Path], Path]] = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size!r} must be an integer >= 1")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout: {self.cond_dropout} must be in [0, 1)")
        if self.cond_dropout > 0 and self.drop_condition is None:
            raise ValueError("cond_dropout > 0 needs drop_condition (how to make a condition unconditional)")

    def module(self) -> nn.Module:
        return self.model

    def batch(self, step: int, micro_batch: int) -> tuple[torch.Tensor, Any, torch.Generator]:
        """Clean data (on the model's device), its condition after dropout, and the generator
        (for the objective's own noise and time draws, in that order after the batch)."""
        generator = seeded_generator(self.seed, step, micro_batch)
        x0, cond = self.sample(generator, self.batch_size)
        if self.cond_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator) < self.cond_dropout
            cond = self.drop_condition(cond, drop)
        device = next(self.model.parameters()).device
        return x0.to(device), _to(cond, device), generator

    def export(self, out_dir: Path) -> Path:
        """Writes the result with `save`, or the model's state dict as safetensors."""
        out_dir = Path(out_dir)
        if self.save is not None:
            return Path(self.save(out_dir))
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}, str(path))
        return path
