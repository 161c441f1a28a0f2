"""Applying a cache policy to a model and removing it.

`apply_cache(model, config)` resolves the model's block layout, checks that the policy fits the
model, installs the scope's hooks and the model-level hook through diffusers' HookRegistry and
returns a `CacheHandle` (statistics, reset, removal). `remove_cache(model)` uninstalls every hook
and deletes what installing added, so the model computes bitwise what it computed before.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch

from .config import CacheConfig
from .hooks import InstalledHook, install_hook, uninstall_hooks
from .layouts import get_model_layout
from .parallel import context_parallel_group
from .runtime import CacheModelHook, CacheRuntime
from .scopes import SCOPE_INSTALLERS
from .stats import CacheStats

logger = logging.getLogger("caching")
_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, CacheHandle]" = weakref.WeakKeyDictionary()


class CacheHandle:
    """An applied cache: its runtime, statistics and hooks.

    Attributes:
        model: the cached model.
        config: the policy as applied (a copy; calibration fills in its trigger).
        runtime: the per-model runtime (branch states, call frames).
    """

    def __init__(self, model: torch.nn.Module, runtime: CacheRuntime, installed: list[InstalledHook]) -> None:
        self.model = model
        self.runtime = runtime
        self.config = runtime.config
        self._installed = installed

    @property
    def stats(self) -> CacheStats:
        """Per-run statistics (steps, blocks and tokens computed, FLOPs, cache memory)."""
        return self.runtime.stats

    @property
    def num_hooks(self) -> int:
        return len(self._installed)

    def reset(self) -> None:
        """Drops every branch state (the next call starts a fresh cache)."""
        self.runtime.stats.flush()
        self.runtime.states.clear()

    def remove(self) -> None:
        """Same as remove_cache(self.model)."""
        remove_cache(self.model)

    def describe(self) -> dict[str, Any]:
        """The applied policy, JSON-ready."""
        return {"model": type(self.model).__name__, **self.config.describe()}


def _check_fits(model: torch.nn.Module, config: CacheConfig) -> None:
    layout = get_model_layout(model)
    scope = config.scope
    if layout.kind not in scope.model_kinds:
        hint = ("use the 'deep_branch' scope (preset 'deepcache') for UNets" if layout.kind == "unet"
                else f"use a scope made for {layout.kind} models")
        raise ValueError(f"scope '{scope.name}' cannot be provided by {type(model).__name__} "
                         f"(a {layout.kind}); {hint}")
    trigger = config.trigger
    if trigger.needs_calibration and trigger.name == "magcache" and scope.name not in ("residual", "blocks",
                                                                                      "deep_branch"):
        raise ValueError(f"MagCache calibrates on a block-range residual or a UNet deep feature, not on scope "
                         f"'{scope.name}'; pass ratios=calibrate_magcache(model, run_fn).ratios")
    if context_parallel_group(model) is not None:
        if trigger.needs_calibration:
            raise ValueError(f"{trigger.name} would calibrate on each rank's token shard of the context-parallel "
                             f"{type(model).__name__}; calibrate on one process (caching.calibrate_{trigger.name}) "
                             "and pass the result")
        if scope.name == "tokens":
            raise ValueError(f"the tokens scope ranks tokens within each rank's shard of the context-parallel "
                             f"{type(model).__name__}; use a block or attention scope")
    if type(scope) not in SCOPE_INSTALLERS:
        raise ValueError(f"scope {type(scope).__name__} has no installer; register it in "
                         "caching.scopes.SCOPE_INSTALLERS")


def apply_cache(model: torch.nn.Module, config: CacheConfig) -> CacheHandle:
    """Applies `config` to `model` (a supported diffusers transformer or UNet).

    Args:
        model: the denoiser network (e.g. FluxTransformer2DModel), not a pipeline.
        config: a CacheConfig, e.g. from `get_preset`.

    Returns:
        The handle of the applied cache.

    Raises:
        ValueError: the model already has a cache, has no block layout, or cannot provide the
            policy's scope.
    """
    if not isinstance(config, CacheConfig):
        raise ValueError(f"apply_cache needs a CacheConfig (e.g. caching.get_preset('fbcache')), got "
                         f"{type(config).__name__}")
    if model in _HANDLES:
        raise ValueError(f"{type(model).__name__} already has a cache ({_HANDLES[model].config.name}); "
                         "call caching.remove_cache(model) first")
    _check_fits(model, config)
    config = copy.deepcopy(config)
    layout = get_model_layout(model)
    runtime = CacheRuntime(config, type(model).__name__)
    runtime.watch_parallelism(model)
    installed: list[InstalledHook] = []
    try:
        installed += SCOPE_INSTALLERS[type(config.scope)](runtime, model, layout, config.scope)
        installed.append(install_hook(model, CacheModelHook(runtime), "model"))
    except Exception:
        uninstall_hooks(installed)
        raise
    _invalidate_diffusers_cache(model)
    handle = CacheHandle(model, runtime, installed)
    _HANDLES[model] = handle
    logger.info("applied %s to %s (%d hooks)", config.name, type(model).__name__, len(installed))
    return handle


def _invalidate_diffusers_cache(model: torch.nn.Module) -> None:
    """Drops diffusers' cached list of child hook registries, which hook changes make stale."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def remove_cache(model: torch.nn.Module) -> None:
    """Removes the cache applied to `model`, restoring it exactly (logs if there is none)."""
    handle = _HANDLES.pop(model, None)
    if handle is None:
        logger.warning("%s has no cache applied; nothing to remove", type(model).__name__)
        return
    uninstall_hooks(handle._installed)
    _invalidate_diffusers_cache(model)
    handle.runtime.stats.flush()
    handle.runtime.states.clear()


def get_cache(model: torch.nn.Module) -> CacheHandle | None:
    """The handle of the cache applied to `model`, or None."""
    return _HANDLES.get(model)
