"""The walk of a pipeline's own diffusers scheduler, as noise levels of the model (`schedule="auto"`).

A pipeline computes its schedule through its scheduler: `set_timesteps(num_inference_steps,
device, sigmas, mu, timesteps)` with the arguments it derives from the scheduler's config (FLUX's
`mu` from the image size, CogView4's timesteps, Mochi's linear-quadratic sigmas) and the config's
own shift settings (`shift`, `flow_shift`, `shift_terminal`, `time_shift_type`, timestep spacing,
Karras sigmas ...). Rather than re-derive each of them, `native_walk` builds a fresh scheduler of
the pipeline's class from its saved config, calls its `set_timesteps` with exactly those arguments,
and converts the result to the levels a solver walks: flow time t for flow models (the native
sigmas), the VE sigma sqrt((1 - abar) / abar) of the native timesteps for VP models. The native
timesteps travel with the walk, so the model sees exactly the timesteps it would see natively.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from samplers.denoiser import FlowSchedule

# Keys of a scheduler config that say how its walk is spaced, in the order `describe_native` names them.
_SIGMA_KINDS = {"use_karras_sigmas": "karras sigmas", "use_exponential_sigmas": "exponential sigmas",
                "use_beta_sigmas": "beta sigmas", "use_lu_lambdas": "uniform log-SNR (Lu lambdas)"}


@dataclass(frozen=True)
class NativeWalk:
    """A native scheduler's walk in the model's own noise variable.

    Attributes:
        sigmas: (N + 1,) float32 CPU, strictly decreasing, ending at 0: the levels of the N
            model evaluations of the native walk, then the end.
        timesteps: (N,) float32 CPU: the native timesteps of those N evaluations, as the pipeline
            passes them to the model.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor


def native_class(config: Mapping | None) -> type | None:
    """The diffusers scheduler class named by `config["_class_name"]`, or None if there is none."""
    if not config:
        return None
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if isinstance(cls, type) and callable(getattr(cls, "set_timesteps", None)) and hasattr(cls, "from_config"):
        return cls
    return None


def _without_private(config: Mapping) -> dict:
    return {key: value for key, value in config.items() if key == "_class_name" or not key.startswith("_")}


def _set_timesteps_arguments(cls: type, num_inference_steps: int | None, sigmas, mu, timesteps) -> dict:
    """The arguments the pipeline passed, limited to those the native `set_timesteps` accepts."""
    accepted = inspect.signature(cls.set_timesteps).parameters
    passed = {"sigmas": sigmas, "mu": mu, "timesteps": timesteps}
    arguments = {k: v for k, v in passed.items() if v is not None and k in accepted}
    if num_inference_steps is None and not {"sigmas", "timesteps"} & set(arguments):
        given = sigmas if sigmas is not None else timesteps
        num_inference_steps = None if given is None else len(given)
    if num_inference_steps is not None:
        arguments["num_inference_steps"] = num_inference_steps
    return arguments


def _flat(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _vp_sigmas(timesteps: np.ndarray, schedule) -> np.ndarray:
    """VE sigmas of (fractional) DDPM timesteps, interpolating the training log-sigmas."""
    log_sigmas = schedule.train_sigmas.to(torch.float64).log().numpy()
    return np.exp(np.interp(timesteps, np.arange(len(log_sigmas)), log_sigmas))


def native_walk(config: Mapping, schedule, *, num_inference_steps: int | None = None, sigmas=None,
                mu: float | None = None, timesteps=None) -> NativeWalk:
    """Runs the native scheduler's `set_timesteps` and returns its walk in the model's variable.

    Consecutive repeated evaluations (PNDM's PLMS warm-up, Heun schedulers' corrector) are one
    level. Flow models take the native sigmas (1 - sigma where the config inverts them, as Mochi's
    does); VP models take the VE sigma of each native timestep through the model's training alphas.

    Args:
        config: the native scheduler's full config, with `_class_name`.
        schedule: the model's noise schedule (FlowSchedule or VPSchedule).
        num_inference_steps, sigmas, mu, timesteps: what the pipeline passed to set_timesteps.

    Returns:
        The walk and the native timesteps of its evaluations.

    Raises:
        ValueError: the native scheduler refuses the arguments, or its walk is not a decreasing
            walk of the model's noise variable.
    """
    cls = native_class(config)
    name = config.get("_class_name")
    if cls is None:
        raise ValueError(f"schedule 'auto' follows the pipeline's scheduler, but {name!r} is not a diffusers "
                         "scheduler; use a named schedule (flow, flux, karras, ...)")
    native = cls.from_config(_without_private(config))
    try:
        native.set_timesteps(**_set_timesteps_arguments(cls, num_inference_steps, sigmas, mu, timesteps))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name}.set_timesteps: {str(error).splitlines()[0]}") from None
    times = _flat(native.timesteps)
    if isinstance(schedule, FlowSchedule):
        native_sigmas = getattr(native, "sigmas", None)
        levels = (times / schedule.num_train_timesteps if native_sigmas is None
                  else _flat(native_sigmas)[:len(times)])
        if config.get("invert_sigmas"):
            levels = 1.0 - levels
    else:
        top = schedule.num_train_timesteps - 1
        if config.get("timestep_type") == "continuous" or (len(times) and (times.min() < 0 or times.max() > top)):
            raise ValueError(f"{name}'s timesteps {times.tolist()} are not DDPM timesteps in [0, {top}]; "
                             "use a named schedule (karras, logsnr, timestep)")
        levels = _vp_sigmas(times, schedule)
    keep = np.ones(len(times), dtype=bool)
    keep[1:] = (times[1:] != times[:-1]) | (levels[1:] != levels[:-1])
    times, levels = times[keep], levels[keep]
    walk = torch.cat([torch.from_numpy(levels), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    ok = len(walk) >= 2 and bool((walk[1:] < walk[:-1]).all()) and float(walk[-1]) >= 0
    if not ok or (isinstance(schedule, FlowSchedule) and float(walk[0]) > 1):
        raise ValueError(f"{name} gives the walk {[round(v, 6) for v in walk.tolist()]}, not a strictly "
                         f"decreasing {schedule.name} walk; use a named schedule (flow, karras, ...)")
    return NativeWalk(walk, torch.from_numpy(times).to(torch.float32))


def _value(config: Mapping, key: str) -> str:
    value = config.get(key)
    return str(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _flow_parts(config: Mapping) -> list[str]:
    parts = []
    if config.get("use_dynamic_shifting"):
        parts.append("dynamic shift (mu from the image size)"
                     + (", linear time shift" if config.get("time_shift_type") == "linear" else ""))
    elif config.get("use_flow_sigmas") and config.get("flow_shift") is not None:
        parts.append(f"flow_shift {_value(config, 'flow_shift')}")
    elif config.get("shift") not in (None, 1, 1.0):
        parts.append(f"shift {_value(config, 'shift')}")
    else:
        parts.append("no shift")
    if config.get("shift_terminal"):
        parts.append(f"shift_terminal {_value(config, 'shift_terminal')}")
    if config.get("invert_sigmas"):
        parts.append("inverted sigmas (the model's t = 0 is noise)")
    return parts


def _vp_parts(config: Mapping) -> list[str]:
    parts = []
    if config.get("timestep_spacing"):
        parts.append(f"{config['timestep_spacing']} spacing")
    if config.get("steps_offset"):
        parts.append(f"steps_offset {config['steps_offset']}")
    return parts


def describe_native(config: Mapping, family: str) -> str:
    """The native walk in words, from the config's salient keys.

    E.g. "flow, shift 3.0 (from the pipeline's FlowMatchEulerDiscreteScheduler)" or
    "vp, karras sigmas, leading spacing (from the pipeline's EulerDiscreteScheduler)".
    """
    cls = native_class(config)
    if cls is not None:  # with the class's defaults for the keys the config leaves out
        config = {**cls.from_config(_without_private(config)).config, "_class_name": config["_class_name"]}
    parts = _flow_parts(config) if family == "flow" else []
    kinds = [text for key, text in _SIGMA_KINDS.items() if config.get(key)]
    parts += kinds
    if family != "flow" and not kinds:  # spacing and offset only matter to timestep-spaced walks
        parts += _vp_parts(config)
    return f"{family}, {', '.join(parts) or 'default spacing'} (from the pipeline's {config.get('_class_name')})"


def values_key(values) -> tuple | None:
    """A hashable copy of the sigmas or timesteps a pipeline passed (None stays None)."""
    if values is None:
        return None
    return tuple(torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1).tolist())


def given_count(sigmas, timesteps) -> int | None:
    """How many steps sigmas or timesteps passed by a pipeline ask for (a trailing 0 is the end)."""
    given = sigmas if sigmas is not None else timesteps
    if given is None:
        return None
    values = torch.as_tensor(given, dtype=torch.float64).detach().cpu().reshape(-1)
    return len(values) - int(len(values) > 1 and float(values[-1]) == 0)
