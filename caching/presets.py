"""Named cache policies: each a preset of trigger x scope x update, with its paper and parameters.

`get_preset(name, **params)` returns a CacheConfig; `params` override the preset's defaults.
Every preset also takes the common parameters: `warmup`, `cooldown`, `max_cached` (fractions of
the trajectory), `count_flops`, `full_branches` (guidance branches never cached) and the update
rule: `update` ("reuse", "taylor", "foca") with `order` and `gains` (taylor: calibrated per-segment
multipliers of the derivative terms, e.g. from `caching.search_forecast_gains`), `calibration`
(foca) and `axis` ("step" or "sigma"). Presets driven by a static interval also take `steps`: the computed steps as
trajectory fractions (e.g. a schedule calibrated by `caching.search_compute_steps`) instead of
every `interval`-th one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import CacheConfig, ScopeConfig, TriggerConfig
from .router import load_router, router_config
from .scopes import (AttentionScope, BlockRangeScope, DeepBranchScope, ResidualScope, SingleBlocksScope,
                     TokenScope)
from .triggers import BudgetTrigger, IntervalTrigger, MagCacheTrigger, ResidualTrigger, TeaCacheTrigger
from .updates import FoCaUpdate, ReuseUpdate, TaylorUpdate


@dataclass(frozen=True)
class Preset:
    """A named policy.

    Attributes:
        name: registry key.
        paper: the method's paper or origin.
        reference: arXiv id or URL.
        summary: one line: trigger x scope x update.
        defaults: preset-specific parameters and their defaults (common ones included when set).
        build: (trigger, scope) from the resolved parameters.
    """

    name: str
    paper: str
    reference: str
    summary: str
    defaults: dict[str, Any]
    build: Callable[[dict[str, Any]], tuple[TriggerConfig, ScopeConfig]]


COMMON_DEFAULTS: dict[str, Any] = {"warmup": 0.0, "cooldown": 0.0, "max_cached": None, "count_flops": True,
                                   "update": "reuse", "order": 2, "calibration": 1.0, "axis": "step",
                                   "full_branches": (), "steps": None, "gains": None}

PRESETS: dict[str, Preset] = {}


def _register(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_register(Preset(
    "fora", "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al. 2024)",
    "arXiv:2407.01425", "static interval x attention+MLP outputs of every block x reuse",
    {"interval": 3},
    lambda p: (IntervalTrigger(p["interval"]), AttentionScope(kinds=("self", "cross", "mlp")))))
_register(Preset(
    "deltadit", "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers "
    "(Chen et al. 2024)", "arXiv:2406.01125",
    "static interval x single blocks (rear early, front late) x reuse",
    {"interval": 2, "fraction": 0.5, "boundary": 0.5, "blocks": None},
    lambda p: (IntervalTrigger(p["interval"]),
               SingleBlocksScope(fraction=p["fraction"], boundary=p["boundary"], blocks=p["blocks"]))))
_register(Preset(
    "deepcache", "DeepCache: Accelerating Diffusion Models for Free (Ma et al., CVPR 2024)",
    "arXiv:2312.00858", "static interval x UNet deep branch x reuse",
    {"interval": 3, "branch": 0},
    lambda p: (IntervalTrigger(p["interval"]), DeepBranchScope(branch=p["branch"]))))
_register(Preset(
    "teacache", "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model (TeaCache, "
    "Liu et al., CVPR 2025)", "arXiv:2411.19108",
    "accumulated rescaled modulated-input change x whole residual x reuse",
    {"threshold": 0.1, "coefficients": None, "degree": 4, "cooldown": 0.02},
    lambda p: (TeaCacheTrigger(p["threshold"], p["coefficients"], p["degree"]), ResidualScope())))
_register(Preset(
    "magcache", "MagCache: Fast Video Generation with Magnitude-Aware Cache (Ma et al. 2025)",
    "arXiv:2506.09045", "accumulated magnitude-ratio error x whole residual x reuse",
    {"threshold": 0.06, "ratios": None, "warmup": 0.2, "max_cached": 0.06},
    lambda p: (MagCacheTrigger(p["threshold"], p["ratios"]), ResidualScope())))
_register(Preset(
    "fbcache", "First Block Cache (ParaAttention, Cheng 2025; diffusers FirstBlockCache)",
    "https://github.com/chengzeyi/ParaAttention", "first-block residual change x blocks 1.. x reuse",
    {"threshold": 0.08},
    lambda p: (ResidualTrigger(p["threshold"]), BlockRangeScope(first=1, last=0))))
_register(Preset(
    "dbcache", "DBCache: dual block cache (cache-dit, vipshop 2025)",
    "https://github.com/vipshop/cache-dit", "head residual change x middle blocks (n first, m last run) x reuse",
    {"threshold": 0.08, "first": 1, "last": 1, "warmup": 0.08},
    lambda p: (ResidualTrigger(p["threshold"]), BlockRangeScope(first=p["first"], last=p["last"]))))
_register(Preset(
    "pab", "Real-Time Video Generation with Pyramid Attention Broadcast (Zhao et al. 2024)",
    "arXiv:2408.12588", "per-kind static intervals (self 2, cross 6) x attention outputs x reuse",
    {"interval": 2, "cross_interval": 6, "warmup": 0.2, "cooldown": 0.1},
    lambda p: (IntervalTrigger(p["interval"]),
               AttentionScope(kinds=("self", "cross"), intervals={"cross": p["cross_interval"]}))))
_register(Preset(
    "toca", "Accelerating Diffusion Transformers with Token-wise Feature Caching (ToCa, Zou et al., "
    "ICLR 2025)", "arXiv:2410.05317", "static interval x top-k changed tokens of token-wise modules x reuse",
    {"interval": 3, "fraction": 0.2, "staleness": 0.0},
    lambda p: (IntervalTrigger(p["interval"]), TokenScope(fraction=p["fraction"], staleness=p["staleness"]))))
_register(Preset(
    "taylorseer", "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers "
    "(Liu et al. 2025)", "arXiv:2503.06923", "static interval x whole residual x Taylor forecast",
    {"interval": 6, "update": "taylor", "order": 1, "warmup": 0.06},
    lambda p: (IntervalTrigger(p["interval"]), ResidualScope())))
_register(Preset(
    "foca", "Forecast then Calibrate: Feature Caching as ODE for Efficient Diffusion Transformers "
    "(FoCa, Zheng et al. 2025)", "arXiv:2508.16211",
    "static interval x whole residual x BDF2/Heun second-order forecast",
    {"interval": 3, "update": "foca", "calibration": 1.0, "warmup": 0.06},
    lambda p: (IntervalTrigger(p["interval"]), ResidualScope())))
_register(Preset(
    "budget", "accumulated-error budget (this project)", "docs/caching.md",
    "head-residual drift spent per refresh and per run x blocks 1.. x reuse",
    {"threshold": 0.2, "total": None, "first": 1, "last": 0},
    lambda p: (BudgetTrigger(p["threshold"], p["total"]), BlockRangeScope(first=p["first"], last=p["last"]))))


def _router(params: dict[str, Any]) -> tuple[TriggerConfig, ScopeConfig]:
    """The hard-mode router of the file `path` (its recorded threshold unless `threshold` is given)."""
    if params["path"] is None:
        raise ValueError("preset 'router' needs path=<router .safetensors file> (written by caching.save_router, "
                         "e.g. by accel train with the router objective)")
    config = router_config(load_router(params["path"]), "hard", threshold=params["threshold"])
    return config.trigger, config.scope


_register(Preset(
    "router", "Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching (Ma et al. 2024)",
    "arXiv:2406.01733", "learned per-step, per-block gates x each block's residual x reuse",
    {"path": None, "threshold": None}, _router))


def _update(params: dict[str, Any]):
    kind = params["update"]
    if params["gains"] is not None and kind != "taylor":
        raise ValueError(f"gains scale a Taylor forecast; update={kind!r} takes none (use update='taylor', "
                         "e.g. preset taylorseer, or drop gains)")
    if kind == "reuse":
        return ReuseUpdate(axis=params["axis"])
    if kind == "taylor":
        return TaylorUpdate(order=params["order"], axis=params["axis"], gains=params["gains"])
    if kind == "foca":
        return FoCaUpdate(calibration=params["calibration"], axis=params["axis"])
    raise ValueError(f"unknown update {kind!r}; use 'reuse', 'taylor' or 'foca'")


def preset_parameters(name: str) -> dict[str, Any]:
    """Every parameter `name` takes, with its default."""
    preset = _lookup(name)
    return {**COMMON_DEFAULTS, **preset.defaults}


def _lookup(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown cache preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def get_preset(name: str, **params: Any) -> CacheConfig:
    """The CacheConfig of preset `name` with `params` overriding its defaults.

    Raises:
        ValueError: unknown preset, unknown parameter or a parameter out of range.
    """
    preset = _lookup(name)
    allowed = preset_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"preset {name!r} takes no parameter {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(allowed))}")
    values = {**allowed, **params}
    trigger, scope = preset.build(values)
    if values["steps"] is not None:
        if not isinstance(trigger, IntervalTrigger):
            raise ValueError(f"preset {name!r} is not driven by a static interval, so it takes no `steps`; "
                             "give steps to fora, deltadit, deepcache, pab, toca, taylorseer or foca")
        trigger = IntervalTrigger(trigger.interval, steps=tuple(values["steps"]))
    return CacheConfig(trigger=trigger, scope=scope, update=_update(values), warmup=values["warmup"],
                       cooldown=values["cooldown"], max_cached=values["max_cached"],
                       count_flops=values["count_flops"], name=name, full_branches=tuple(values["full_branches"]))


def list_presets() -> list[str]:
    """The preset names."""
    return sorted(PRESETS)
