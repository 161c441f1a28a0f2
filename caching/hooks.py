"""Installing and removing diffusers hooks so that removal restores each module exactly.

diffusers' `HookRegistry.remove_hook` puts the original bound `forward` back as an instance
attribute and leaves the registry attached. To leave a model as it was, removal also deletes the
registry it created and the instance `forward` it left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_PREFIX = "accel_cache"


@dataclass(frozen=True)
class InstalledHook:
    """One hook this package registered, with what removal must undo."""

    module: torch.nn.Module
    name: str
    created_registry: bool
    had_forward: bool


def install_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> InstalledHook:
    """Registers `hook` on `module` under `name` (prefixed) through diffusers' HookRegistry."""
    created_registry = not hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, f"{HOOK_PREFIX}.{name}")
    return InstalledHook(module, f"{HOOK_PREFIX}.{name}", created_registry, had_forward)


def uninstall_hooks(installed: Sequence[InstalledHook]) -> None:
    """Removes hooks in reverse order of installation, deleting what their installation added."""
    for item in reversed(installed):
        registry: Any = getattr(item.module, "_diffusers_hook", None)
        if registry is None:
            continue
        registry.remove_hook(item.name, recurse=False)
        if item.created_registry and not registry.hooks:
            del item.module._diffusers_hook
            if not item.had_forward:
                item.module.__dict__.pop("forward", None)
