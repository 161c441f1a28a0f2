"""What a distilled adapter file says about itself: its safetensors header.

The resolver (`adapter-trained-for`), the native and pipeline paths and `accel bench distill` read
adapters through these helpers, so a file or a folder holding one is accepted the same way
everywhere. Adapter files are read with safetensors only (never unpickled); `check_adapter_file`
refuses a file that is not a whole safetensors file or holds NaN or infinity, and
`check_adapter_fits` a LoRA whose shapes do not fit the model, each with one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from accel.io import first_line
from accel.data_files import DataFileError, resolve_data_file
from accel.stack import StackError

# Safetensors metadata keys by which a distilled adapter names what it was trained for.
TRAINED_FOR_KEYS = ("accel.solver", "accel.steps", "accel.cache", "accel.uncond_interval")
# The weights identity (accel.lab.fingerprint.module_identity) of the denoiser an adapter was trained on.
BASE_MODEL_KEY = "accel.base_model"
# The recipe key that sets each of them (for the fix in a refusal).
TRAINED_FOR_RECIPE_KEYS = {"solver": "sampler.solver", "steps": "sampler.steps", "cache": "cache.preset",
                           "uncond_interval": "guidance.uncond_interval"}


def read_trained_for(path: str | Path) -> dict[str, str]:
    """The (solver, steps, cache) an adapter file says it was trained for, from its metadata.

    Args:
        path: a .safetensors file, or a folder holding one.

    Returns:
        The present keys of TRAINED_FOR_KEYS, without the "accel." prefix.
    """
    metadata = read_adapter_metadata(path)
    return {key.split(".", 1)[1]: str(metadata[key]) for key in TRAINED_FOR_KEYS if key in metadata}


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The whole safetensors header metadata of an adapter file (or of the one file in a folder)."""
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise StackError(f"adapter {str(file)!r}: not a readable safetensors file ({first_line(error)}); "
                         "give a diffusers LoRA .safetensors file") from None


def load_adapter_tensors(path: str | Path) -> dict:
    """Every tensor of an adapter file, read with safetensors, all checked to be finite.

    Raises:
        StackError: the file is not a whole safetensors file, or a tensor holds NaN or infinity.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    read_adapter_metadata(file)  # a readable header first, with its own message
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise StackError(f"adapter {str(file)!r}: cannot read its tensors ({first_line(error)})") from None
    if not tensors:
        raise StackError(f"adapter {str(file)!r}: holds no tensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StackError(f"adapter {str(file)!r}: tensor {name} holds NaN or infinity; retrain or re-export it")
    return tensors


def check_adapter_file(path: str | Path) -> Path:
    """The adapter's file, after checking it is a whole safetensors file of finite tensors."""
    load_adapter_tensors(path)
    return adapter_file(path)


def check_adapter_fits(model, path: str | Path, prefix: str) -> Path:
    """Checks a diffusers-format LoRA (`<prefix>.<layer>.lora_A.weight` (rank, in) and `lora_B.weight`
    (out, rank)) fits the linear layers of `model`; returns the file. Keys of other formats are left
    to diffusers' loader.

    Raises:
        StackError: a layer the model lacks, or a shape that does not fit it.
    """
    from torch import nn

    file = adapter_file(path)
    tensors = load_adapter_tensors(file)
    for name, down in tensors.items():
        if not (name.startswith(prefix + ".") and name.endswith(".lora_A.weight")):
            continue
        layer_name = name[len(prefix) + 1:-len(".lora_A.weight")]
        up = tensors.get(name.replace(".lora_A.", ".lora_B."))
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise StackError(f"adapter {str(file)!r}: the model has no layer {layer_name}; "
                             "this LoRA was trained for another model") from None
        wanted = (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else None
        if wanted is None or up is None or down.ndim != 2 or down.shape[1] != wanted[1] \
                or tuple(up.shape) != (wanted[0], down.shape[0]):
            raise StackError(f"adapter {str(file)!r}: {layer_name} has lora_A {tuple(down.shape)} and lora_B "
                             f"{None if up is None else tuple(up.shape)}, which do not fit the layer "
                             f"{wanted and f'(out {wanted[0]}, in {wanted[1]})'}; this LoRA was trained for "
                             "another model")
    return file


def adapter_file(path: str | Path) -> Path:
    """The adapter's .safetensors file: `path` itself, or the one file in a folder.

    Args:
        path: "embedded:adapters/<name>" (shipped inside the package) or a filesystem path
            (accel.data_files.resolve_data_file).
    """
    try:
        path = resolve_data_file(str(path), key="adapter", what="file",
                                 how="give a .safetensors file or a folder holding one (made by `accel train`)")
    except DataFileError as error:
        raise StackError(str(error)) from None
    if path.is_file():
        return path
    if not path.is_dir():
        raise StackError(f"adapter {str(path)!r}: not a file or folder; give a .safetensors file or a folder "
                         "holding one")
    files = sorted(path.glob("*.safetensors"))
    preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
    if len(preferred) == 1 or len(files) == 1:
        return (preferred or files)[0]
    raise StackError(f"adapter {str(path)!r}: {len(files)} .safetensors files; name the file in the path")
