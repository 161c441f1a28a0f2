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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig, check_range
from ..hooks import InstalledHook, install_hook
from ..layouts import BlockLayout, ModelLayout, StreamReader, compose_output, split_output, transformer_blocks
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
    """On a selectable block: returns input + forecast deviation when cached, else runs and records.

    Traced by torch.compile with plain reuse: the phase (early / late) is planned per call into
    the frame, the slot exists from the start of each branch state; a forecasting update forecasts
    and records eagerly.
    """

    def __init__(self, runtime: "CacheRuntime", unit: str, layout: BlockLayout, *, early: bool,
                 late: bool, streams: StreamReader) -> None:
        super().__init__()
        self.runtime, self.unit, self.layout, self.streams = runtime, unit, layout, streams
        self.early, self.late = early, late
        self.is_reuse = runtime.config.update.name == "reuse"

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.context is None:
            return original(*args, **kwargs)
        hidden, encoder = self.streams.read(args, kwargs)
        slot: ForecastSlot = frame.state.slots[self.unit]
        is_selected = self.early if frame.scratch[_EARLY_PHASE] else self.late
        if frame.should_compute is False and slot.ready and is_selected:
            frame.skipped.append((self.unit, 1.0))
            if self.is_reuse:
                return self._forecast(frame, slot, hidden, encoder)
            return self._forecast_untraced(frame, slot, hidden, encoder)
        output = (self.runtime.run_unit(frame, self.unit, original, *args, **kwargs) if frame.measure_flops
                  else original(*args, **kwargs))
        if frame.record:
            if self.is_reuse:
                self._record(frame, slot, hidden, encoder, output)
            else:
                self._record_untraced(frame, slot, hidden, encoder, output)
        return output

    def _forecast(self, frame: "CallFrame", slot: ForecastSlot, hidden: torch.Tensor, encoder: torch.Tensor | None):
        hidden_delta, encoder_delta = slot.forecaster.predict(frame.coordinate)
        encoder_out = encoder + encoder_delta if encoder_delta is not None and encoder is not None else encoder
        return compose_output(self.layout, hidden + hidden_delta, encoder_out)

    def _record(self, frame: "CallFrame", slot: ForecastSlot, hidden: torch.Tensor, encoder: torch.Tensor | None,
                output: Any) -> None:
        hidden_out, encoder_out = split_output(self.layout, output)
        encoder_delta = None
        if encoder_out is not None and encoder is not None and encoder_out.shape == encoder.shape:
            encoder_delta = encoder_out - encoder
        slot.forecaster.record(frame.coordinate, (hidden_out - hidden, encoder_delta))

    _forecast_untraced = torch.compiler.disable(_forecast)
    _record_untraced = torch.compiler.disable(_record)


_EARLY_PHASE = "single_blocks.early_phase"


def _phase_planner(boundary: float):
    """Puts in the frame whether the call is in the early phase (progress < boundary)."""

    def plan(frame: "CallFrame") -> None:
        frame.scratch[_EARLY_PHASE] = frame.context.progress < boundary
    return plan


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
                                   streams=StreamReader(ref.module, ref.layout))
            installed.append(install_hook(ref.module, hook, "single_block"))
            runtime.slot_factories[ref.name] = lambda: ForecastSlot(runtime.config.update.new_forecaster())
    runtime.planners.append(_phase_planner(scope.boundary))
    return installed
