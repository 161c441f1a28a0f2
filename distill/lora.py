"""LoRA adapters for diffusers models: add (peft), read, and save in diffusers' LoRA format.

`add_lora` puts a peft `LoraConfig` adapter on a diffusers model with `model.add_adapter`, on
the attention and feed-forward Linear layers of its transformer blocks (`block_lora_targets`,
read off the model by caching's layout discovery, so any transformer family gets them; UNets use
the `LORA_TARGETS` table) or on the `targets` given, and leaves only the LoRA weights trainable.
`save_lora` writes the file `pipe.load_lora_weights` reads: keys `<component>.<module>.lora_A.weight`
/ `.lora_B.weight` as `FluxPipeline.save_lora_weights` writes them, diffusers'
`lora_adapter_metadata` (the LoraConfig, so rank and alpha load as trained) and our own header
keys, e.g. what the adapter was trained for (`accel.solver`, `accel.steps`, `accel.cache`,
`accel.method`), which the stack resolver reads and enforces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
_CONTEXT_FEED_FORWARD = ("ff_context.net.0.proj", "ff_context.net.2")

# Module-name suffixes (peft `target_modules`) of the attention and feed-forward Linear layers.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # double-stream blocks: joint attention and both feed-forwards; single-stream blocks: their
    # attention projections, the MLP input (proj_mlp) and the fused output (proj_out).
    "FluxTransformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD + _CONTEXT_FEED_FORWARD + (
        "proj_mlp", "single_transformer_blocks.*.proj_out"),
    "SD3Transformer2DModel": _JOINT_ATTENTION + _FEED_FORWARD + _CONTEXT_FEED_FORWARD,
    "PixArtTransformer2DModel": tuple(f"{a}.{m}" for a in ("attn1", "attn2") for m in _ATTENTION) + _FEED_FORWARD,
    "WanTransformer3DModel": tuple(f"{a}.{m}" for a in ("attn1", "attn2") for m in _ATTENTION) + (
        "ffn.net.0.proj", "ffn.net.2"),
    "UNet2DConditionModel": tuple(f"{a}.{m}" for a in ("attn1", "attn2") for m in _ATTENTION) + _FEED_FORWARD,
    "UNet2DModel": _ATTENTION,
}


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The default LoRA targets of a model: `block_lora_targets` for a transformer whose blocks
    caching can read off, else the `LORA_TARGETS` entry of its class.

    Raises:
        ValueError: neither is known (the message lists the classes of the table).
    """
    name = type(model).__name__
    found = block_lora_targets(model)
    if found:
        return found
    if name not in LORA_TARGETS:
        raise ValueError(f"no LoRA targets known for {name} (no transformer blocks found); pass targets=[...] "
                         f"(module-name suffixes) or use one of: {', '.join(sorted(LORA_TARGETS))}")
    return LORA_TARGETS[name]


def block_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """Full names of the Linear layers inside the attention and feed-forward children of every
    transformer block, as caching's block layouts name them (`BlockLayout.attention` of every
    kind, and `token_modules`: FLUX's single blocks' `proj_mlp` / `proj_out`); () for a model whose
    blocks caching cannot read off, or a UNet."""
    import caching
    from caching.layouts import transformer_blocks

    try:
        layout = caching.get_model_layout(model)
        blocks = transformer_blocks(model, layout) if layout.kind == "transformer" else []
    except (ValueError, TypeError):
        return ()
    names: list[str] = []
    for ref in blocks:
        children = [n for kind in ref.layout.attention.values() for n in kind] + list(ref.layout.token_modules)
        for child in dict.fromkeys(children):
            module = caching.layouts.submodule(ref.module, child)
            if isinstance(module, nn.Linear):
                names.append(f"{ref.name}.{child}")
            elif module is not None:
                names += [f"{ref.name}.{child}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return tuple(dict.fromkeys(names))


def _peft_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Expands "a.*.b" patterns to the model's matching module names; plain suffixes pass through."""
    expanded: list[str] = []
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in targets:
        if "*" not in target:
            expanded.append(target)
            continue
        head, tail = target.split("*", 1)
        expanded += [n for n in names if n.startswith(head) and n.endswith(tail)
                     and n[len(head):len(n) - len(tail)].isdigit()]
    return sorted(set(expanded))


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, targets: Optional[Sequence[str]] = None,
             adapter_name: str = "default", dropout: float = 0.0) -> nn.Module:
    """Adds a peft LoRA adapter to a diffusers model and makes only its LoRA weights trainable.

    Args:
        model: a diffusers model; `model.add_adapter` (PeftAdapterMixin) is used where the class
            has it, else peft's `inject_adapter_in_model`, which add_adapter calls underneath.
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha (scale alpha / r); None means alpha = rank.
        targets: module-name suffixes to adapt ("a.*.b" matches numbered blocks); None uses
            `lora_targets(model)` (the attention and feed-forward Linears of its blocks).
        adapter_name: the peft adapter name.
        dropout: LoRA dropout.

    Returns:
        The same model, adapted in place.

    Raises:
        ValueError: bad rank, an unknown model class without targets, or targets matching nothing.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank: {rank!r} must be an integer >= 1")
    names = _peft_targets(model, lora_targets(model) if targets is None else targets)
    if not names:
        raise ValueError(f"LoRA targets {list(targets or [])} match no Linear module of {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                        target_modules=names, init_lora_weights=True)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin
        model.add_adapter(config, adapter_name=adapter_name)
    else:  # models without the mixin (PixArt, UNet2DModel): what add_adapter calls underneath
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name and f".{adapter_name}." in name)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as diffusers saves them (`<module>.lora_A.weight`, no prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def _adapter_metadata(model: nn.Module, adapter_name: str, component: str) -> str:
    """diffusers' `lora_adapter_metadata` header: the LoraConfig with keys prefixed by the component."""
    config = model.peft_config[adapter_name].to_dict()
    packed = {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def save_lora(model: nn.Module, path: str | Path, component: str = "transformer",
              metadata: Optional[dict[str, str]] = None, adapter_name: str = "default") -> Path:
    """Writes the adapter as a diffusers-format LoRA .safetensors file.

    Args:
        model: a model with a peft adapter (see `add_lora`).
        path: a .safetensors file, or a folder (then `pytorch_lora_weights.safetensors` in it).
        component: the pipeline component the adapter belongs to ("transformer" or "unet").
        metadata: extra safetensors header entries, strings only (e.g. {"accel.steps": "4"}).
        adapter_name: the peft adapter to save.

    Returns:
        The file written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHT_NAME
    extra = dict(metadata or {})
    bad = {k: v for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"LoRA metadata must map strings to strings; got {bad}")
    reserved = {"format", ADAPTER_METADATA_KEY} & set(extra)
    if reserved:
        raise ValueError(f"LoRA metadata keys {sorted(reserved)} are written by save_lora itself")
    tensors = {f"{component}.{k}": v.detach().to("cpu").contiguous()
               for k, v in lora_state_dict(model, adapter_name).items()}
    header = {"format": "pt", ADAPTER_METADATA_KEY: _adapter_metadata(model, adapter_name, component), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path
