"""One fingerprint for everything resumable: a hash of what determines a result.

A record (a measured stack, a reference, a calibration, a training checkpoint) is reused only when
the fingerprint of everything that made it matches: the settings that determine it, the model's
weights hash and the versions of the code that computes it. `fingerprint(payload)` hashes a
canonical JSON form of the payload; `differing_keys(a, b)` names what changed, for the one-line
message a mismatch prints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

FINGERPRINT_LENGTH = 16


def code_versions() -> dict[str, str]:
    """Versions of the packages that compute results (a change makes earlier results stale)."""
    from importlib import metadata

    versions = {}
    for package in ("accel-stack", "torch", "diffusers", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def canonical(payload: Any) -> str:
    """JSON with sorted keys and no whitespace; non-JSON values by their str()."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short stable hash (hex) of `payload`."""
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(payload, Mapping):
        return {prefix.rstrip("."): payload}
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two payloads (sorted)."""
    a, b = flatten(old), flatten(new)
    return sorted(key for key in set(a) | set(b) if canonical(a.get(key)) != canonical(b.get(key)))


IDENTITY_SAMPLES = 64  # elements read from every tensor


def _hash_module(digest: Any, module: Any) -> None:
    """Feed a module's weights identity into `digest`: every tensor's name, shape and dtype, and the
    bytes of `IDENTITY_SAMPLES` elements at fixed, evenly spaced positions (first and last included)."""
    import torch

    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        picks = torch.linspace(0, flat.numel() - 1, min(IDENTITY_SAMPLES, flat.numel()), device=flat.device)
        sample = flat[picks.round().long()].cpu().contiguous()
        digest.update(sample.view(torch.uint8).numpy().tobytes())


def module_identity(module: Any) -> str:
    """A fast identity of one model's weights, computed from the module in memory (no files).

    Used where a result depends on the weights but only the loaded module is at hand (an adapter's
    base model, checked by `accel.apply`); hashing every byte of a 12B model at each apply would take
    minutes, and a retrained or other model differs in the sampled elements. Device does not matter.
    """
    digest = hashlib.sha256()
    _hash_module(digest, module)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def model_identity(pipe) -> str:
    """A hash of a pipeline's denoiser weights, computed from the loaded modules (no files).

    Every denoiser (`transformer`, Wan 2.2's `transformer_2`, `unet`) contributes its attribute
    name and its tensors as in `module_identity`, so a different checkpoint, dtype or fine-tune is
    told apart in milliseconds. `accel calibrate` records it and `accel.apply` / the lab compare it.

    Args:
        pipe: a diffusers pipeline (or anything with those attributes).

    Returns:
        A short hex hash.

    Raises:
        ValueError: the pipeline has no denoiser.
    """
    import torch

    from accel.pipeline_info import DENOISER_ATTRIBUTES

    digest = hashlib.sha256()
    found = False
    for attribute in DENOISER_ATTRIBUTES:
        module = getattr(pipe, attribute, None)
        if not isinstance(module, torch.nn.Module):
            continue
        found = True
        digest.update(attribute.encode())
        _hash_module(digest, module)
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to identify")
    return digest.hexdigest()[:FINGERPRINT_LENGTH]
