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


def module_identity(module: Any, sample_bytes: int = 4096) -> str:
    """A fast identity of a model's weights, computed from the module in memory: every tensor's
    name, shape and dtype, and the first and last `sample_bytes` bytes of its data.

    Used where a result depends on the weights but only the loaded pipeline is at hand (a
    calibration file or an adapter checked by `accel.apply`); hashing every byte of a 12B model at
    each apply would take minutes, and a retrained or other model differs in these samples.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        head, tail = raw[:sample_bytes], raw[-sample_bytes:]
        digest.update(head.cpu().numpy().tobytes())
        digest.update(tail.cpu().numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]
