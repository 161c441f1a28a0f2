"""Per-origin cache adapters for `accel bench caches`: ours, cache-dit's and diffusers' caches.

Every adapter puts one cache configuration on the embedded model's transformer and takes it off
again, behind the same four calls, so the harness treats all origins alike:

* `apply(transformer, num_steps)` installs the cache for generations of `num_steps` steps;
* `before_generation(num_steps)` resets the cache's per-generation state (ours resets itself from
  the step context's generation id; cache-dit needs `refresh_context`, diffusers
  `_reset_stateful_cache`);
* `call(transformer, fn)` wraps each model call (diffusers keys its state by a `cache_context`,
  which this fills from the published step context: guidance branch, step index, sigma);
* `remove(transformer)` uninstalls it.

The anchors (cache-dit, diffusers' hooks) are optional: `cache_dit_available()` says whether the
`bench` extra is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from step_context import current_step


def cache_dit_available() -> bool:
    """True when cache-dit (the `bench` extra) is importable."""
    return importlib.util.find_spec("cache_dit") is not None


@dataclass
class Variant:
    """One benchmark configuration.

    Attributes:
        origin: "accel", "cache-dit" or "diffusers".
        method: our preset name, "euler-steps", "reference", or the anchor's method name.
        params: the swept and fixed parameters (JSON-ready).
        steps: solver steps of the generation (None: the reference's, as for every cache; fewer
            for the step baselines).
        calibrate: what the adapter needs calibrated first ("teacache", "magcache",
            "diffusers-magcache", or "steps": a placement of the K computed steps of
            params["steps"] = "calibrated K") or None.
    """

    origin: str
    method: str
    params: dict = field(default_factory=dict)
    steps: int | None = None
    calibrate: str | None = None

    @property
    def key(self) -> str:
        """A stable id for resuming: origin/method/params."""
        items = ",".join(f"{k}={self.params[k]}" for k in sorted(self.params))
        return f"{self.origin}/{self.method}/{items}/steps={self.steps}"


class Adapter:
    """No cache: the reference and the fewer-steps baselines."""

    def apply(self, transformer: torch.nn.Module, num_steps: int) -> None:
        """Installs the cache on `transformer` for generations of `num_steps` steps."""

    def before_generation(self, num_steps: int) -> None:
        """Resets per-generation state before a generation of `num_steps` steps."""

    def call(self, transformer: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Runs one model call `fn()`."""
        return fn()

    def remove(self, transformer: torch.nn.Module) -> None:
        """Uninstalls the cache."""


class AccelAdapter(Adapter):
    """Our presets: `caching.apply_cache(transformer, get_preset(method, **params))`.

    Args:
        method: preset name.
        params: preset parameters (calibrated coefficients or ratios added by the harness).
    """

    def __init__(self, method: str, params: dict) -> None:
        self.method, self.params, self.handle = method, params, None

    def apply(self, transformer: torch.nn.Module, num_steps: int) -> None:
        from caching import apply_cache, get_preset
        self.handle = apply_cache(transformer, get_preset(self.method, **self.params))

    def remove(self, transformer: torch.nn.Module) -> None:
        from caching import remove_cache
        remove_cache(transformer)
        self.handle = None


class CacheDitAdapter(Adapter):
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator) on the bare transformer.

    Our CFG runs cond then uncond as two calls per step, so cache-dit is told the CFG is separate
    (`enable_separate_cfg=True`, cond first as its default expects); each generation starts with
    `refresh_context`.

    Args:
        fn_blocks / bn_blocks: DBCache's Fn and Bn compute blocks.
        threshold: residual_diff_threshold.
        taylorseer: add `TaylorSeerCalibratorConfig(taylorseer_order=order)`.
        order: TaylorSeer order.
        warmup_steps: max_warmup_steps.
    """

    def __init__(self, fn_blocks: int, bn_blocks: int, threshold: float, taylorseer: bool,
                 order: int = 1, warmup_steps: int = 4) -> None:
        self.settings = dict(Fn_compute_blocks=fn_blocks, Bn_compute_blocks=bn_blocks,
                             residual_diff_threshold=threshold, max_warmup_steps=warmup_steps,
                             enable_separate_cfg=True)
        self.taylorseer, self.order = taylorseer, order

    def apply(self, transformer: torch.nn.Module, num_steps: int) -> None:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=self.order) if self.taylorseer else None
        self.transformer = transformer
        cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(num_inference_steps=num_steps, **self.settings),
                               calibrator_config=calibrator)

    def before_generation(self, num_steps: int) -> None:
        import cache_dit
        cache_dit.refresh_context(self.transformer, num_inference_steps=num_steps)

    def remove(self, transformer: torch.nn.Module) -> None:
        import cache_dit
        cache_dit.disable_cache(transformer)


class DiffusersAdapter(Adapter):
    """diffusers' own caches through `transformer.enable_cache(config)`.

    Args:
        kind: "fbcache", "taylorseer", "magcache" or "pab".
        params: the config's keyword arguments (mag_ratios added by the harness for MagCache).
    """

    def __init__(self, kind: str, params: dict) -> None:
        self.kind, self.params = kind, dict(params)

    def config(self, num_steps: int):
        """The diffusers cache config for generations of `num_steps` steps."""
        from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                     TaylorSeerCacheConfig)
        if self.kind == "fbcache":
            return FirstBlockCacheConfig(**self.params)
        if self.kind == "taylorseer":
            return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **self.params)
        if self.kind == "magcache":
            return MagCacheConfig(num_inference_steps=num_steps, **self.params)
        if self.kind == "pab":
            return PyramidAttentionBroadcastConfig(
                current_timestep_callback=lambda: current_step().timestep, **self.params)
        raise ValueError(f"unknown diffusers cache {self.kind!r}")

    def apply(self, transformer: torch.nn.Module, num_steps: int) -> None:
        self.transformer = transformer
        transformer.enable_cache(self.config(num_steps))

    def before_generation(self, num_steps: int) -> None:
        self.transformer._reset_stateful_cache()

    def call(self, transformer: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        step = current_step()
        with transformer.cache_context(step.branch, step_index=step.step_index,
                                       num_inference_steps=step.num_steps, timestep=step.timestep,
                                       sigma=step.sigma):
            return fn()

    def remove(self, transformer: torch.nn.Module) -> None:
        transformer.disable_cache()
        self.transformer = None


def diffusers_mag_ratios(transformer: torch.nn.Module, run_fn: Callable[[Adapter], Any],
                         num_steps: int) -> list[float]:
    """diffusers' MagCache calibration (`calibrate=True`) of the transformer, cond branch.

    Args:
        transformer: the bare transformer.
        run_fn: `run_fn(adapter)` runs one generation of `num_steps` steps through the adapter.
        num_steps: the generation's steps.

    Returns:
        The `num_steps` magnitude ratios diffusers prints at the end of the calibrated run.
    """
    adapter = DiffusersAdapter("magcache", {"calibrate": True})
    adapter.apply(transformer, num_steps)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_fn(adapter)
    finally:
        adapter.remove(transformer)
    lists = re.findall(r"\[([0-9eE.,\s+-]+)\]", printed.getvalue())
    if not lists:
        raise RuntimeError("diffusers' MagCache calibration printed no ratios")
    return [float(v) for v in lists[0].split(",") if v.strip()]


def make_adapter(variant: Variant, calibration: dict | None = None) -> Adapter:
    """The adapter of a variant.

    Args:
        variant: the configuration.
        calibration: parameters the harness calibrated for it (TeaCache coefficients, MagCache
            ratios), merged into its parameters; kept out of the record.
    """
    params = {**variant.params, **(calibration or {})}
    if variant.origin == "accel" and variant.method not in ("reference", "euler-steps"):
        return AccelAdapter(variant.method, params)
    if variant.origin == "cache-dit":
        p = params
        return CacheDitAdapter(p["Fn"], p["Bn"], p["threshold"], p["taylorseer"], p.get("order", 1),
                               p.get("warmup_steps", 4))
    if variant.origin == "diffusers":
        return DiffusersAdapter(DIFFUSERS_KINDS[variant.method], params)
    return Adapter()


DIFFUSERS_KINDS = {"FirstBlockCache": "fbcache", "TaylorSeerCache": "taylorseer", "MagCache": "magcache",
                   "PyramidAttentionBroadcast": "pab"}
