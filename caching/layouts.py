"""The one registry of block layouts: where each model keeps its blocks and how each block's streams flow.

Every cache scope needs the same few facts about a model, and nothing else about it:

* which attributes hold its block lists (``transformer_blocks``, ``single_transformer_blocks``, ...)
  or, for a UNet, its down / mid / up blocks;
* for each block class, which arguments carry the image stream (``hidden_states``) and the text
  stream (``encoder_hidden_states``), where they sit in the block's return value (FLUX's double
  blocks return ``(encoder_hidden_states, hidden_states)``), which submodules are its attention and
  MLP layers, which submodules act token by token, and how to read its timestep-modulated input
  (what TeaCache watches).

Those facts come from one place: `get_model_layout` / `get_block_layout`. An explicit registration
(`register_model_layout`, `register_block_layout`) wins; otherwise they are read off the model and
its blocks (`caching.discovery`: known block-list names, diffusers' own block metadata, the block's
forward signature and return statements, its attention and feed-forward children). What cannot be
read off raises a one-line error naming the exact registration to make.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from . import discovery

ProbeFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class BlockLayout:
    """How one block class takes and returns its streams.

    Attributes:
        hidden_arg: name of the forward argument holding the image tokens (B, N, D).
        encoder_arg: name of the argument holding the text tokens (B, T, D), if the block
            updates them (then `encoder_out` is set too); None when text only passes through.
        hidden_out: index of the image stream in the returned tuple; None when the block
            returns the image stream as a bare tensor.
        encoder_out: index of the text stream in the returned tuple, or None.
        attention: attention-like submodules by kind ("self", "cross", "mlp"), as attribute names.
        token_modules: submodules that act token by token on (B, N, D) inputs (MLPs, linears).
        probe: returns the block's timestep-modulated input (B, N, D) from the bound forward
            arguments, without running the block (TeaCache's indicator).
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = None
    hidden_out: int | None = None
    encoder_out: int | None = None
    attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    token_modules: tuple[str, ...] = ()
    probe: ProbeFn | None = None

    @property
    def output_length(self) -> int | None:
        """Length of the returned tuple, or None for a bare tensor."""
        if self.hidden_out is None:
            return None
        return 1 + max(self.hidden_out, self.encoder_out if self.encoder_out is not None else -1)


@dataclass(frozen=True)
class ModelLayout:
    """Where a model keeps its blocks.

    Attributes:
        kind: "transformer" (a chain of blocks) or "unet" (down / mid / up blocks).
        block_lists: for transformers, the ``nn.ModuleList`` attributes in execution order.
        down: for UNets, the down-block list attribute; `mid` and `up` likewise.
    """

    kind: Literal["transformer", "unet"]
    block_lists: tuple[str, ...] = ()
    down: str = "down_blocks"
    mid: str = "mid_block"
    up: str = "up_blocks"


@dataclass(frozen=True)
class BlockRef:
    """One block of a model's chain: its path from the model root, the module and its layout."""

    name: str
    module: nn.Module
    layout: BlockLayout


_MODEL_LAYOUTS: dict[type, ModelLayout] = {}
_BLOCK_LAYOUTS: dict[type, BlockLayout] = {}
_DEFAULTS_LOADED = [False]


def register_model_layout(model_cls: type, layout: ModelLayout) -> None:
    """Declares where `model_cls` keeps its blocks (see ModelLayout)."""
    _load_defaults()
    _MODEL_LAYOUTS[model_cls] = layout


def register_block_layout(block_cls: type, layout: BlockLayout) -> None:
    """Declares how `block_cls` takes and returns its streams (see BlockLayout)."""
    _load_defaults()
    _BLOCK_LAYOUTS[block_cls] = layout


def get_model_layout(model: nn.Module) -> ModelLayout:
    """The layout of `model`: its class's (or nearest base class's) registration, else discovered.

    Raises:
        ValueError: nothing is registered and discovery cannot find the blocks (the message
            names the registration to make).
    """
    _load_defaults()
    for cls in type(model).__mro__:
        if cls in _MODEL_LAYOUTS:
            return _MODEL_LAYOUTS[cls]
    return discovery.discover_model_layout(model)


def get_block_layout(block: nn.Module) -> BlockLayout:
    """The layout of `block`: its class's registration, else read off the block (caching.discovery).

    Raises:
        ValueError: nothing is registered and the block's streams cannot be read off (the message
            names the registration to make).
    """
    _load_defaults()
    for cls in type(block).__mro__:
        if cls in _BLOCK_LAYOUTS:
            return _BLOCK_LAYOUTS[cls]
    delegate = discovery.delegate_of(block)
    if delegate is not None:
        attr, child = delegate
        return _prefixed(get_block_layout(child), attr)
    attention, tokens = discovery.discover_submodules(block)
    named = [name for kind in ("self", "cross") for name in attention.get(kind, ())]
    probe = discovery.first_attention_probe(tuple(named)) if named else None
    return BlockLayout(**discovery.discover_streams(type(block)), attention=attention, token_modules=tokens,
                       probe=probe)


def _prefixed(layout: BlockLayout, attr: str) -> BlockLayout:
    """The layout of a block that returns `self.<attr>(...)`: its child's, with submodule paths under attr."""
    probe = layout.probe
    return dataclasses.replace(
        layout, attention={kind: tuple(f"{attr}.{n}" for n in names) for kind, names in layout.attention.items()},
        token_modules=tuple(f"{attr}.{n}" for n in layout.token_modules),
        probe=None if probe is None else (lambda block, bound: probe(getattr(block, attr), bound)))


def registration_call(block: nn.Module, layout: BlockLayout, **fields: Any) -> str:
    """The `register_block_layout` call that reproduces `layout` for `block`'s class, with `fields` changed.

    A delegating block (one returning `self.<child>(...)`) names its child's class, whose
    registration it follows.
    """
    delegate = discovery.delegate_of(block)
    if delegate is not None and type(block) not in _BLOCK_LAYOUTS:
        prefix = delegate[0] + "."
        layout = dataclasses.replace(
            layout, attention={k: tuple(n.removeprefix(prefix) for n in v) for k, v in layout.attention.items()},
            token_modules=tuple(n.removeprefix(prefix) for n in layout.token_modules))
        block = delegate[1]
    values = dict(hidden_arg=layout.hidden_arg, encoder_arg=layout.encoder_arg, hidden_out=layout.hidden_out,
                  encoder_out=layout.encoder_out, attention=dict(layout.attention),
                  token_modules=layout.token_modules)
    values.update({key: discovery.Placeholder(value) for key, value in fields.items()})
    return discovery.block_layout_call(type(block).__name__, **values)


def range_segments(blocks: list[BlockRef]) -> list[list[BlockRef]]:
    """`blocks` cut where a residual cannot span: at a block-list boundary unless both sides keep
    the text stream separate (then the image stream keeps its shape across the boundary).

    FLUX's double and single blocks both take and return (hidden, encoder): one segment. Flux2,
    Chroma, AuraFlow and HiDream concatenate text and image before their single blocks: two.
    """
    segments: list[list[BlockRef]] = []
    for ref in blocks:
        if segments:
            prev = segments[-1][-1]
            same_list = prev.name.rsplit(".", 1)[0] == ref.name.rsplit(".", 1)[0]
            keeps_streams = prev.layout.encoder_arg is not None and ref.layout.encoder_arg is not None
            if same_list or keeps_streams:
                segments[-1].append(ref)
                continue
        segments.append([ref])
    return segments


def transformer_blocks(model: nn.Module, layout: ModelLayout) -> list[BlockRef]:
    """The model's blocks in execution order, each with its layout."""
    refs = []
    for attr in layout.block_lists:
        blocks = getattr(model, attr, None)
        if blocks is None:
            continue
        for index, block in enumerate(blocks):
            refs.append(BlockRef(f"{attr}.{index}", block, get_block_layout(block)))
    if not refs:
        raise ValueError(f"{type(model).__name__} has no blocks under {layout.block_lists}")
    return refs


submodule = discovery.submodule


def bind_arguments(module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                   names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Maps positional and keyword arguments of `module.forward` to their parameter names (`names`
    when the caller looked them up already: torch.compile then traces this as a plain dict)."""
    bound = dict(zip(discovery.forward_parameters(type(module)) if names is None else names, args))
    bound.update(kwargs)
    return bound


def replace_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any):
    """Returns (args, kwargs) with argument `name` replaced by `value`."""
    names = discovery.forward_parameters(type(module))
    if name in kwargs or name not in names or names.index(name) >= len(args):
        return args, {**kwargs, name: value}
    index = names.index(name)
    return args[:index] + (value,) + args[index + 1:], kwargs


def read_streams(layout: BlockLayout, bound: Mapping[str, Any]):
    """(hidden_states, encoder_hidden_states or None) from the bound arguments of a block call."""
    hidden = bound.get(layout.hidden_arg)
    encoder = bound.get(layout.encoder_arg) if layout.encoder_arg is not None else None
    return hidden, encoder


class StreamReader:
    """Reads a block's image and text streams straight from a call's (args, kwargs).

    The argument positions are looked up once, when a hook is installed, so reading costs two
    index operations per call and no signature work (and torch.compile traces it as plain
    indexing).

    Args:
        module: the block whose forward is called.
        layout: the block's layout.
    """

    __slots__ = ("hidden_arg", "encoder_arg", "hidden_position", "encoder_position", "parameter_names")

    def __init__(self, module: nn.Module, layout: BlockLayout) -> None:
        names = self.parameter_names = discovery.forward_parameters(type(module))
        self.hidden_arg, self.encoder_arg = layout.hidden_arg, layout.encoder_arg
        missing = 1 << 30  # an argument only ever passed by keyword
        self.hidden_position = names.index(layout.hidden_arg) if layout.hidden_arg in names else missing
        self.encoder_position = (names.index(layout.encoder_arg) if layout.encoder_arg in names else missing)

    def read(self, args: tuple, kwargs: Mapping[str, Any]):
        """(hidden_states, encoder_hidden_states or None) of one call, as `read_streams` returns them."""
        hidden = args[self.hidden_position] if self.hidden_position < len(args) else kwargs.get(self.hidden_arg)
        if self.encoder_arg is None:
            return hidden, None
        encoder = (args[self.encoder_position] if self.encoder_position < len(args)
                   else kwargs.get(self.encoder_arg))
        return hidden, encoder


def split_output(layout: BlockLayout, output: Any):
    """(hidden_states, encoder_hidden_states or None) from a block's return value."""
    if layout.hidden_out is None:
        return output, None
    encoder = output[layout.encoder_out] if layout.encoder_out is not None else None
    return output[layout.hidden_out], encoder


def compose_output(layout: BlockLayout, hidden: torch.Tensor, encoder: torch.Tensor | None):
    """A block return value holding `hidden` and `encoder` in the layout's order."""
    if layout.hidden_out is None:
        return hidden
    out: list[Any] = [None] * layout.output_length
    out[layout.hidden_out] = hidden
    if layout.encoder_out is not None:
        out[layout.encoder_out] = encoder
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Probes: the timestep-modulated input of a block, computed without running the block.


def _probe_ada_zero(attr: str) -> ProbeFn:
    def probe(block: nn.Module, bound: Mapping[str, Any]) -> torch.Tensor:
        return getattr(block, attr)(bound["hidden_states"], emb=bound["temb"])[0]
    return probe


def _probe_basic(block: nn.Module, bound: Mapping[str, Any]) -> torch.Tensor:
    hidden = bound["hidden_states"]
    timestep = bound.get("timestep")
    if block.norm_type == "ada_norm_zero":
        return block.norm1(hidden, timestep, bound.get("class_labels"), hidden_dtype=hidden.dtype)[0]
    if block.norm_type == "ada_norm":
        return block.norm1(hidden, timestep)
    if block.norm_type == "ada_norm_single":
        table = block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)
        shift, scale = table.chunk(6, dim=1)[:2]
        return block.norm1(hidden) * (1 + scale) + shift
    if block.norm_type == "ada_norm_continuous":
        return block.norm1(hidden, bound["added_cond_kwargs"]["pooled_text_emb"])
    return block.norm1(hidden)


def _probe_wan(block: nn.Module, bound: Mapping[str, Any]) -> torch.Tensor:
    hidden, temb = bound["hidden_states"], bound["temb"]
    if temb.ndim == 4:
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)


def _load_defaults() -> None:
    """Registers the block classes whose layout says more than discovery finds (lazily: importing
    diffusers is slow): FLUX single blocks' token-wise projections, SD3's second self attention,
    and hand-written TeaCache probes."""
    if _DEFAULTS_LOADED[0]:
        return
    _DEFAULTS_LOADED[0] = True
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    joint = dict(encoder_arg="encoder_hidden_states", hidden_out=1, encoder_out=0)
    register_block_layout(FluxTransformerBlock, BlockLayout(
        **joint, attention={"self": ("attn",), "mlp": ("ff", "ff_context")},
        token_modules=("ff", "ff_context"), probe=_probe_ada_zero("norm1")))
    register_block_layout(FluxSingleTransformerBlock, BlockLayout(
        **joint, attention={"self": ("attn",), "mlp": ("proj_mlp",)},
        token_modules=("proj_mlp", "proj_out"), probe=_probe_ada_zero("norm")))
    register_block_layout(JointTransformerBlock, BlockLayout(
        **joint, attention={"self": ("attn", "attn2"), "mlp": ("ff", "ff_context")},
        token_modules=("ff", "ff_context"), probe=_probe_ada_zero("norm1")))
    register_block_layout(BasicTransformerBlock, BlockLayout(
        attention={"self": ("attn1",), "cross": ("attn2",), "mlp": ("ff",)},
        token_modules=("ff",), probe=_probe_basic))
    register_block_layout(WanTransformerBlock, BlockLayout(
        attention={"self": ("attn1",), "cross": ("attn2",), "mlp": ("ffn",)},
        token_modules=("ffn",), probe=_probe_wan))

