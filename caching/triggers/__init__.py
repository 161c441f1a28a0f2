"""When to compute: static interval, TeaCache, first-block residual (FB/DBCache), MagCache, error budget."""

from .budget import BudgetTrigger
from .first_block import ResidualTrigger
from .interval import IntervalTrigger
from .magcache import MagCacheTrigger, calibrate_magcache
from .teacache import TeaCacheTrigger, calibrate_teacache

__all__ = ["IntervalTrigger", "TeaCacheTrigger", "ResidualTrigger", "MagCacheTrigger", "BudgetTrigger",
           "calibrate_teacache", "calibrate_magcache"]
