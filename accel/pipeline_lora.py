"""LoRA adapters of a stack on a diffusers pipeline: load, scale, fuse, and take off exactly.

`accel.apply` loads the stack's adapters under names of its own (`accel_0`, `accel_1`, ...), so
that `accel.remove` deletes only those and leaves adapters the user loaded after apply in place.
Unfusing subtracts the LoRA delta again, which is not bitwise the original (measured: 1e-7 off),
so fusing first keeps a CPU copy of every weight it changes and removal copies it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from accel.adapter_files import check_adapter_file
from accel.stack import AdapterPlan, StackError

# Attributes that loading / fusing LoRA adds to a pipeline or a model; removed if absent before.
LORA_ATTRIBUTES = ("_merged_adapters", "_hf_peft_config_loaded", "_safe_fusing", "lora_scale", "peft_config")
ADAPTER_PREFIX = "accel_"


@dataclass
class LoadedAdapters:
    """What loading the stack's adapters changed on a pipeline.

    Attributes:
        names: the adapters loaded (accel_0, accel_1, ...).
        fused_components: pipeline components the adapters were fused into.
        saved_weights: (parameter, CPU copy of its value before fusing).
        attributes: (object, its attribute names before loading) for the pipeline and its models.
    """

    names: list[str] = field(default_factory=list)
    fused_components: list[str] = field(default_factory=list)
    saved_weights: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attributes: list[tuple[Any, set[str]]] = field(default_factory=list)


def lora_components(pipe: Any) -> list[str]:
    """The pipeline's components that take LoRA weights (`_lora_loadable_modules` present)."""
    return [name for name in getattr(pipe, "_lora_loadable_modules", ())
            if isinstance(getattr(pipe, name, None), torch.nn.Module)]


def adapter_names(pipe: Any) -> set[str]:
    """Every LoRA adapter loaded in the pipeline's components, by name."""
    names: set[str] = set()
    for component in lora_components(pipe):
        names.update(getattr(getattr(pipe, component), "peft_config", None) or {})
    return names


def load_adapters(pipe: Any, adapters: tuple[AdapterPlan, ...], loaded: LoadedAdapters) -> None:
    """Loads `adapters` into `pipe`, sets their scales and fuses them if asked (saving the weights
    first). Fills `loaded` as it goes, so a failure part way can still be undone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    objects = [pipe, *(getattr(pipe, name) for name in lora_components(pipe))]
    loaded.attributes = [(obj, set(vars(obj))) for obj in objects]
    for index, adapter in enumerate(adapters):
        file = check_adapter_file(adapter.path)
        name = f"{ADAPTER_PREFIX}{index}"
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        loaded.names.append(name)
    pipe.set_adapters(loaded.names, adapter_weights=[a.scale for a in adapters])
    if not adapters[0].fuse:
        return
    loaded.fused_components = lora_components(pipe)
    for component in loaded.fused_components:
        for module in getattr(pipe, component).modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                for param in (base.weight, getattr(base, "bias", None)):
                    if param is not None:
                        loaded.saved_weights.append((param, param.detach().to("cpu", copy=True)))
    pipe.fuse_lora(components=loaded.fused_components, adapter_names=loaded.names)


def check_removable(pipe: Any, loaded: LoadedAdapters) -> None:
    """Refuses removal that would take adapters the user added after apply with it.

    Raises:
        StackError: the stack's adapters are fused and the user loaded others since (unfusing and
            restoring the saved weights would undo the user's fused deltas too).
    """
    others = sorted(adapter_names(pipe) - set(loaded.names))
    if loaded.fused_components and others:
        raise StackError(f"accel.remove: LoRA adapters {others} were loaded after apply while the stack's "
                         f"adapters are fused into the weights; delete them first "
                         f"(pipe.delete_adapters({others})) and call accel.remove(pipe) again")


def unload_adapters(pipe: Any, loaded: LoadedAdapters) -> None:
    """Takes the stack's adapters off exactly; adapters the user loaded later stay active."""
    if loaded.fused_components:
        pipe.unfuse_lora(components=loaded.fused_components)
    others = adapter_names(pipe) - set(loaded.names)
    if loaded.names and others:
        pipe.delete_adapters([name for name in loaded.names if name in adapter_names(pipe)])
    elif loaded.names:
        pipe.unload_lora_weights()
    with torch.no_grad():
        for param, value in loaded.saved_weights:
            param.copy_(value.to(param.device))
    if others:
        return
    for obj, before in loaded.attributes:
        for name in LORA_ATTRIBUTES:
            if name not in before:
                vars(obj).pop(name, None)
