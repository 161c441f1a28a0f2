"""Single-block scope: each selected block reuses its own residual (Delta-DiT).

Delta-DiT (Chen et al. 2024, "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion
Transformers", arXiv:2406.01125) caches the deviation (output minus input) of chosen blocks
rather than the whole model, and chooses them by stage: rear blocks, which refine details, are
cached early in sampling, when outlines form; front blocks, which shape outlines, are cached late.
Here `fraction` of the blocks is cached: the rear share while the trajectory's progress is below
`boundary`, the front share after it — or the explicit `blocks` throughout. A cached block returns
its input plus its forecast deviation; the other blocks run, and every block that runs at stage 0
refreshes its deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig, check_range
from ..hooks import InstalledHook, install_hook
from ..layouts import (BlockLayout, ModelLayout, bind_arguments, compose_output, read_streams,
                       split_output, transformer_blocks)
from ._common import ForecastSlot

if TYPE_CHECKING:
    from ..runtime import CacheRuntime, CallFrame


@dataclass
class SingleBlocksScope(ScopeConfig):
    """Delta-DiT-style per-block deviation caching.

    Attributes:
        fraction: share of the blocks cached on a cached step, in (0, 1].
        boundary: trajectory progress where caching moves from the rear blocks to the front ones.
        blocks: explicit block indices cached throughout (overrides fraction and boundary).
    """

    name: ClassVar[str] = "single_blocks"
    fraction: float = 0.5
    boundary: float = 0.5
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_range("SingleBlocksScope", "fraction", self.fraction, 1e-9, 1.0)
        check_range("SingleBlocksScope", "boundary", self.boundary, 0.0, 1.0)
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
            if not self.blocks:
                raise ValueError("SingleBlocksScope: blocks is empty; pass None to use fraction")


class SingleBlockHook(ModelHook):
    """On a selectable block: returns input + forecast deviation when cached, else runs and records."""

    def __init__(self, runtime: "CacheRuntime", unit: str, layout: BlockLayout, *, early: bool,
                 late: bool, boundary: float) -> None:
        super().__init__()
        self.runtime, self.unit, self.layout = runtime, unit, layout
        self.early, self.late, self.boundary = early, late, boundary

    def _is_selected(self, frame: "CallFrame") -> bool:
        is_early_phase = frame.context.progress < self.boundary
        return self.early if is_early_phase else self.late

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.is_passthrough:
            return original(*args, **kwargs)
        hidden, encoder = read_streams(self.layout, bind_arguments(module, args, kwargs))
        slot = self.runtime.slot(frame, self.unit,
                                 lambda: ForecastSlot(self.runtime.config.update.new_forecaster()))
        is_cached_now = not frame.compute_now and slot.ready and self._is_selected(frame)
        if is_cached_now:
            frame.skipped.append((self.unit, 1.0))
            hidden_delta, encoder_delta = slot.forecaster.predict(frame.coordinate)
            encoder_out = encoder + encoder_delta if encoder_delta is not None and encoder is not None else encoder
            return compose_output(self.layout, hidden + hidden_delta, encoder_out)
        output = self.runtime.run_unit(frame, self.unit, original, *args, **kwargs)
        if frame.record:
            hidden_out, encoder_out = split_output(self.layout, output)
            encoder_delta = None
            if encoder_out is not None and encoder is not None and encoder_out.shape == encoder.shape:
                encoder_delta = encoder_out - encoder
            slot.forecaster.record(frame.coordinate, (hidden_out - hidden, encoder_delta))
        return output


def apply_single_blocks(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                        scope: SingleBlocksScope) -> list[InstalledHook]:
    """Installs a SingleBlockHook on every block that some phase caches."""
    blocks = transformer_blocks(model, layout)
    count = len(blocks)
    if scope.blocks is not None:
        bad = [b for b in scope.blocks if not 0 <= b < count]
        if bad:
            raise ValueError(f"single_blocks scope: block indices {bad} do not exist in {type(model).__name__} "
                             f"({count} blocks); use indices 0..{count - 1}")
        early = late = set(scope.blocks)
    else:
        cached = min(count, max(1, math.ceil(scope.fraction * count - 1e-9)))
        early, late = set(range(count - cached, count)), set(range(cached))
    installed = []
    for index, ref in enumerate(blocks):
        if index in early or index in late:
            hook = SingleBlockHook(runtime, ref.name, ref.layout, early=index in early, late=index in late,
                                   boundary=scope.boundary)
            installed.append(install_hook(ref.module, hook, "single_block"))
    return installed
