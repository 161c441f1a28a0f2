"""accel: recipes that compose samplers, caches and adapters, resolve their interactions and run them.

`import accel` stays light: the Python API below is imported on first use.

    import accel
    resolved = accel.apply(pipe, "templates/flux-dev")   # a Stack, a recipe, a name or a YAML path
    image = pipe(prompt, num_inference_steps=resolved.stack.sampler.steps).images[0]
    print(accel.summary(pipe).to_dict())               # what the stack did in that call
    accel.remove(pipe)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"apply": "accel.pipeline", "remove": "accel.pipeline", "summary": "accel.pipeline",
         "Stack": "accel.stack", "StackError": "accel.stack", "load_recipe": "accel.recipe"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'accel' has no attribute {name!r}")
