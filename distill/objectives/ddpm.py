"""DDPM epsilon-prediction pretraining (Ho et al. 2020, arXiv:2006.11239, Algorithm 1).

An integer timestep t is drawn uniformly from 0..T-1, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t)
noise, and the model predicts the noise. Conditions are dropped with probability `cond_dropout`
for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from distill.objectives._denoising import DenoisingObjective, label_dropout

__all__ = ["DDPMEpsilon", "label_dropout"]


@dataclass(kw_only=True)
class DDPMEpsilon(DenoisingObjective):
    """The epsilon loss on any noise-prediction model (see DenoisingObjective for shared fields).

    Attributes:
        epsilon: (x_t, timesteps (B,) long, condition) -> predicted noise, shaped like x_t.
        alphas_cumprod: abar_t for t = 0..T-1 (e.g. a diffusers DDPMScheduler's alphas_cumprod).
    """

    name: ClassVar[str] = "ddpm"
    epsilon: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        abar = torch.as_tensor(self.alphas_cumprod)
        if abar.ndim != 1 or len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod: must be a 1-D tensor of values in (0, 1), one per timestep")
        self.alphas_cumprod = abar

    def loss(self, step: int, micro_batch: int) -> torch.Tensor:
        """MSE between the predicted and the drawn noise at uniform integer timesteps."""
        x0, cond, generator = self.batch(step, micro_batch)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        abar = self.alphas_cumprod[timesteps].to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        prediction = self.epsilon(x_t, timesteps.to(x0.device), cond)
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())
