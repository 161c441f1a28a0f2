"""Deep-branch scope: a UNet reuses its deep features and recomputes only the shallow path (DeepCache).

DeepCache (Ma et al., CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free",
arXiv:2312.00858) notes that a UNet's high-level features change slowly across steps while the
skip connections carry the fast-changing detail. On a cached step only the shallow path runs —
conv_in, down blocks 0..branch, the up blocks from len(up) - 1 - branch on, conv_out — and the
first of those up blocks takes the deep feature (the output of the up block before it) from the
cache. The skipped down blocks return their cached outputs, so the UNet's list of skip
connections keeps its shape; the skipped mid block passes its input through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig
from ..hooks import InstalledHook, install_hook
from ..layouts import BlockLayout, ModelLayout, StreamReader
from ._common import ForecastSlot, pack
from ..updates import ReuseForecaster

if TYPE_CHECKING:
    from ..runtime import CacheRuntime


@dataclass
class DeepBranchScope(ScopeConfig):
    """DeepCache's skip branch.

    Attributes:
        branch: index of the deepest down block still computed on cached steps (0: shallowest).
    """

    name: ClassVar[str] = "deep_branch"
    model_kinds: ClassVar[tuple[str, ...]] = ("unet",)
    branch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepBranchScope: branch={self.branch!r} must be an int >= 0")


class DeepBranchHook(ModelHook):
    """On a skipped UNet block. Roles: "deep" (forecast the deep feature), "filler" (return the
    cached output so skip connections line up), "identity" (the mid block: pass the input through)."""

    def __init__(self, runtime: "CacheRuntime", unit: str, role: str, streams: StreamReader | None = None) -> None:
        super().__init__()
        self.runtime, self.unit, self.role, self.streams = runtime, unit, role, streams
        self.is_reuse = runtime.config.update.name == "reuse"

    def _new_slot(self) -> ForecastSlot:
        forecaster = self.runtime.config.update.new_forecaster() if self.role == "deep" else ReuseForecaster()
        return ForecastSlot(forecaster)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.context is None:
            return original(*args, **kwargs)
        slot = frame.state.slots[self.unit]
        if frame.should_compute is False and (self.role == "identity" or slot.ready):
            frame.skipped.append((self.unit, 1.0))
            if self.role == "identity":
                return self.streams.read(args, kwargs)[0]
            if self.role == "filler":
                return slot.forecaster.last[0]
            return slot.predict(frame.coordinate) if self.is_reuse else self._predict(frame, slot)
        output = (self.runtime.run_unit(frame, self.unit, original, *args, **kwargs) if frame.measure_flops
                  else original(*args, **kwargs))
        if frame.record:
            if self.role == "deep" and not self.is_reuse:
                self._record_untraced(frame, slot, output)
            else:
                self._record(frame, slot, output)
        return output

    @torch.compiler.disable
    def _predict(self, frame, slot: ForecastSlot) -> Any:
        return slot.predict(frame.coordinate)

    def _record(self, frame, slot: ForecastSlot, output: Any) -> None:
        if self.role == "filler":
            slot.forecaster.record(frame.coordinate, (output,))
        elif self.role == "deep":
            slot.record(frame.coordinate, output)
            self.runtime.note_quantity(frame, pack(output)[0][0])

    _record_untraced = torch.compiler.disable(_record)


def apply_deep_branch(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                      scope: DeepBranchScope) -> list[InstalledHook]:
    """Installs DeepBranchHooks on the blocks a cached step skips."""
    down, up = getattr(model, layout.down), getattr(model, layout.up)
    mid = getattr(model, layout.mid, None)
    if scope.branch > len(down) - 2:
        raise ValueError(f"deep_branch scope: branch={scope.branch} leaves no deep block to cache in "
                         f"{type(model).__name__} ({len(down)} down blocks); use a branch in 0..{len(down) - 2}")
    skipped_up = len(up) - 1 - scope.branch
    installed = []
    for index in range(scope.branch + 1, len(down)):
        hook = DeepBranchHook(runtime, f"{layout.down}.{index}", "filler")
        installed.append(install_hook(down[index], hook, "deep_branch"))
    if mid is not None:
        hook = DeepBranchHook(runtime, layout.mid, "deep" if skipped_up == 0 else "identity",
                              streams=StreamReader(mid, BlockLayout()))
        installed.append(install_hook(mid, hook, "deep_branch"))
    for index in range(skipped_up):
        role = "deep" if index == skipped_up - 1 else "filler"
        hook = DeepBranchHook(runtime, f"{layout.up}.{index}", role)
        installed.append(install_hook(up[index], hook, "deep_branch"))
    for item in installed:
        hook = item.module._diffusers_hook.get_hook(item.name)
        runtime.slot_factories[hook.unit] = hook._new_slot
    return installed
