"""Other projects' caches as lab configurations of `accel bench caches`: cache-dit and diffusers.

Each anchor is installed on the pipeline the way its own documentation shows, through the lab's
`Configuration.install` (a context manager factory taking the pipeline), and removed after:

* cache-dit 1.5.3 (the optional `bench` extra): `cache_dit.enable_cache(pipe, cache_config=
  DBCacheConfig(...), calibrator_config=...)` on the whole pipeline, `cache_dit.disable_cache(pipe)`.
  Its step masks come from `cache_dit.steps_mask(mask_policy=..., total_steps=...)`; the embedded
  pipeline evaluates cond then uncond as two transformer calls, so `enable_separate_cfg=True`.
* diffusers' own caches: `pipe.transformer.enable_cache(config)` / `disable_cache()`; the pipeline
  names each call with `cache_context("cond" | "uncond")` as FluxPipeline does.

`identity` of an anchor (part of its record's fingerprint) names the package version and the config.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

CALIBRATORS = ("taylorseer", "foca")


def cache_dit_available() -> bool:
    """True when cache-dit (the `bench` extra) is importable."""
    return importlib.util.find_spec("cache_dit") is not None


@dataclass(frozen=True)
class Anchor:
    """One configuration of another project's cache.

    Attributes:
        origin: "cache-dit" or "diffusers".
        method: a short name ("DBCache F1B0", "SCM fast", "TaylorSeerCache", ...).
        params: what is set, JSON-ready (the record's params).
        install: context manager factory taking the pipeline.
    """

    origin: str
    method: str
    params: dict = field(default_factory=dict)
    install: Callable[[Any], Any] | None = None

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.origin}: {self.method}" + (f" ({shown})" if shown else "")

    def identity(self) -> dict:
        from importlib import metadata

        package = "cache-dit" if self.origin == "cache-dit" else "diffusers"
        return {"origin": self.origin, "method": self.method, "params": self.params,
                "version": metadata.version(package)}


def _quiet_cache_dit() -> None:
    logging.getLogger("CACHE_DIT").setLevel(logging.ERROR)


def cache_dit_anchor(method: str, steps: int, *, fn_blocks: int = 1, threshold: float = 0.12,
                     mask_policy: str | None = None, static: bool = False, calibrator: str | None = None,
                     order: int = 1, max_continuous: int = 3, warmup: int = 8) -> Anchor:
    """cache-dit's DBCache, optionally with a step mask (`steps_mask` policy, "static": the mask alone
    decides, "dynamic": the residual threshold decides inside the mask's cached steps) and a
    TaylorSeer (order 1 or 2) or FoCa calibrator.

    Defaults follow cache-dit's examples: F1B0, threshold 0.12, 8 warm-up steps, at most 3 cached
    steps in a row.
    """
    params = {"Fn": fn_blocks, "threshold": threshold, "warmup": warmup, "max_continuous": max_continuous}
    if mask_policy is not None:
        params.update(mask=mask_policy, policy="static" if static else "dynamic")
    if calibrator is not None:
        params["calibrator"] = calibrator + (f" {order}" if calibrator == "taylorseer" else "")

    @contextlib.contextmanager
    def install(pipe: Any) -> Iterator[None]:
        import cache_dit
        from cache_dit import DBCacheConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

        _quiet_cache_dit()
        mask = cache_dit.steps_mask(total_steps=steps, mask_policy=mask_policy) if mask_policy else None
        config = DBCacheConfig(Fn_compute_blocks=fn_blocks, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                               max_warmup_steps=warmup, max_continuous_cached_steps=max_continuous,
                               enable_separate_cfg=True, num_inference_steps=steps, steps_computation_mask=mask,
                               steps_computation_policy="static" if static else "dynamic")
        chosen = {None: None, "taylorseer": lambda: TaylorSeerCalibratorConfig(taylorseer_order=order),
                  "foca": FoCaCalibratorConfig}[calibrator]
        patched = _instance_forwards(pipe.transformer)
        cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=chosen() if chosen else None)
        try:
            yield
        finally:
            cache_dit.disable_cache(pipe)
            _restore_instance_forwards(pipe.transformer, patched)

    return Anchor("cache-dit", method, params, install)


def _instance_forwards(model: torch.nn.Module) -> dict[str, Any]:
    """Every submodule's instance-level `forward` and `_is_patched` (cache-dit's patch functors set
    both on FLUX's transformer and blocks, and `disable_cache` leaves them: the next configuration
    would run cache-dit's forward)."""
    return {name: {key: vars(module)[key] for key in ("forward", "_is_patched") if key in vars(module)}
            for name, module in model.named_modules()}


def _restore_instance_forwards(model: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Puts back what `_instance_forwards` saw: patched attributes that were not there are removed."""
    for name, module in model.named_modules():
        before = saved.get(name, {})
        for key in ("forward", "_is_patched"):
            if key in before:
                setattr(module, key, before[key])
            else:
                vars(module).pop(key, None)


def diffusers_config(kind: str, params: dict, steps: int, timestep: Callable[[], float]) -> Any:
    """The diffusers cache config of `kind` ("FirstBlockCache", "TaylorSeerCache", "MagCache",
    "PyramidAttentionBroadcast") with `params`."""
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)

    if kind == "FirstBlockCache":
        return FirstBlockCacheConfig(**params)
    if kind == "TaylorSeerCache":
        return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **params)
    if kind == "MagCache":
        return MagCacheConfig(num_inference_steps=steps, **params)
    if kind == "PyramidAttentionBroadcast":
        return PyramidAttentionBroadcastConfig(current_timestep_callback=timestep, **params)
    raise ValueError(f"unknown diffusers cache {kind!r}")


@contextlib.contextmanager
def _diffusers_installed(pipe: Any, kind: str, params: dict, steps: int) -> Iterator[None]:
    """`transformer.enable_cache(config)` for the context. PAB reads the timestep of the current call
    (the transformer's `timestep` argument, in diffusers' 0-1000 units) through a forward pre-hook."""
    transformer = pipe.transformer
    current = {"t": 1000.0}

    def note(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep")
        if timestep is not None:
            current["t"] = float(timestep.reshape(-1)[0]) * 1000.0

    handle = transformer.register_forward_pre_hook(note, with_kwargs=True)
    transformer.enable_cache(diffusers_config(kind, params, steps, lambda: current["t"]))
    try:
        yield
    finally:
        transformer.disable_cache()
        handle.remove()


def diffusers_anchor(kind: str, steps: int, params: dict, shown: dict | None = None) -> Anchor:
    """One of diffusers' caches; `shown` replaces `params` in the label (e.g. without MagCache's ratios)."""
    return Anchor("diffusers", kind, dict(shown if shown is not None else params),
                  lambda pipe: _diffusers_installed(pipe, kind, dict(params), steps))


def diffusers_mag_ratios(pipe: Any, run: Callable[[], Any], steps: int) -> list[float]:
    """diffusers' MagCache calibration (`calibrate=True`): one full run of `steps` steps (`run()`),
    whose printed magnitude ratios (cond branch) are returned."""
    printed = io.StringIO()
    with _diffusers_installed(pipe, "MagCache", {"calibrate": True}, steps), contextlib.redirect_stdout(printed):
        run()
    lists = re.findall(r"\[([0-9eE.,\s+-]+)\]", printed.getvalue())
    if not lists:
        raise RuntimeError("diffusers' MagCache calibration printed no ratios")
    return [float(v) for v in lists[0].split(",") if v.strip()]
