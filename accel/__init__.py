"""accel: recipes that compose samplers, caches and adapters, resolve their interactions and run them.

`import accel` stays light: the Python API below is imported on first use.

    import accel
    resolved = accel.apply(pipe, accel.Stack(...))   # or a recipe
    ...
    accel.remove(pipe)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"apply": "accel.pipeline", "remove": "accel.pipeline", "Stack": "accel.stack",
         "StackError": "accel.stack"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'accel' has no attribute {name!r}")
