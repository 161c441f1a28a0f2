"""Block layouts read off the model itself, for the classes nobody registered.

`caching.layouts` consults explicit registrations first; everything else comes from here:

* **Block lists.** The model's ``nn.ModuleList`` attributes whose name is a known block-list name
  (`BLOCK_LIST_NAMES`), ordered by where the model's ``forward`` first reads them. Lists under
  other names (Lumina2's ``noise_refiner`` / ``context_refiner``, which refine one stream before
  the joint blocks) are not part of the chain. A model with ``down_blocks`` and ``up_blocks`` is a
  UNet.
* **Streams of a block.** diffusers' own `TransformerBlockRegistry` (the metadata its cache hooks
  use) gives argument names and return indices where it has the class; otherwise the block's
  ``forward`` signature and its ``return`` statements, parsed with `ast`, do: a returned tensor
  means a bare output, a returned tuple of names gives the indices of the image and text streams,
  ``return self.<child>(...)`` delegates to the child block (HiDream wraps each block so).
* **Submodules.** Children that are diffusers attention modules are "self" or "cross" attention;
  feed-forward children are the "mlp" kind and the token-wise modules.
* **TeaCache's probe** of a discovered block is the input of its first attention call, captured
  by running the block's forward up to that call and no further.

Whatever cannot be read off raises a one-line ValueError naming the registration to make.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any, Mapping

import torch
from torch import nn

# ModuleList attribute names that hold a model's chain of blocks.
BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers",
                    "double_stream_blocks", "single_stream_blocks", "joint_transformer_blocks",
                    "double_blocks", "single_blocks")

_ReturnForm = tuple[str, Any]  # ("tensor", name) | ("tuple", (names...)) | ("call", child) | ("other", source)


def model_layout_call(model_name: str, block_lists: str = "'<ModuleList attribute>', ...") -> str:
    """The registration a user makes for a model whose blocks cannot be found."""
    return (f"caching.register_model_layout({model_name}, caching.ModelLayout(kind='transformer', "
            f"block_lists=({block_lists},)))")


def block_layout_call(block_name: str, **fields: Any) -> str:
    """The registration a user makes for a block class, with the given BlockLayout fields."""
    rendered = ", ".join(f"{key}={value if isinstance(value, Placeholder) else repr(value)}"
                         for key, value in fields.items())
    return f"caching.register_block_layout({block_name}, caching.BlockLayout({rendered}))"


class Placeholder(str):
    """A field value printed as is (e.g. <index or None>) in a registration call."""


# ----------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def _forward_tree(cls: type) -> ast.FunctionDef | None:
    """The parsed ``forward`` of `cls` (None when its source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
    except (OSError, TypeError):
        return None
    node = ast.parse(source).body[0]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _own_nodes(func: ast.AST):
    """The nodes of a function body, not descending into nested functions, lambdas or classes."""
    for child in ast.iter_child_nodes(func):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield from _own_nodes(child)


def _self_attributes(node: ast.AST) -> list[str]:
    """Names X of every ``self.X`` read inside `node`, in source order."""
    found = [(n.lineno, n.col_offset, n.attr) for n in ast.walk(node) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "self"]
    return [name for *_, name in sorted(found)]


def discover_model_layout(model: nn.Module):
    """The ModelLayout of a model nobody registered: a UNet, or its known block lists in forward order."""
    from .layouts import ModelLayout

    name = type(model).__name__
    if isinstance(getattr(model, "down_blocks", None), nn.ModuleList) and isinstance(
            getattr(model, "up_blocks", None), nn.ModuleList):
        return ModelLayout("unet")
    lists = [attr for attr, child in model.named_children()
             if attr in BLOCK_LIST_NAMES and isinstance(child, nn.ModuleList) and len(child)]
    if not lists:
        others = [attr for attr, child in model.named_children() if isinstance(child, nn.ModuleList)]
        hint = ", ".join(repr(a) for a in others) if others else "'<ModuleList attribute>', ..."
        raise ValueError(f"{name} has no block layout: no nn.ModuleList attribute is named one of "
                         f"{', '.join(BLOCK_LIST_NAMES)}; register its chain with {model_layout_call(name, hint)}")
    if len(lists) == 1:
        return ModelLayout("transformer", tuple(lists))
    return ModelLayout("transformer", _in_forward_order(type(model), lists))


def _in_forward_order(cls: type, lists: list[str]) -> tuple[str, ...]:
    """`lists` ordered by where `cls.forward` first reads them; refuses interleaved or unread lists."""
    tree = _forward_tree(cls)
    call = model_layout_call(cls.__name__, ", ".join(repr(a) for a in lists))
    if tree is None:
        raise ValueError(f"{cls.__name__}: cannot read forward to order its block lists {lists}; "
                         f"register them in execution order with {call}")
    for node in _own_nodes(tree):
        if isinstance(node, ast.For):
            together = sorted({a for a in _self_attributes(node.iter) if a in lists})
            if len(together) > 1:
                raise ValueError(f"{cls.__name__} runs the block lists {together} interleaved, not one after "
                                 f"the other; register the chain to cache with {call}")
    reads = _self_attributes(tree)
    unread = [a for a in lists if a not in reads]
    if unread:
        raise ValueError(f"{cls.__name__}.forward does not read the block lists {unread}; register the chain "
                         f"in execution order with {call}")
    return tuple(sorted(lists, key=reads.index))


# ----------------------------------------------------------------------------------------- blocks


@functools.lru_cache(maxsize=None)
def forward_parameters(cls: type) -> tuple[str, ...]:
    """Names of the parameters of `cls.forward` after self."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _return_form(value: ast.expr | None) -> _ReturnForm:
    if isinstance(value, ast.Tuple):
        return "tuple", tuple(e.id if isinstance(e, ast.Name) else ast.unparse(e) for e in value.elts)
    if isinstance(value, ast.Name):
        return "tensor", value.id
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and isinstance(value.func.value,
                                                                                            ast.Name):
        if value.func.value.id == "self":
            return "call", value.func.attr
        return "tensor", value.func.value.id  # e.g. hidden_states.to(dtype)
    if isinstance(value, (ast.BinOp, ast.UnaryOp)):
        return "tensor", ast.unparse(value)  # e.g. hidden_states + ff_output
    return "other", ast.unparse(value) if value is not None else "None"


@functools.lru_cache(maxsize=None)
def return_forms(cls: type) -> tuple[_ReturnForm, ...] | None:
    """The form of every ``return`` of `cls.forward` (None when its source is not available)."""
    tree = _forward_tree(cls)
    if tree is None:
        return None
    return tuple(_return_form(node.value) for node in _own_nodes(tree) if isinstance(node, ast.Return))


def delegate_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute, child) when every return of the block's forward is ``self.<child>(...)`` of a child block."""
    forms = set(return_forms(type(block)) or ())
    if len(forms) != 1:
        return None
    kind, attr = next(iter(forms))
    child = getattr(block, attr, None) if kind == "call" else None
    if isinstance(child, nn.Module) and forward_parameters(type(child))[:1] == forward_parameters(type(block))[:1]:
        return attr, child
    return None


def streams_from_metadata(cls: type) -> dict[str, Any] | None:
    """The streams of `cls` from diffusers' TransformerBlockRegistry, or None where it lacks the class.

    diffusers decides at run time whether a block whose metadata names no text-stream index returns
    a tuple or a tensor; here a ``return <tensor>`` in the forward means a bare tensor.
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry
    try:
        meta = TransformerBlockRegistry.get(cls)
    except ValueError:
        return None
    if meta.return_encoder_hidden_states_index is not None:
        return dict(hidden_arg=meta.hidden_states_argument_name, encoder_arg=meta.encoder_hidden_states_argument_name,
                    hidden_out=meta.return_hidden_states_index, encoder_out=meta.return_encoder_hidden_states_index)
    forms = return_forms(cls)
    if forms is None:
        return None
    is_bare = any(kind == "tensor" for kind, _ in forms)
    return dict(hidden_arg=meta.hidden_states_argument_name, encoder_arg=None,
                hidden_out=None if is_bare else meta.return_hidden_states_index, encoder_out=None)


def streams_from_source(cls: type) -> dict[str, Any]:
    """The streams of `cls` from its forward: the image argument is ``hidden_states`` (else the first),
    the text argument ``encoder_hidden_states``; a returned tensor is a bare output, a returned tuple of
    those names gives their indices.

    Raises:
        ValueError: the returns say neither (other values in the tuple, different forms, no source).
    """
    params = forward_parameters(cls)
    hidden = "hidden_states" if "hidden_states" in params else (params[0] if params else "hidden_states")
    encoder = "encoder_hidden_states" if "encoder_hidden_states" in params else None
    forms = return_forms(cls)
    if forms and all(kind == "tensor" for kind, _ in forms):
        return dict(hidden_arg=hidden, encoder_arg=None, hidden_out=None, encoder_out=None)
    if forms and len(set(forms)) == 1 and forms[0][0] == "tuple":
        names = forms[0][1]
        if hidden in names and set(names) <= {hidden, encoder} and len(set(names)) == len(names):
            has_encoder = encoder in names
            return dict(hidden_arg=hidden, encoder_arg=encoder if has_encoder else None,
                        hidden_out=names.index(hidden), encoder_out=names.index(encoder) if has_encoder else None)
    shown = "; ".join(f"return {v if k != 'tuple' else '(' + ', '.join(v) + ')'}" for k, v in forms or ())
    call = block_layout_call(cls.__name__, hidden_arg=hidden, encoder_arg=encoder,
                             hidden_out=Placeholder("<index or None>"), encoder_out=Placeholder("<index or None>"))
    raise ValueError(f"block class {cls.__name__} has no block layout and its forward's returns "
                     f"({shown or 'source not available'}) do not say where the streams are; register it with {call}")


def discover_streams(cls: type) -> dict[str, Any]:
    """hidden_arg, encoder_arg, hidden_out and encoder_out of a block class nobody registered:
    diffusers' metadata where it has the class, else the class's forward source."""
    return streams_from_metadata(cls) or streams_from_source(cls)


def discover_submodules(block: nn.Module) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(attention by kind, token-wise modules) among the block's direct children.

    Attention: diffusers' Attention and AttentionModuleMixin modules, and modules named *Attention
    that dispatch to an attention processor; "cross" where the module says `is_cross_attention`
    (or, without that attribute, is named attn2). Feed-forwards (diffusers' FeedForward and classes
    named *FeedForward*) are the "mlp" kind and act token by token.
    """
    from diffusers.models.attention import AttentionModuleMixin, FeedForward
    from diffusers.models.attention_processor import Attention

    kinds: dict[str, list[str]] = {"self": [], "cross": [], "mlp": []}
    tokens = []
    for name, child in block.named_children():
        is_attention = isinstance(child, (Attention, AttentionModuleMixin)) or (  # e.g. MochiAttention
            type(child).__name__.endswith("Attention") and callable(getattr(child, "processor", None)))
        if is_attention:
            is_cross = getattr(child, "is_cross_attention", None)
            kinds["cross" if (name == "attn2" if is_cross is None else is_cross) else "self"].append(name)
        elif isinstance(child, FeedForward) or "FeedForward" in type(child).__name__:
            kinds["mlp"].append(name)
            tokens.append(name)
    return {kind: tuple(names) for kind, names in kinds.items() if names}, tuple(tokens)


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted `path` under `block` (e.g. "block.attn1"), or None where absent."""
    module: Any = block
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


class _AttentionReached(Exception):
    """Raised by the probe's pre-hook to stop a block's forward at its first attention call."""


def first_attention_probe(names: tuple[str, ...]):
    """A TeaCache probe: the input (B, N, D) of the first of the attention modules `names` the block calls.

    The block's own class forward runs until that call, which a pre-hook captures and stops; what
    runs is the block's normalisation and timestep modulation, nothing after them.
    """

    def probe(block: nn.Module, bound: Mapping[str, Any]) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            raise _AttentionReached

        modules = [m for m in (submodule(block, name) for name in names) if m is not None]
        handles = [module.register_forward_pre_hook(grab, with_kwargs=True) for module in modules]
        try:
            type(block).forward(block, **bound)
        except _AttentionReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise ValueError(f"TeaCache probe: {type(block).__name__} returned without calling any of {names}")
        return captured[0]

    return probe
