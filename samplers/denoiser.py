"""The Denoiser contract: one call shape for every model, with its parameterisation declared.

A *model function* is `model_fn(x, sigma, **cond) -> raw prediction` where `sigma` (B,) is the
model's own noise-level variable (flow time t in [0, 1] for flow models). A `Denoiser` wraps it
with the declared prediction type and noise schedule and returns the data prediction x0, the
form every sampler consumes (k-diffusion's D(x, sigma)).

The forward process is x = alpha(sigma) * x0 + s(sigma) * eps. The conversions below are the
closed-form adapters between parameterisations, named `a_to_b`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

PREDICTION_TYPES = ("flow", "epsilon", "v", "x0")


class NoiseSchedule(Protocol):
    """Maps a model's noise-level variable to the forward-process coefficients."""

    name: str

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (alpha, s) with x = alpha * x0 + s * eps at noise level `sigma`."""

    def lambda_to_sigma(self, lam: torch.Tensor) -> torch.Tensor:
        """The noise level whose log-SNR log(alpha / s) is `lam` (the inverse map)."""


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (FLUX, SD3, Wan): x_t = (1 - t) x0 + t eps; the variable is t in [0, 1]."""

    name: str = "flow"
    num_train_timesteps: int = 1000

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - sigma, sigma

    def lambda_to_sigma(self, lam: torch.Tensor) -> torch.Tensor:
        """t = 1 / (1 + e^lambda); lambda = -inf gives t = 1 (pure noise)."""
        return torch.sigmoid(-lam)


@dataclass(frozen=True)
class VPSchedule:
    """Variance-preserving (DDPM) schedule, parameterised by the VE noise level.

    The variable is sigma_ve = sqrt((1 - abar) / abar); alpha = 1 / sqrt(1 + sigma_ve^2) and
    s = sigma_ve * alpha (Karras et al. 2022, Table 1, VP column).
    """

    alphas_cumprod: torch.Tensor = field(repr=False)
    name: str = "vp"

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = (1 + sigma**2).rsqrt()
        return alpha, sigma * alpha

    def lambda_to_sigma(self, lam: torch.Tensor) -> torch.Tensor:
        """sigma_ve = e^-lambda."""
        return torch.exp(-lam)

    @property
    def train_sigmas(self) -> torch.Tensor:
        """VE noise levels of the training timesteps 0..T-1 (increasing)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous DDPM timestep for a VE sigma, interpolating log-sigma (k-diffusion style)."""
        log_sigmas = self.train_sigmas.log().to(sigma.device)
        log_sigma = sigma.clamp(min=1e-10).log()
        index = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
        low, high = log_sigmas[index - 1], log_sigmas[index]
        weight = ((log_sigma.reshape(-1) - low) / (high - low)).clamp(0, 1)
        return (index - 1 + weight).reshape(sigma.shape)


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = (x - s * eps) / alpha."""
    return (x - _expand(sigma, x) * eps) / _expand(alpha, x)


def x0_to_eps(x0: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = (x - alpha * x0) / s."""
    return (x - _expand(alpha, x) * x0) / _expand(sigma, x)


def v_to_x0(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = alpha * x - s * v for v = alpha * eps - s * x0 (Salimans & Ho 2022), alpha^2 + s^2 = 1."""
    return _expand(alpha, x) * x - _expand(sigma, x) * v


def velocity_to_x0(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow matching: velocity = eps - x0 and x = (1 - t) x0 + t eps give x0 = x - t * velocity."""
    return x - _expand(t, x) * velocity


def x0_to_velocity(x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow matching: velocity = (x - x0) / t."""
    return (x - x0) / _expand(t, x)


def prediction_to_x0(prediction: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                     prediction_type: str, schedule: NoiseSchedule) -> torch.Tensor:
    """Converts any declared parameterisation to the data prediction x0."""
    if prediction_type == "x0":
        return prediction
    if prediction_type == "flow":
        return velocity_to_x0(prediction, x, sigma)
    alpha, s = schedule.alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return eps_to_x0(prediction, x, alpha, s)
    if prediction_type == "v":
        return v_to_x0(prediction, x, alpha, s)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


@dataclass
class Denoiser:
    """D(x, sigma, **cond) -> x0 for a model of any parameterisation.

    Args:
        model_fn: `model_fn(x, sigma, **cond)` returning the raw prediction, x (B, ...) and sigma (B,).
        prediction_type: one of PREDICTION_TYPES.
        schedule: the model's noise schedule (FlowSchedule for "flow").
    """

    model_fn: Callable[..., torch.Tensor]
    prediction_type: str
    schedule: Any = field(default_factory=FlowSchedule)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; "
                             f"expected one of {PREDICTION_TYPES}")
        if self.prediction_type == "flow" and not isinstance(self.schedule, FlowSchedule):
            raise ValueError("prediction_type 'flow' needs a FlowSchedule")

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.alpha_sigma(sigma)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """The model's own prediction, unconverted."""
        return self.model_fn(x, _batch_sigma(sigma, x), **cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x)
        return prediction_to_x0(self.model_fn(x, sigma, **cond), x, sigma, self.prediction_type, self.schedule)


def _batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype).to(x.device, non_blocking=True)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
