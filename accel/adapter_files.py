"""What a distilled adapter file says about itself: its safetensors header.

The resolver (`adapter-trained-for`), the native and pipeline paths and `accel bench distill` read
adapters through these helpers, so a file or a folder holding one is accepted the same way
everywhere.
"""

from __future__ import annotations

from pathlib import Path

from accel.data_files import DataFileError, resolve_data_file
from accel.stack import StackError

# Safetensors metadata keys by which a distilled adapter names what it was trained for.
TRAINED_FOR_KEYS = ("accel.solver", "accel.steps", "accel.cache", "accel.uncond_interval")
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
    from safetensors import safe_open

    with safe_open(str(adapter_file(path)), framework="pt") as handle:
        return dict(handle.metadata() or {})


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
