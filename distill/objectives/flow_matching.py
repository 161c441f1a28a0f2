"""Rectified-flow (flow-matching) pretraining: the velocity objective of SD3 and FLUX.

x_t = (1 - t) x0 + t noise, and the model predicts the velocity noise - x0 (Liu et al. 2022,
arXiv:2209.03003; Lipman et al. 2022, arXiv:2210.02747). Times are drawn logit-normal and shifted
towards the noise end, t = s u / (1 + (s - 1) u) with u = sigmoid(N(0, 1)) (Esser et al. 2024,
arXiv:2403.03206, the SD3 / FLUX recipe). Conditions are dropped with probability `cond_dropout`
so that one model serves both branches of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from distill.objectives._denoising import DenoisingObjective, label_dropout

__all__ = ["FlowMatching", "shifted_logit_normal", "label_dropout"]


def shifted_logit_normal(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """t = shift * u / (1 + (shift - 1) u) with u = sigmoid(N(0, 1)); shift 1 is plain logit-normal."""
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


@dataclass(kw_only=True)
class FlowMatching(DenoisingObjective):
    """The flow-matching loss on any velocity model (see DenoisingObjective for shared fields).

    Attributes:
        velocity: (x_t, t (B,), condition) -> predicted velocity, shaped like x_t.
        time_shift: the shift s of the logit-normal time samples (1 = none; FLUX uses about 3).
    """

    name: ClassVar[str] = "flow-matching"
    velocity: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    time_shift: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.time_shift > 0:
            raise ValueError(f"time_shift: {self.time_shift} must be > 0")

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        """MSE between the predicted and the true velocity noise - x0 at shifted logit-normal t."""
        x0, cond, generator = self.batch(step, micro_batch)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = shifted_logit_normal(x0.shape[0], self.time_shift, generator).to(x0.device)
        t_ = t.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_) * x0 + t_ * noise
        return torch.nn.functional.mse_loss(self.velocity(x_t, t, cond).float(), (noise - x0).float())
