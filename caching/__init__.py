"""Cache policies as hooks on a model. Knows nothing of solvers or training.

A policy is when (trigger) x what (scope) x how (update); named presets cover the field's methods:

    from caching import get_preset, apply_cache, remove_cache
    handle = apply_cache(transformer, get_preset("fbcache", threshold=0.1))
    ...  # run generations with step contexts published (step_context.publish_step)
    print(handle.stats.last_run().to_dict())
    remove_cache(transformer)

See docs/caching.md.
"""

from .apply import CacheHandle, apply_cache, get_cache, remove_cache
from .calibration import MagCacheCalibration, TeaCacheCalibration, fit_teacache_polynomial
from .config import CacheConfig, RunSchedule, ScopeConfig, TriggerConfig, UpdateConfig
from .layouts import (BlockLayout, ModelLayout, get_model_layout, register_block_layout,
                      register_model_layout)
from .presets import PRESETS, get_preset, list_presets, preset_parameters
from .router import (RouterSpec, apply_router, load_router, router_block_names, router_config,
                     save_router)
from .schedule_search import ComputeSchedule, ForecastGains, search_compute_steps, search_forecast_gains
from .scopes import (AttentionScope, BlockRangeScope, DeepBranchScope, ResidualScope, RouterScope,
                     SingleBlocksScope, TokenScope)
from .stats import CacheStats, RunStats
from .triggers import (BudgetTrigger, IntervalTrigger, MagCacheTrigger, ResidualTrigger, RouterTrigger,
                       TeaCacheTrigger, calibrate_magcache, calibrate_teacache)
from .updates import FoCaUpdate, ReuseUpdate, TaylorUpdate

__all__ = [
    "CacheConfig", "RunSchedule", "TriggerConfig", "ScopeConfig", "UpdateConfig",
    "apply_cache", "remove_cache", "get_cache", "CacheHandle", "CacheStats", "RunStats",
    "get_preset", "list_presets", "preset_parameters", "PRESETS",
    "IntervalTrigger", "TeaCacheTrigger", "ResidualTrigger", "MagCacheTrigger", "BudgetTrigger", "RouterTrigger",
    "ResidualScope", "BlockRangeScope", "SingleBlocksScope", "AttentionScope", "TokenScope", "DeepBranchScope",
    "RouterScope", "RouterSpec", "apply_router", "router_config", "router_block_names", "save_router",
    "load_router",
    "ReuseUpdate", "TaylorUpdate", "FoCaUpdate",
    "calibrate_teacache", "calibrate_magcache", "fit_teacache_polynomial", "TeaCacheCalibration",
    "MagCacheCalibration", "ComputeSchedule", "search_compute_steps", "ForecastGains", "search_forecast_gains",
    "BlockLayout", "ModelLayout", "register_model_layout", "register_block_layout", "get_model_layout",
]
