"""What a lab job generates: one prompt (or class label) and one seed per sample.

Text-to-image and text-to-video recipes give `inputs.prompts` (a list) or `inputs.prompt_file` (one
prompt a line), `samples_per_prompt`, `resolution` (an int or [height, width]) and `frames`; the
embedded digit models take `inputs.classes` and `samples_per_class`. Sample i draws its initial
noise from its own generator seeded `seed * 1_000_003 + i`, passed to the pipeline as one
generator per image (diffusers' `randn_tensor` draws each image from its own), so any split of the
samples into batches or processes generates the same images.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SEED_STRIDE = 1_000_003
CALIBRATION_SEED_OFFSET = 7_777_777  # calibration samples never share a seed with evaluated ones


class InputsError(ValueError):
    """Inputs that cannot be built; the message is one line naming the recipe key."""


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a run with base seed `seed`."""
    return seed * SEED_STRIDE + index


@dataclass(frozen=True)
class Inputs:
    """One entry per sample: its prompt or class label, and its seed.

    Attributes:
        seeds: per-sample seeds.
        prompts: per-sample prompts (text pipelines), or None.
        labels: per-sample class labels (the embedded digit models), or None.
        height, width: image size in pixels; None leaves the pipeline's default.
        frames: frames per video (video pipelines), or None.
        negative_prompt: the negative prompt of every sample (CFG), or None.
        call_kwargs: further keyword arguments of every pipeline call.
    """

    seeds: tuple[int, ...]
    prompts: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    negative_prompt: str | None = None
    call_kwargs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def label_tensor(self) -> torch.Tensor | None:
        """Class labels (N,) for the embedded models' metrics."""
        return None if self.labels is None else torch.tensor(self.labels)

    def describe(self) -> dict[str, Any]:
        """JSON-ready (part of every fingerprint)."""
        return asdict(self)

    def subset(self, piece: slice) -> "Inputs":
        """The samples of `piece`."""
        pick = lambda values: None if values is None else tuple(values[piece])  # noqa: E731
        return Inputs(tuple(self.seeds[piece]), pick(self.prompts), pick(self.labels), self.height, self.width,
                      self.frames, self.negative_prompt, dict(self.call_kwargs))

    def call_kwargs_for(self, pipe: Any, piece: slice, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Keyword arguments of one pipeline call generating the samples of `piece`."""
        accepted = inspect.signature(type(pipe).__call__).parameters
        kwargs: dict[str, Any] = {"generator": [torch.Generator(device="cpu").manual_seed(s)
                                                for s in self.seeds[piece]]}
        if self.labels is not None:
            kwargs["class_labels"] = list(self.labels[piece])
        else:
            kwargs["prompt"] = list(self.prompts[piece])
            if self.negative_prompt is not None and "negative_prompt" in accepted:
                kwargs["negative_prompt"] = [self.negative_prompt] * len(kwargs["prompt"])
        for key, value in (("height", self.height), ("width", self.width), ("num_frames", self.frames)):
            if value is not None and key in accepted:
                kwargs[key] = value
        return {**kwargs, **self.call_kwargs}


def _resolution(value: Any) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    if isinstance(value, int):
        return value, value
    values = list(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise InputsError(f"inputs.resolution: {value!r}; give an int or [height, width]")
    return values[0], values[1]


def _prompts(section: Any) -> list[str]:
    prompts = [str(p) for p in (section.get("prompts") or [])]
    file = section.get("prompt_file")
    if file:
        path = Path(str(file))
        if not path.is_file():
            raise InputsError(f"inputs.prompt_file: no file at {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def build_inputs(section: Any, embedded: bool, seed_offset: int = 0) -> Inputs:
    """The samples a recipe's `inputs` section names.

    Args:
        section: the `inputs` section.
        embedded: the model takes class labels (the embedded digit models) instead of prompts.
        seed_offset: added to `inputs.seed` (calibration samples use CALIBRATION_SEED_OFFSET).

    Raises:
        InputsError: no prompts for a text pipeline, or a malformed resolution.
    """
    height, width = _resolution(section.get("resolution"))
    frames = section.get("frames")
    seed = int(section.seed) + seed_offset
    common = dict(height=height, width=width, frames=frames, negative_prompt=section.get("negative_prompt"),
                  call_kwargs=dict(section.get("call_kwargs") or {}))
    if embedded:
        labels = [int(c) for c in section.classes for _ in range(int(section.samples_per_class))]
        return Inputs(tuple(sample_seed(seed, i) for i in range(len(labels))), labels=tuple(labels), **common)
    prompts = _prompts(section)
    if not prompts:
        raise InputsError("inputs.prompts: this pipeline takes prompts; give inputs.prompts=[...] or "
                          "inputs.prompt_file=PATH (one prompt a line)")
    repeated = [p for p in prompts for _ in range(int(section.get("samples_per_prompt") or 1))]
    return Inputs(tuple(sample_seed(seed, i) for i in range(len(repeated))), prompts=tuple(repeated), **common)
