"""Attention scope: reuse (or forecast) the outputs of attention and MLP layers (PAB, FORA).

Pyramid Attention Broadcast (Zhao et al. 2024, "Real-Time Video Generation with Pyramid Attention
Broadcast", arXiv:2408.12588) observes that attention outputs change little in the middle of
sampling, and least for cross attention, so each attention kind is recomputed on its own
interval — a pyramid: self attention often, cross attention rarely. FORA (Selvaraju et al. 2024,
"FORA: Fast-Forward Caching in Diffusion Transformer Acceleration", arXiv:2407.01425) reuses
attention and MLP outputs of every block on one static interval. The rest of each block (norms,
modulation, residual additions) always runs.

Kinds are "self", "cross" and "mlp"; which submodule is which comes from the block layouts. A kind
listed in `intervals` keeps its own interval (counted from its own latest computation); the other
kinds follow the trigger's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig
from ..hooks import InstalledHook, install_hook
from ..layouts import ModelLayout, registration_call, submodule, transformer_blocks
from ._common import ForecastSlot, ReuseSlot

if TYPE_CHECKING:
    from ..runtime import CacheRuntime, CallFrame

KINDS = ("self", "cross", "mlp")


@dataclass
class AttentionScope(ScopeConfig):
    """Per-layer output caching by kind.

    Attributes:
        kinds: which kinds of layers are cached ("self", "cross", "mlp").
        intervals: per-kind recompute intervals overriding the trigger for that kind.
    """

    name: ClassVar[str] = "attention"
    kinds: tuple[str, ...] = ("self", "cross")
    intervals: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        unknown = [k for k in (*self.kinds, *self.intervals) if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"AttentionScope: kinds {unknown or '()'} invalid; choose from {KINDS}")
        for kind, interval in self.intervals.items():
            if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
                raise ValueError(f"AttentionScope: intervals[{kind!r}]={interval!r} must be an int >= 1")


class AttentionCacheHook(ModelHook):
    """On one attention / MLP module: forecast its output when its kind is not recomputed.

    With plain reuse the whole hook is traced by torch.compile (its slot exists from the start of
    each branch state, and the decision is the frame's per-kind flag); a forecasting update looks
    up, forecasts and records eagerly.
    """

    def __init__(self, runtime: "CacheRuntime", unit: str, kind: str) -> None:
        super().__init__()
        self.runtime, self.unit, self.kind = runtime, unit, kind
        self.is_reuse = runtime.config.update.name == "reuse"

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.context is None:
            return original(*args, **kwargs)
        if not self.is_reuse:
            return self._forecasting_forward(frame, original, args, kwargs)
        unit = frame.occurrence_key(self.unit)
        slot = frame.state.slots.get(unit)
        if slot is None:
            slot = self.runtime.slot(frame, unit, self._new_slot)
        if not frame.kind_compute.get(self.kind, True) and slot.output is not None:  # decision first: a
            frame.skipped.append((unit, 1.0))  # computed call never reads the slot (no guard on it)
            return slot.output
        output = (self.runtime.run_unit(frame, unit, original, *args, **kwargs) if frame.measure_flops
                  else original(*args, **kwargs))
        if frame.record:
            slot.output = output
        return output

    def _forecasting_forward(self, frame: "CallFrame", original: Any, args: tuple, kwargs: dict) -> Any:
        """A forecasting update (Taylor, FoCa): looks up, forecasts and records eagerly (under
        torch.compile), the module itself is traced."""
        unit, forecast = self._forecast(frame)
        if forecast is not None:
            return forecast
        output = self.runtime.run_unit(frame, unit, original, *args, **kwargs)
        if frame.record:
            self._record(frame, unit, output)
        return output

    @torch.compiler.disable
    def _forecast(self, frame: "CallFrame") -> tuple[str, Any]:
        """(the unit's slot name in this call, its forecast output if it is cached now, else None)."""
        unit = frame.occurrence_key(self.unit)
        slot = self.runtime.slot(frame, unit, self._new_slot)
        if not slot.ready or frame.kind_compute.get(self.kind, True):
            return unit, None
        frame.skipped.append((unit, 1.0))
        return unit, slot.predict(frame.coordinate)

    @torch.compiler.disable
    def _record(self, frame: "CallFrame", unit: str, output: Any) -> None:
        frame.state.slots[unit].record(frame.coordinate, output)

    def _new_slot(self) -> ForecastSlot | ReuseSlot:
        return ReuseSlot() if self.is_reuse else ForecastSlot(self.runtime.config.update.new_forecaster())


def _kind_planner(scope: AttentionScope):
    """Sets frame.kind_compute for each kind once the trigger has decided."""

    def plan(frame: "CallFrame") -> None:
        state, step = frame.state, frame.context.step_index
        for kind in scope.kinds:
            if frame.context.stage > 0:
                frame.kind_compute[kind] = state.kind_last_computed.get(kind) == step
                continue
            interval = scope.intervals.get(kind)
            if interval is None:
                should = frame.compute_now
            else:
                last = state.kind_last_computed.get(kind)
                should = frame.must_compute or last is None or step - last >= interval
            frame.kind_compute[kind] = should
            if should:
                state.kind_last_computed[kind] = step
    return plan


def apply_attention_scope(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                          scope: AttentionScope) -> list[InstalledHook]:
    """Installs an AttentionCacheHook on every module of the requested kinds."""
    installed = []
    blocks = transformer_blocks(model, layout)
    for ref in blocks:
        for kind in scope.kinds:
            for attr in ref.layout.attention.get(kind, ()):
                module = submodule(ref.module, attr)
                if isinstance(module, torch.nn.Module):
                    hook = AttentionCacheHook(runtime, f"{ref.name}.{attr}", kind)
                    installed.append(install_hook(module, hook, "attention"))
                    runtime.slot_factories[hook.unit] = hook._new_slot
    if not installed:
        call = registration_call(blocks[0].module, blocks[0].layout,
                                 attention="{'self': ('<attention submodule>', ...), 'mlp': (...)}")
        raise ValueError(f"attention scope: {type(model).__name__} has no layers of kinds {scope.kinds}; choose "
                         f"kinds its block layouts name ({dict(blocks[0].layout.attention)}), or register them with "
                         f"{call}")
    runtime.planners.append(_kind_planner(scope))
    return installed
