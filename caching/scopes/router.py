"""Router scope: every transformer block computes or reuses its own residual, as a learned table says.

Learning-to-Cache (Ma et al. 2024, arXiv:2406.01733) decides per step and per block. With the
`RouterTrigger`'s table, on step i block l:

* gate open (hard mode): the block runs and its residual — output minus input, for the image
  stream and, where the block updates it, the text stream — is stored;
* gate closed (hard mode): the block does not run and returns input + the residual stored the
  last time it ran (through the config's update: plain reuse by default, as in the paper);
* soft mode (training): the block always runs, and with its gate g (a tensor) returns
  ``g * output + (1 - g) * (input + cached)``, i.e. input + g * residual_now + (1 - g) *
  residual_cached, and stores ``g * residual_now + (1 - g) * residual_cached`` as the next step's
  cached residual. With 0/1 gates this is bitwise what hard mode computes (a closed gate keeps
  the older residual, an open one stores the new one), and it stays differentiable in g.

The cached residual in soft mode is detached by default (`detach_cache=True`): each gate gets its
gradient from the step where it acts, with the earlier steps' residuals as constants — the
adjacent-step pairs Learning-to-Cache trains on, and memory for one step's graph. With
`detach_cache=False` the cached residual keeps its graph, so a loss on a whole rollout also
reaches a gate through the later steps that reuse what it mixed (HarmoniCa-style trajectory
training; call backward once per generation).

The first step (and warm-up, cool-down, any call with an empty cache) computes every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig
from ..hooks import InstalledHook, install_hook
from ..layouts import (BlockLayout, ModelLayout, bind_arguments, compose_output, read_streams,
                       split_output, transformer_blocks)
from ..updates import Forecaster

if TYPE_CHECKING:
    from ..runtime import CacheRuntime, CallFrame
    from ..triggers.router import RouterTrigger

Residuals = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class RouterScope(ScopeConfig):
    """Per-block residual reuse driven by a RouterTrigger's table.

    Attributes:
        detach_cache: soft mode stores its mixed residual detached (see the module docstring).
    """

    name: ClassVar[str] = "router"
    model_kinds: ClassVar[tuple[str, ...]] = ("transformer",)
    triggers: ClassVar[tuple[str, ...]] = ("router",)
    detach_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.detach_cache, bool):
            raise ValueError(f"RouterScope: detach_cache={self.detach_cache!r} must be True or False")


@dataclass
class RouterSlot:
    """Per-branch state of one block: its residual forecaster; whether its text output is None."""

    forecaster: Forecaster
    encoder_absent: bool = False

    def tensors(self):
        return self.forecaster.tensors()

    @property
    def ready(self) -> bool:
        return self.forecaster.ready


class RouterBlockHook(ModelHook):
    """On block `index` of the chain: computes, reuses or (soft) mixes as the call's plan says."""

    def __init__(self, runtime: "CacheRuntime", unit: str, index: int, layout: BlockLayout, *,
                 detach_cache: bool) -> None:
        super().__init__()
        self.runtime, self.unit, self.index, self.layout = runtime, unit, index, layout
        self.detach_cache = detach_cache

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.is_passthrough:
            return original(*args, **kwargs)
        hidden, encoder = read_streams(self.layout, bind_arguments(module, args, kwargs))
        slot = self.runtime.slot(frame, self.unit, lambda: RouterSlot(self.runtime.config.update.new_forecaster()))
        compute_row, gate_row = frame.scratch["router_compute"], frame.scratch["router_gates"]
        is_gate_closed = compute_row is not None and not compute_row[self.index]
        is_cached_now = is_gate_closed and slot.ready
        if is_cached_now:
            frame.skipped.append((self.unit, 1.0))
            return self._reuse(frame, slot, hidden, encoder)
        output = self.runtime.run_unit(frame, self.unit, original, *args, **kwargs)
        hidden_out, encoder_out = split_output(self.layout, output)
        slot.encoder_absent = self.layout.encoder_out is not None and encoder_out is None
        now = _residuals(hidden, encoder, hidden_out, encoder_out)
        is_mixed = gate_row is not None and slot.ready
        if not is_mixed:
            self._store(frame, slot, now)
            return output
        gate = gate_row[self.index].to(hidden.dtype)
        keep = 1 - gate
        cached = slot.forecaster.predict(frame.coordinate)
        hidden_mix = gate * hidden_out + keep * (hidden + cached[0])
        encoder_mix = encoder_out
        if now[1] is not None and cached[1] is not None:
            encoder_mix = gate * encoder_out + keep * (encoder + cached[1])
        mixed_encoder_residual = now[1]
        if now[1] is not None and cached[1] is not None:
            mixed_encoder_residual = gate * now[1] + keep * cached[1]
        self._store(frame, slot, (gate * now[0] + keep * cached[0], mixed_encoder_residual))
        return compose_output(self.layout, hidden_mix, encoder_mix)

    def _reuse(self, frame: "CallFrame", slot: RouterSlot, hidden: torch.Tensor, encoder: torch.Tensor | None):
        hidden_residual, encoder_residual = slot.forecaster.predict(frame.coordinate)
        if slot.encoder_absent:
            encoder_out = None
        elif encoder_residual is not None and encoder is not None:
            encoder_out = encoder + encoder_residual
        else:
            encoder_out = encoder
        return compose_output(self.layout, hidden + hidden_residual, encoder_out)

    def _store(self, frame: "CallFrame", slot: RouterSlot, residuals: Residuals) -> None:
        if not frame.record:  # a later stage of a step never updates the cache
            return
        if self.detach_cache:
            residuals = tuple(r.detach() if r is not None else None for r in residuals)
        slot.forecaster.record(frame.coordinate, residuals)


def _residuals(hidden: torch.Tensor, encoder: torch.Tensor | None, hidden_out: torch.Tensor,
               encoder_out: torch.Tensor | None) -> Residuals:
    encoder_residual = None
    if encoder_out is not None and encoder is not None and encoder_out.shape == encoder.shape:
        encoder_residual = encoder_out - encoder
    return hidden_out - hidden, encoder_residual


def _router_planner(trigger: "RouterTrigger"):
    """Puts the call's per-block plan in the frame: a compute row (hard) or a gate row (soft)."""

    def plan(frame: "CallFrame") -> None:
        trigger.check_steps(frame.context.num_steps)
        is_gated = not frame.compute_now  # forced and all-open steps compute every block as they are
        step = frame.context.step_index
        is_hard, is_soft = trigger.mode == "hard", trigger.mode == "soft"
        frame.scratch["router_compute"] = trigger.compute_row(step) if is_gated and is_hard else None
        frame.scratch["router_gates"] = trigger.gate_row(step) if is_gated and is_soft else None
    return plan


def _block_counts(model: torch.nn.Module, layout: ModelLayout) -> str:
    parts = [f"{len(getattr(model, attr))} {attr}" for attr in layout.block_lists
             if getattr(model, attr, None) is not None]
    return " + ".join(parts)


def apply_router_scope(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                       scope: RouterScope) -> list[InstalledHook]:
    """Installs a RouterBlockHook on every block, after checking the table fits the model."""
    trigger = runtime.trigger
    blocks = transformer_blocks(model, layout)
    model_name = type(model).__name__
    if trigger.num_blocks != len(blocks):
        raise ValueError(f"{trigger.source} has gates for {trigger.num_blocks} blocks but {model_name} has "
                         f"{len(blocks)} ({_block_counts(model, layout)}); use a router trained for this model "
                         f"(its gates need len(caching.router_block_names(model)) = {len(blocks)} columns)")
    class_names = {cls.__name__ for cls in type(model).__mro__}
    if trigger.model_class is not None and trigger.model_class not in class_names:
        raise ValueError(f"{trigger.source} was trained for {trigger.model_class}, not {model_name}; use a "
                         f"router trained for {model_name}")
    if trigger.mode == "soft" and runtime.config.update.name != "reuse":
        raise ValueError(f"soft router mode mixes plainly reused residuals (Learning-to-Cache), not "
                         f"'{runtime.config.update.name}' forecasts; use update='reuse' for training")
    installed = []
    for index, ref in enumerate(blocks):
        hook = RouterBlockHook(runtime, ref.name, index, ref.layout, detach_cache=scope.detach_cache)
        installed.append(install_hook(ref.module, hook, "router"))
    runtime.planners.append(_router_planner(trigger))
    return installed
