"""When to compute: static interval, TeaCache, first-block residual (FB/DBCache), MagCache, error budget,
learned per-block gates (Learning-to-Cache router)."""

from .budget import BudgetTrigger
from .first_block import ResidualTrigger
from .interval import IntervalTrigger
from .magcache import MagCacheTrigger, calibrate_magcache
from .router import RouterTrigger
from .teacache import TeaCacheTrigger, calibrate_teacache

__all__ = ["IntervalTrigger", "TeaCacheTrigger", "ResidualTrigger", "MagCacheTrigger", "BudgetTrigger",
           "RouterTrigger", "calibrate_teacache", "calibrate_magcache"]
