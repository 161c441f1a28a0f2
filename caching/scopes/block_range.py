"""Block-range scope: the whole transformer residual, or the middle of the block chain (DBCache).

The first `first` blocks and the last `last` blocks always run; the blocks in between are the
cached range. On a computed call the range runs and its residual — output minus input, for the
image stream and, where blocks update it, the text stream — is recorded. On a cached call every
block of the range passes its inputs through and the last one adds the forecast residual, so the
range costs nothing but an addition. `ResidualScope` is the range of all blocks (TeaCache, FORA
on the whole model, TaylorSeer, FoCa, MagCache).

The decision point is the range's first block: a feature-watching trigger decides there, from the
first block's modulated input (TeaCache probe) or from the residual of the `first` head blocks
(FBCache / DBCache / budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.hooks import ModelHook

from ..config import ScopeConfig
from ..hooks import InstalledHook, install_hook
from ..layouts import (BlockLayout, ModelLayout, StreamReader, bind_arguments, compose_output,
                       range_segments, registration_call, split_output, transformer_blocks)

if TYPE_CHECKING:
    from ..runtime import CacheRuntime, CallFrame

_ALL_TRIGGERS = ("interval", "teacache", "residual", "magcache", "budget")


@dataclass
class BlockRangeScope(ScopeConfig):
    """Cache the middle of the block chain; `first` head and `last` tail blocks always run.

    Attributes:
        first: blocks always computed at the start (>= 1 for residual and budget triggers).
        last: blocks always computed at the end.
    """

    name: ClassVar[str] = "blocks"
    model_kinds: ClassVar[tuple[str, ...]] = ("transformer",)
    first: int = 1
    last: int = 0

    def __post_init__(self) -> None:
        for label, value in (("first", self.first), ("last", self.last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BlockRangeScope: {label}={value!r} must be an int >= 0")

    @property
    def triggers(self) -> tuple[str, ...]:  # type: ignore[override]
        return _ALL_TRIGGERS if self.first >= 1 else ("interval", "teacache", "magcache")


@dataclass
class ResidualScope(BlockRangeScope):
    """Cache the whole transformer residual (every block)."""

    name: ClassVar[str] = "residual"
    first: int = 0
    last: int = 0

    def __post_init__(self) -> None:
        if self.first or self.last:
            raise ValueError("ResidualScope caches every block; use BlockRangeScope(first=..., last=...)")


@dataclass
class RangeSlot:
    """Per-branch state of a range: the residual forecaster; whether the text output is None."""

    forecaster: Any
    encoder_absent: bool = False

    def tensors(self):
        return self.forecaster.tensors()


class HeadProbeHook(ModelHook):
    """On the first block when head blocks exist: stashes its input (and probe) for the decision."""

    def __init__(self, runtime: "CacheRuntime", layout: BlockLayout, needs_probe: bool,
                 streams: StreamReader) -> None:
        super().__init__()
        self.runtime, self.layout, self.needs_probe, self.streams = runtime, layout, needs_probe, streams
        self.entry: BlockRangeHook | None = None  # the range's entry hook, which reads the stash

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame = self.runtime.frame
        if frame is not None and frame.context is not None and frame.should_compute is None:
            self.entry.head_input = self.streams.read(args, kwargs)[0]
            if self.needs_probe:
                bound = bind_arguments(module, args, kwargs, self.streams.parameter_names)
                frame.scratch["probe"] = self.runtime.run_overhead(frame, self.layout.probe, module, bound)
        return self.fn_ref.original_forward(*args, **kwargs)


class BlockRangeHook(ModelHook):
    """On each block of the cached range; the first decides, the last records or forecasts.

    Under torch.compile everything but a feature-watching decision is traced when the update is
    plain reuse: the hooks keep no per-call state but the frame's decision and the range input,
    which the entry hands to its exit through an attribute (so the compiled model is one graph
    per computed / cached path). A forecasting update (Taylor, FoCa) records and forecasts eagerly.
    """

    def __init__(self, runtime: "CacheRuntime", unit: str, layout: BlockLayout, *, is_entry: bool,
                 is_exit: bool, decision: str | None, probe_here: bool, streams: StreamReader,
                 is_last_segment: bool = True, segment_units: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.runtime, self.unit, self.layout, self.streams = runtime, unit, layout, streams
        self.is_entry, self.is_exit = is_entry, is_exit
        self.decision, self.probe_here = decision, probe_here
        self.is_last_segment = is_last_segment
        self.skipped = tuple((name, 1.0) for name in segment_units)  # the segment's units, for the exit
        self.is_reuse = runtime.config.update.name == "reuse"
        self.exit: BlockRangeHook = self  # the segment's exit hook (set by apply_block_range)
        self.range_input: tuple | None = None  # exit: the segment's input in the call in progress
        self.head_input: torch.Tensor | None = None  # entry: the head blocks' input (head residual)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        frame, original = self.runtime.frame, self.fn_ref.original_forward
        if frame is None or frame.context is None:
            return original(*args, **kwargs)
        if self.is_entry:
            if self.decision is not None and frame.should_compute is None:
                if self.decision == "head_residual" and self.runtime.can_defer(frame):
                    self.runtime.defer(frame, self._signal(frame, module, args, kwargs))
                else:
                    self._decide(frame, module, args, kwargs)
            if frame.should_compute is not False:
                self.exit.range_input = self.streams.read(args, kwargs)
        if frame.decision is not None:
            return self._deferred_forward(frame, original, args, kwargs)
        if frame.should_compute is not False:
            output = (self.runtime.run_unit(frame, self.unit, original, *args, **kwargs) if frame.measure_flops
                      else original(*args, **kwargs))
            if self.is_exit:
                if self.is_reuse:
                    self._record(frame, output)
                else:
                    self._record_untraced(frame, output)
            return output
        if self.is_exit:
            return self._forecast(frame, args, kwargs) if self.is_reuse else self._forecast_untraced(frame, args, kwargs)
        hidden, encoder = self.streams.read(args, kwargs)
        return compose_output(self.layout, hidden, encoder)

    def _signal(self, frame: "CallFrame", module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """What the trigger decides from: the first block's probe, or the head blocks' residual."""
        if self.decision == "probe":
            if not self.probe_here:
                return frame.scratch.get("probe")
            bound = bind_arguments(module, args, kwargs, self.streams.parameter_names)
            return self.runtime.run_overhead(frame, self.layout.probe, module, bound)
        head_input, self.head_input = self.head_input, None
        return self.streams.read(args, kwargs)[0] - head_input

    @torch.compiler.disable
    def _decide(self, frame: "CallFrame", module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.runtime.decide(frame, self._signal(frame, module, args, kwargs))

    def _deferred_forward(self, frame: "CallFrame", original: Any, args: tuple, kwargs: dict) -> Any:
        """A block of the range while a compiled graph holds the decision (`CacheRuntime.defer`):
        `torch.cond` runs the block, or passes its inputs through (a copy: the branches of a cond
        may not alias its inputs), and the exit adds the reused residual; one graph for both paths."""
        hidden, encoder = self.streams.read(args, kwargs)
        if not self.is_exit:
            def compute() -> tuple:
                outputs = split_output(self.layout, original(*args, **kwargs))
                return tuple(_dense_copy(t) for t in outputs if t is not None)

            def cached() -> tuple:
                return tuple(_dense_copy(t) for t in (hidden, encoder) if t is not None)

            values = iter(torch.cond(frame.decision, compute, cached, ()))
            return compose_output(self.layout, next(values), next(values, None))
        slot: RangeSlot = frame.state.slots[self.unit]
        hidden_in, encoder_in = self.range_input
        self.range_input = None
        hidden_residual, encoder_residual = slot.forecaster.predict(frame.coordinate)
        # the text stream, as the eager path treats it: a residual, passed through, or not returned
        has_residual = encoder_residual is not None and encoder is not None
        passes_encoder = not has_residual and not slot.encoder_absent and encoder is not None

        def compute_exit() -> tuple:
            hidden_out, encoder_out = (None if t is None else _dense_copy(t)
                                       for t in split_output(self.layout, original(*args, **kwargs)))
            if has_residual:
                return hidden_out, hidden_out - hidden_in, encoder_out, encoder_out - encoder_in
            computed = (hidden_out, hidden_out - hidden_in)
            return (*computed, encoder_out) if passes_encoder else computed

        def cached_exit() -> tuple:
            reused = (hidden + hidden_residual, _dense_copy(hidden_residual))
            if has_residual:
                return *reused, encoder + encoder_residual, _dense_copy(encoder_residual)
            return (*reused, _dense_copy(encoder)) if passes_encoder else reused

        values = torch.cond(frame.decision, compute_exit, cached_exit, ())
        frame.skipped_if_cached += self.skipped
        if frame.record:
            slot.forecaster.record(frame.coordinate, (values[1], values[3] if has_residual else None))
        encoder_out = values[2] if has_residual or passes_encoder else None
        return compose_output(self.layout, values[0], encoder_out)

    def _record(self, frame: "CallFrame", output: Any) -> None:
        hidden_out, encoder_out = split_output(self.layout, output)
        hidden_in, encoder_in = self.range_input
        self.range_input = None
        slot: RangeSlot = frame.state.slots[self.unit]
        slot.encoder_absent = self.layout.encoder_out is not None and encoder_out is None
        if not frame.record:
            return
        encoder_residual = None
        if encoder_out is not None and encoder_in is not None and encoder_out.shape == encoder_in.shape:
            encoder_residual = encoder_out - encoder_in
        hidden_residual = hidden_out - hidden_in
        slot.forecaster.record(frame.coordinate, (hidden_residual, encoder_residual))
        if self.is_last_segment:
            self.runtime.note_quantity(frame, hidden_residual)

    def _forecast(self, frame: "CallFrame", args: tuple, kwargs: dict):
        frame.skipped.extend(self.skipped)
        hidden, encoder = self.streams.read(args, kwargs)
        slot: RangeSlot = frame.state.slots[self.unit]
        hidden_residual, encoder_residual = slot.forecaster.predict(frame.coordinate)
        hidden_out = hidden + hidden_residual
        if slot.encoder_absent:
            encoder_out = None
        elif encoder_residual is not None and encoder is not None:
            encoder_out = encoder + encoder_residual
        else:
            encoder_out = encoder
        return compose_output(self.layout, hidden_out, encoder_out)

    _record_untraced = torch.compiler.disable(_record)
    _forecast_untraced = torch.compiler.disable(_forecast)


def _dense_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: the two branches of a `torch.cond` must return tensors laid out alike
    (a block's outputs may be views at an offset) and may not alias their inputs."""
    return tensor.clone(memory_format=torch.contiguous_format)


def apply_block_range(runtime: "CacheRuntime", model: torch.nn.Module, layout: ModelLayout,
                      scope: BlockRangeScope) -> list[InstalledHook]:
    """Installs the range hooks (and the head probe hook when the decision needs one).

    The cached range is cut into segments where the image stream changes shape between block
    lists (`range_segments`); each segment records and adds its own residual, and the first
    segment's entry block decides for all.
    """
    blocks = transformer_blocks(model, layout)
    if scope.first + scope.last >= len(blocks):
        raise ValueError(f"{scope.name} scope: first={scope.first} + last={scope.last} leaves no block to cache "
                         f"in {type(model).__name__} ({len(blocks)} blocks); lower first/last")
    decision = runtime.trigger.signal
    if decision == "probe" and blocks[0].layout.probe is None:
        block = blocks[0].module
        raise ValueError(f"TeaCache needs the modulated input of {type(block).__name__}, which has no probe; "
                         "register one with " + registration_call(
                             block, blocks[0].layout, probe="<fn(block, bound_args) -> tensor (B, N, D)>"))
    segment_of = {ref.name: index for index, segment in enumerate(range_segments(blocks)) for ref in segment}
    if decision == "head_residual" and segment_of[blocks[0].name] != segment_of[blocks[scope.first].name]:
        raise ValueError(f"{scope.name} scope: the head blocks end at {blocks[scope.first - 1].name}, after which "
                         f"{type(model).__name__} changes the image stream's shape; the head residual cannot be "
                         "compared across it, lower first")
    middle = blocks[scope.first:len(blocks) - scope.last]
    update = runtime.config.update
    hooks: list[BlockRangeHook] = []
    last_segment = segment_of[middle[-1].name]
    for index, ref in enumerate(middle):
        segment = segment_of[ref.name]
        is_entry = index == 0 or segment_of[middle[index - 1].name] != segment
        is_exit = index == len(middle) - 1 or segment_of[middle[index + 1].name] != segment
        units = tuple(other.name for other in middle if segment_of[other.name] == segment) if is_exit else ()
        hooks.append(BlockRangeHook(runtime, ref.name, ref.layout, is_entry=is_entry, is_exit=is_exit,
                                    decision=decision if index == 0 else None, probe_here=scope.first == 0,
                                    streams=StreamReader(ref.module, ref.layout),
                                    is_last_segment=segment == last_segment, segment_units=units))
        if is_exit:
            runtime.slot_factories[ref.name] = lambda: RangeSlot(update.new_forecaster())
    segment_exit = hooks[-1]
    for hook in reversed(hooks):  # each entry hands its input to its segment's exit
        segment_exit = hook if hook.is_exit else segment_exit
        hook.exit = segment_exit
    installed = []
    if scope.first > 0 and decision is not None:
        head = HeadProbeHook(runtime, blocks[0].layout, needs_probe=decision == "probe",
                             streams=StreamReader(blocks[0].module, blocks[0].layout))
        head.entry = hooks[0]
        installed.append(install_hook(blocks[0].module, head, "head"))
    for ref, hook in zip(middle, hooks):
        installed.append(install_hook(ref.module, hook, "range"))
    return installed
