"""The model of a lab job: a diffusers pipeline loaded from `model.name`.

`model.name` is an embedded model name (`flux-digits`), a local diffusers pipeline folder (as
`save_pretrained` writes it), or a Hugging Face hub id, loaded from the local cache only (nothing
is downloaded at run time). Everything loads with `from_pretrained(..., use_safetensors=True)`:
pickled weights are never read. `model.pipeline_kwargs` go to `from_pretrained` (e.g.
`{torch_dtype: bfloat16, variant: fp16}`).

The embedded model and a user's FLUX go through the same path: both are pipelines, both are
measured through `accel.apply`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

EMBEDDED_PIPELINES = {"flux-digits": "FluxDigitsPipeline", "unet-digits": "UNetDigitsPipeline"}
PIPELINE_CLASSES_OF_OURS = ("FluxDigitsPipeline", "UNetDigitsPipeline")
FULL_HASH_LIMIT = 256 * 2**20  # files above this are hashed by size, head and tail (16 MiB each)


class ModelError(ValueError):
    """A model that cannot be loaded; the message is one line naming model.name and the fix."""


@dataclass
class LabModel:
    """A loaded pipeline and what the lab needs to know about it.

    Attributes:
        name: `model.name` as the recipe gives it.
        pipe: the diffusers pipeline.
        folder: the folder it was loaded from.
        weights_hash: a hash of its weight files (part of every fingerprint).
        is_embedded: whether it is one of the shipped digit models (class labels, FD, accuracy).
        device: where it runs.
    """

    name: str
    pipe: Any
    folder: Path
    weights_hash: str
    is_embedded: bool
    device: torch.device

    @property
    def denoiser_name(self) -> str:
        """The pipeline attribute of its primary denoiser ("transformer" or "unet")."""
        for attribute in ("transformer", "unet"):
            if isinstance(getattr(self.pipe, attribute, None), torch.nn.Module):
                return attribute
        raise ModelError(f"model.name={self.name}: {type(self.pipe).__name__} has neither a transformer nor a unet")

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's primary denoiser (transformer or unet)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def video(self) -> bool:
        """Whether the pipeline generates videos (its call takes `num_frames`)."""
        import inspect

        return "num_frames" in inspect.signature(type(self.pipe).__call__).parameters


def embedded_folder(name: str) -> Path:
    """The package folder of an embedded model."""
    from accel.embedded.model import WEIGHTS_DIR

    return WEIGHTS_DIR / name


def _hash_file(path: Path, digest: "hashlib._Hash") -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
            return
        digest.update(handle.read(16 * 2**20))
        handle.seek(size - 16 * 2**20)
        digest.update(handle.read())


def weights_hash(folder: Path) -> str:
    """A hash of every weight and config file under `folder` (names, sizes and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".txt", ".model"):
            digest.update(str(path.relative_to(folder)).encode())
            _hash_file(path, digest)
    return digest.hexdigest()[:16]


def _dtype(value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("float32", "bfloat16", "float16"):
            raise ModelError(f"model.pipeline_kwargs.torch_dtype: {value!r}; use float32, bfloat16 or float16")
        return getattr(torch, value)
    return value


def _hub_folder(name: str) -> Path:
    """The local snapshot of a hub id (the Hugging Face cache); offline, nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several classes for "not cached"
        raise ModelError(f"model.name: {name} is a hub id that is not in the local Hugging Face cache, and models "
                         f"are never downloaded at run time; download it first (huggingface-cli download {name}) "
                         "or give a local pipeline folder") from None


def _pipeline_class(folder: Path, name: str) -> type:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"model.name: {name} has no model_index.json; give a folder written by "
                         "pipe.save_pretrained(...) or an embedded model name (flux-digits)")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError):
        raise ModelError(f"model.name: {index} is not a diffusers model_index.json") from None
    if class_name == "UNetDigitsPipeline":
        from accel.embedded.unet_pipeline import UNetDigitsPipeline

        return UNetDigitsPipeline
    if class_name in PIPELINE_CLASSES_OF_OURS:
        from accel.embedded.pipeline import FluxDigitsPipeline

        return FluxDigitsPipeline
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def _folder_of(name: str) -> tuple[Path, bool]:
    if name in EMBEDDED_PIPELINES:
        return embedded_folder(name), True
    if Path(name).is_dir():
        return Path(name), False
    from accel.recipe.validate import is_hub_id

    if is_hub_id(name):
        try:
            return _hub_folder(name), False
        except ModelError:
            if Path(name).parent != Path(".") and Path(name).parent.is_dir():  # a folder path with a typo
                raise ModelError(f"model.name: no folder {Path(name).resolve()} (and {name!r} is no hub id in the "
                                 "local Hugging Face cache); check the path") from None
            raise
    raise ModelError(f"model.name: {name!r} is neither an embedded model ({', '.join(EMBEDDED_PIPELINES)}), a local "
                     "pipeline folder nor a hub id 'owner/name'")


@contextlib.contextmanager
def _loading_bar(shown: bool) -> Iterator[None]:
    """diffusers' loading progress bar, shown only on a terminal (logs and tests get one line per
    error); diffusers' own error log is silenced while loading, since a failure is reported in one line."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    if not shown:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if not shown:
            diffusers_logging.enable_progress_bar()


def check_model_device(section: Any) -> None:
    """Refuses a `model.device` this machine lacks, before anything is loaded."""
    from accel.recipe.validate import check_device_available

    if section.get("device"):
        check_device_available("model.device", str(section.device))


def load_model(section: Any, device: str | None = None) -> LabModel:
    """Loads the pipeline a recipe's `model` section names.

    Args:
        section: the recipe's `model` section (name, dtype, device, pipeline_kwargs).
        device: overrides `model.device` (e.g. a launched process's own GPU).

    Raises:
        ModelError: one line naming model.name and what to do.
    """
    name = str(section.name)
    check_model_device(section)
    folder, embedded = _folder_of(name)
    kwargs = {key: _dtype(value) if key in ("torch_dtype", "dtype") else value
              for key, value in dict(section.get("pipeline_kwargs") or {}).items()}
    if "torch_dtype" in kwargs:  # diffusers 0.42 names it dtype
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if section.get("dtype") and "dtype" not in kwargs:
        kwargs["dtype"] = _dtype(section.dtype)
    kwargs["use_safetensors"] = True
    cls = _pipeline_class(folder, name)
    embedded = embedded or cls.__name__ in PIPELINE_CLASSES_OF_OURS
    try:
        with _loading_bar(sys.stderr.isatty()):
            pipe = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model.name: cannot load {name} with from_pretrained (safetensors only): {first}") from None
    target = torch.device(device or section.get("device") or "cpu")
    pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    return LabModel(name=name, pipe=pipe, folder=folder, weights_hash=weights_hash(folder), is_embedded=embedded,
                    device=target)
