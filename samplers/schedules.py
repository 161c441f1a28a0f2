"""Noise-level schedules: separate `get_sigmas_*` functions, each returning a decreasing CPU
float32 tensor of num_steps + 1 values ending in 0 (the sampler's walk), in the model's own
variable: flow time t for flow models, the VE sigma sqrt((1 - abar) / abar) for VP models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from samplers.denoiser import VPSchedule


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}; ask for at least one step")


def _append_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.to(torch.float64), values.new_zeros(1, dtype=torch.float64)]).to(torch.float32)


def _check_range(low: float, high: float, what: str) -> None:
    if not 0 < low < high:
        raise ValueError(f"{what}: need 0 < min < max, got min={low}, max={high}")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static time shift: t' = shift * t / (1 + (shift - 1) * t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas_flow(num_steps: int, shift: float = 1.0, t_max: float = 1.0) -> torch.Tensor:
    """Uniform flow times from t_max to 0, optionally shifted (shift=1 keeps them uniform)."""
    _check_steps(num_steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_time(t, shift).to(torch.float32)


def get_sigmas_sd3(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's static shift 3 of uniform times 1, 1 - 1/N, ..., 1/N, 0 (Esser et al. 2024, arXiv:2403.03206).

    diffusers' SD3 default instead spaces N times down to the shifted training minimum (~0.003),
    which spends the last step below t = 0.01; these are the times FluxPipeline passes.
    """
    return get_sigmas_flow(num_steps, shift=shift)


def flux_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's shift mu, linear in the number of image tokens between (base, base_shift) and (max, max_shift)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + slope * (image_seq_len - base_image_seq_len)


def get_sigmas_flux(num_steps: int, mu: float | None = None, image_seq_len: int = 256,
                    base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """FLUX's resolution-dependent shift t' = e^mu / (e^mu + 1/t - 1) of uniform times (BFL 2024).

    `mu` defaults to `flux_mu(image_seq_len, ...)`; pipelines pass it directly.
    """
    _check_steps(num_steps)
    if mu is None:
        mu = flux_mu(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(math.exp(mu) / (math.exp(mu) + (1 / t - 1)))


def get_sigmas_karras(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022, eq. 5) VE sigmas: uniform in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max, "karras sigmas")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((high + ramp * (low - high)) ** rho)


def get_sigmas_logsnr(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """VE sigmas uniform in log-SNR lambda = -log sigma (Lu et al. 2022, DPM-Solver "logSNR"), then 0."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max, "log-SNR sigmas")
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps,
                                       dtype=torch.float64).exp())


def _ve_to_flow(sigmas: torch.Tensor) -> torch.Tensor:
    """Maps VE sigmas to flow times with the same log-SNR: t = sigma / (1 + sigma)."""
    sigmas = sigmas.to(torch.float64)
    return (sigmas / (1 + sigmas)).to(torch.float32)


def get_sigmas_flow_karras(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                           rho: float = 7.0) -> torch.Tensor:
    """Karras spacing for flow models: Karras VE sigmas mapped to t = sigma / (1 + sigma) (equal log-SNR)."""
    return _ve_to_flow(get_sigmas_karras(num_steps, sigma_min, sigma_max, rho))


def get_sigmas_flow_logsnr(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform log-SNR for flow models: lambda = log((1 - t) / t) uniform, t in [t(sigma_min), t(sigma_max)]."""
    return _ve_to_flow(get_sigmas_logsnr(num_steps, sigma_min, sigma_max))


def _vp_range(schedule: VPSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    train = schedule.train_sigmas
    return (float(train[0]) if sigma_min is None else sigma_min,
            float(train[-1]) if sigma_max is None else sigma_max)


def get_sigmas_vp_karras(num_steps: int, schedule: VPSchedule, rho: float = 7.0,
                         sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """Karras sigmas over the VP model's trained range (defaults) (Karras et al. 2022, eq. 5)."""
    return get_sigmas_karras(num_steps, *_vp_range(schedule, sigma_min, sigma_max), rho=rho)


def get_sigmas_vp_logsnr(num_steps: int, schedule: VPSchedule, sigma_min: float | None = None,
                         sigma_max: float | None = None) -> torch.Tensor:
    """Uniform log-SNR over the VP model's trained range (Lu et al. 2022, arXiv:2206.00927)."""
    return get_sigmas_logsnr(num_steps, *_vp_range(schedule, sigma_min, sigma_max))


def get_sigmas_vp_timestep(num_steps: int, schedule: VPSchedule) -> torch.Tensor:
    """Uniform ("trailing") DDPM timesteps T-1, T-1-T/N, ... (Lin et al. 2024, arXiv:2305.08891, Tab. 2), then 0."""
    _check_steps(num_steps)
    total = schedule.num_train_timesteps
    timesteps = total - 1 - torch.arange(num_steps, dtype=torch.float64) * (total / num_steps)
    log_sigmas = schedule.train_sigmas.to(torch.float64).log()
    low = timesteps.floor().long().clamp(0, total - 1)
    high = (low + 1).clamp(max=total - 1)
    weight = timesteps - low
    return _append_zero(((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp())


def vp_schedule_from_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012, beta_schedule: str = "scaled_linear") -> VPSchedule:
    """A VPSchedule from DDPM betas: "linear", "scaled_linear" (SD) or "squaredcos_cap_v2" (cosine)."""
    steps = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use 'linear', 'scaled_linear' "
                         "or 'squaredcos_cap_v2'")
    return VPSchedule(alphas_cumprod=torch.cumprod(1 - betas, 0).to(torch.float32))


OPTIMIZED_FORMAT = "accel-optimized-schedule/1"


@dataclass(frozen=True)
class OptimizedSchedule:
    """A schedule chosen by `samplers.optimized.optimize_schedule` for one solver and NFE budget.

    Attributes:
        sigmas: the N + 1 noise levels, decreasing, ending in 0.
        solver: the solver it was optimised for.
        nfe: the model evaluations it was optimised for.
        family: "flow" or "vp", the noise schedule family of the model.
        error: calibration MSE against the fine-step reference.
        initial_error: the same for the schedule the search started from.
        initial_schedule: the name of that starting schedule.
        reference: how the reference was made ({"solver": ..., "steps": ...}).
        solver_options: solver options calibrated with the walk, e.g. {"compensation": [...]}
            (samplers.compensation); `samplers.sample` and AccelScheduler apply them with it.
    """

    sigmas: list[float]
    solver: str
    nfe: int
    family: str
    error: float
    initial_error: float
    initial_schedule: str
    reference: dict = field(default_factory=dict)
    solver_options: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def tensor(self) -> torch.Tensor:
        """The schedule as a CPU float32 tensor (N + 1,)."""
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def save(self, path: str | Path) -> Path:
        """Writes the schedule as a small JSON file (atomically) and returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": OPTIMIZED_FORMAT, **asdict(self)}, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OptimizedSchedule":
        """Reads a file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no optimised schedule at {path}; create it with "
                             "samplers.optimized.optimize_schedule(...).save(path)")
        data = json.loads(path.read_text())
        if data.pop("format", None) != OPTIMIZED_FORMAT:
            raise ValueError(f"{path} is not an optimised schedule ({OPTIMIZED_FORMAT}); recreate it")
        return cls(**data)


def get_sigmas_optimized(num_steps: int, schedule=None, *, path: str | Path, solver: str | None = None) -> torch.Tensor:
    """A schedule optimised for (solver, steps) on calibration samples, loaded from its JSON file.

    Args:
        num_steps: must equal the steps it was optimised for.
        schedule: the model's noise schedule; its family must match the file's.
        path: the JSON file written by `OptimizedSchedule.save`.
        solver: if given, must be the solver it was optimised for.
    """
    _check_steps(num_steps)
    stored = OptimizedSchedule.load(path)
    if stored.num_steps != num_steps:
        raise ValueError(f"{path} was optimised for {stored.num_steps} steps, not {num_steps}; "
                         f"use {stored.num_steps} steps or optimise a schedule for {num_steps}")
    if solver is not None and solver != stored.solver:
        raise ValueError(f"{path} was optimised for solver {stored.solver!r}, not {solver!r}; "
                         "use that solver or optimise a schedule for this one")
    family = getattr(schedule, "name", stored.family)
    if family != stored.family:
        raise ValueError(f"{path} is a {stored.family} schedule but the model is {family}; "
                         "optimise a schedule for this model")
    return stored.tensor()


def optimized_solver_options(schedule: str, options: dict | None) -> dict:
    """The solver options stored with an optimised schedule file ({} for any other schedule)."""
    if schedule != "optimized" or not options or "path" not in options:
        return {}
    return dict(OptimizedSchedule.load(options["path"]).solver_options)
