"""Atomic, verifiable training checkpoints in safetensors.

Layout: `<out_dir>/checkpoints/step-0000200/` holds `weights.safetensors` (the trainable
parameters by name), `ema.safetensors` (when EMA is on), the optimizer state
(`optimizer.safetensors`, or `optimizer-rank<r>.safetensors` per process under DeepSpeed) and
`checkpoint.json`: the step, the sha256 of every file, the config fingerprint and small scalars
(elapsed seconds, the fp16 grad scaler). A checkpoint is written into `.staging-step-...` and
renamed into place only once complete, so a crash leaves either the old set or the new one. On
resume the newest checkpoint whose files all exist and match their hashes is used; any other is
skipped with a printed message. Nothing is ever read with pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "checkpoint.json"
WEIGHTS = "weights.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.safetensors"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, or checkpoints that belong to another run); one line.

    Attributes:
        stored_identity: for checkpoints of another run, the identity that run recorded (so a
            caller can name the settings that differ), else None.
    """

    def __init__(self, message: str, stored_identity: dict | None = None) -> None:
        super().__init__(message)
        self.stored_identity = stored_identity


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk.

    Attributes:
        path: its folder.
        step: optimizer steps done when it was written.
        manifest: the parsed checkpoint.json.
    """

    path: Path
    step: int
    manifest: dict

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Loads one of its safetensors files (on the CPU)."""
        return load_file(str(self.path / name))

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is assembled in before it is renamed into place."""
    return root / f".staging-{step_name(step)}"


def clean_staging(root: Path) -> None:
    """Removes staging folders a killed run left behind."""
    if root.is_dir():
        for stale in root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".old-*"):
            shutil.rmtree(stale, ignore_errors=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes tensors (detached, contiguous CPU copies) to a safetensors file and syncs it to disk."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(root: Path, step: int, fingerprint: str, info: dict, keep: int) -> Path:
    """Hashes the staged files, writes the manifest, renames the folder into place, prunes old ones.

    Args:
        root: the checkpoints folder.
        step: optimizer steps done.
        fingerprint: the config fingerprint the checkpoint belongs to.
        info: JSON-friendly extras stored in the manifest (seconds, scaler, ...).
        keep: how many of the newest checkpoints to keep.

    Returns:
        The checkpoint's folder.
    """
    staged = staging_dir(root, step)
    files = {p.name: sha256(p) for p in sorted(staged.iterdir()) if p.name != MANIFEST}
    manifest = {"format": FORMAT, "step": step, "config_hash": fingerprint, "files": files, **info}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(staged / MANIFEST)
    final = root / step_name(step)
    if final.exists():  # a rerun after a crash redoes steps past an older checkpoint
        old = root / f".old-{step_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staged.rename(final)
    # Checkpoints past this step are from an abandoned future (this run resumed before them).
    older = [path for other, path in _step_dirs(root) if other <= step]
    stale = [path for other, path in _step_dirs(root) if other > step] + older[:-keep]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify(path: Path, step: int, required: list[str]) -> tuple[dict | None, str]:
    """Checks one checkpoint folder: readable manifest, the right step, required files, hashes.

    Returns:
        (manifest, "") when valid, else (None, the reason).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST} (partial write)"
    except (OSError, ValueError) as error:
        return None, f"unreadable {MANIFEST} ({error})"
    if not isinstance(manifest, dict) or manifest.get("step") != step or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST} does not describe step {step}"
    missing = [name for name in required if name not in manifest["files"]]
    if missing:
        return None, f"missing {', '.join(missing)}"
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return None, f"missing {name}"
        try:
            actual = sha256(file)
        except OSError as error:
            return None, f"unreadable {name} ({error})"
        if actual != expected:
            return None, f"{name} does not match its sha256 (corrupt)"
    return manifest, ""


def latest_valid(root: Path, fingerprint: str | None, required: list[str],
                 log: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest valid checkpoint under `root`; invalid ones are skipped with a message.

    Args:
        root: the checkpoints folder.
        fingerprint: the current run's fingerprint; None accepts any run (for exporting).
        required: files every checkpoint of this run must hold.
        log: where the skip messages go.

    Raises:
        TrainingError: a valid checkpoint was written with another config (a different run).
    """
    for step, path in reversed(_step_dirs(root)):
        manifest, reason = verify(path, step, required)
        if manifest is None:
            log(f"skipping checkpoint {path}: {reason}")
            continue
        if fingerprint is not None and manifest.get("config_hash") != fingerprint:
            raise TrainingError(
                f"checkpoint {path} belongs to a run with other training settings (config hash "
                f"{str(manifest.get('config_hash'))[:12]}, now {fingerprint[:12]}); use another out_dir "
                f"or delete {root}", stored_identity=manifest.get("identity"))
        return Checkpoint(path=path, step=step, manifest=manifest)
    return None


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flattens a torch optimizer's state (not its param_groups) to named tensors.

    Returns:
        (tensors named "<param index>.<key>", names of the entries that were Python numbers).
    """
    tensors, numbers = {}, []
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            name = f"{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                tensors[name] = torch.tensor(float(value), dtype=torch.float64)
                numbers.append(name)
    return tensors, numbers


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], numbers: list[str], param_groups: list) -> dict:
    """The inverse of `optimizer_to_tensors`, with the current optimizer's param_groups."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value.item() if name in numbers else value
    return {"state": state, "param_groups": param_groups}
