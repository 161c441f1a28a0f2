"""Learned cache routers: the file format, and applying a gate table to a model.

A router (Learning-to-Cache, Ma et al. 2024, arXiv:2406.01733) is a (num_steps, num_blocks)
table of gate probabilities: on step i, block l computes where gate[i, l] >= threshold and
otherwise reuses its residual from the last step it computed. Columns follow
`router_block_names(model)` (the layouts registry's block order: FLUX double blocks, then single
blocks). The training side applies the table in soft mode (`apply_router(model, gates, "soft")`)
and saves it with `save_router`; inference loads it as the `router` preset
(`get_preset("router", path=...)`), which runs it in hard mode.

File: safetensors with one float32 tensor "gates" (num_steps, num_blocks) and string metadata:
``accel.solver`` (the solver it was trained with), ``accel.steps`` (= num_steps),
``accel.cache`` ("router"), ``model_class``, ``num_blocks``, ``threshold`` (the cut inference
uses unless told otherwise). A router is valid only for the solver and step count it was trained
for; the engine refuses another step count or block count. Loading never unpickles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .apply import CacheHandle, apply_cache
from .config import CacheConfig, check_range
from .layouts import get_model_layout, transformer_blocks
from .scopes.router import RouterScope
from .triggers.router import GateSource, RouterTrigger, check_gate_table, gate_mask

REQUIRED_METADATA = ("accel.solver", "accel.steps", "accel.cache", "model_class", "num_blocks", "threshold")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RouterSpec:
    """A loaded router.

    Attributes:
        gates: (num_steps, num_blocks) float32 gate probabilities.
        metadata: the file's string metadata (REQUIRED_METADATA and anything else the trainer wrote).
        path: the file it was loaded from, or None.
    """

    gates: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def num_steps(self) -> int:
        return int(self.gates.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.gates.shape[1])

    @property
    def threshold(self) -> float:
        """The cut the trainer recorded (0.5 unless it wrote another)."""
        return float(self.metadata.get("threshold", DEFAULT_THRESHOLD))

    @property
    def solver(self) -> str | None:
        return self.metadata.get("accel.solver")

    @property
    def model_class(self) -> str | None:
        return self.metadata.get("model_class")

    def mask(self, threshold: float | None = None) -> torch.Tensor:
        """The bool compute table (num_steps, num_blocks): gate >= threshold; the first step computes."""
        threshold = self.threshold if threshold is None else threshold
        check_range("RouterSpec.mask", "threshold", threshold, 0.0, 1.0)
        return gate_mask(self.gates, threshold)

    def computed_fraction(self, threshold: float | None = None) -> float:
        """Share of (step, block) pairs that compute at `threshold` (FLOPs of the blocks, roughly)."""
        return float(self.mask(threshold).float().mean())


def router_block_names(model: torch.nn.Module) -> list[str]:
    """The model's blocks in gate-column order, e.g. ["transformer_blocks.0", ..., "single_transformer_blocks.37"].

    `len(router_block_names(model))` is the `num_blocks` a router for the model needs.
    """
    layout = get_model_layout(model)
    if layout.kind != "transformer":
        raise ValueError(f"a router gates transformer blocks; {type(model).__name__} is a {layout.kind} (use the "
                         "'deepcache' preset for UNets)")
    return [ref.name for ref in transformer_blocks(model, layout)]


def router_config(gates: GateSource | RouterSpec, mode: str = "hard", *, threshold: float | None = None,
                  detach_cache: bool = True, count_flops: bool = True, path: str | None = None,
                  model_class: str | None = None) -> CacheConfig:
    """The CacheConfig of a router (what `apply_router` and the `router` preset apply).

    Args:
        gates: a (num_steps, num_blocks) tensor of probabilities or booleans, a zero-argument
            callable returning one (soft mode calls it once per model call), or a RouterSpec.
        mode: "hard" (skip blocks below the threshold) or "soft" (differentiable mixing).
        threshold: hard-mode cut; None: the RouterSpec's recorded threshold, else 0.5.
        detach_cache: soft mode stores its mixed residual detached (see caching.scopes.router).
        count_flops: count FLOPs for the statistics.
        path, model_class: for messages and the model check (taken from a RouterSpec if given).
    """
    if isinstance(gates, RouterSpec):
        path = path if path is not None else gates.path
        model_class = model_class if model_class is not None else gates.model_class
        threshold = gates.threshold if threshold is None else threshold
        gates = gates.gates
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    trigger = RouterTrigger(gates, mode=mode, threshold=threshold, path=path, model_class=model_class)
    return CacheConfig(trigger=trigger, scope=RouterScope(detach_cache=detach_cache), count_flops=count_flops,
                       name="router")


def apply_router(model: torch.nn.Module, gates: GateSource | RouterSpec, mode: str = "soft", *,
                 threshold: float | None = None, detach_cache: bool = True,
                 count_flops: bool = True) -> CacheHandle:
    """Applies a gate table to `model`; remove it with `remove_cache(model)` or `handle.remove()`.

    Soft mode (training): every block runs and returns input + g * residual_now + (1 - g) *
    residual_cached, differentiable in g (pass `lambda: torch.sigmoid(logits)` so each call sees
    the current parameter). Hard mode (inference): blocks whose gate is below `threshold` do not
    run. The run's step count must equal the table's rows, the model's block count its columns.

    Returns:
        The CacheHandle (statistics, reset, removal).
    """
    return apply_cache(model, router_config(gates, mode, threshold=threshold, detach_cache=detach_cache,
                                            count_flops=count_flops))


def save_router(path: str | os.PathLike, gates: torch.Tensor, metadata: Mapping[str, Any]) -> Path:
    """Writes a router file (atomically: a temporary file, then a rename).

    Args:
        path: the .safetensors file to write.
        gates: (num_steps, num_blocks) gate probabilities in [0, 1] (booleans become 0 / 1).
        metadata: at least "accel.solver" and "model_class"; "accel.steps", "num_blocks",
            "accel.cache" ("router") and "threshold" (0.5) are filled in from the table when
            absent and must agree with it when given. Values are stored as strings.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    table = check_gate_table("save_router", gates).detach().to("cpu", torch.float32).contiguous()
    steps, blocks = table.shape
    meta = {str(k): str(v) for k, v in metadata.items()}
    derived = {"accel.steps": str(steps), "num_blocks": str(blocks), "accel.cache": "router"}
    for key, value in derived.items():
        if meta.setdefault(key, value) != value:
            raise ValueError(f"save_router: metadata {key}={meta[key]!r} disagrees with the gates "
                             f"{tuple(table.shape)} ({key} should be {value!r}); drop it or fix the table")
    meta.setdefault("threshold", str(DEFAULT_THRESHOLD))
    _check_threshold_text("save_router", meta["threshold"])
    missing = [key for key in REQUIRED_METADATA if not meta.get(key)]
    if missing:
        raise ValueError(f"save_router: metadata lacks {', '.join(missing)}; give the solver the router was "
                         "trained with and the model's class name (type(model).__name__)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({"gates": table}, str(partial), metadata=meta)
    os.replace(partial, path)
    return path


def load_router(path: str | os.PathLike) -> RouterSpec:
    """Reads a router file written by `save_router` (safetensors only, never pickle).

    Raises:
        ValueError: no such file, not a router file, missing metadata, or a table that
            disagrees with its metadata.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"router file {str(path)!r} not found; give the .safetensors file written by "
                         "caching.save_router (accel train writes it)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if "gates" not in handle.keys():
                raise ValueError(f"router file {str(path)!r} has no tensor 'gates' (it holds "
                                 f"{', '.join(sorted(handle.keys())) or 'nothing'}); is it a LoRA adapter?")
            gates = handle.get_tensor("gates")
    except SafetensorError as error:
        raise ValueError(f"router file {str(path)!r} is not a readable safetensors file ({error}); "
                         "rewrite it with caching.save_router") from None
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"router file {str(path)!r} lacks metadata {', '.join(missing)}; rewrite it with "
                         "caching.save_router")
    if metadata["accel.cache"] != "router":
        raise ValueError(f"router file {str(path)!r} says accel.cache={metadata['accel.cache']!r}, not 'router'")
    gates = check_gate_table(f"router file {str(path)!r}", gates).to(torch.float32)
    for key, size in (("accel.steps", gates.shape[0]), ("num_blocks", gates.shape[1])):
        if metadata[key] != str(size):
            raise ValueError(f"router file {str(path)!r}: metadata {key}={metadata[key]} but gates have shape "
                             f"{tuple(gates.shape)}; the file is inconsistent, rewrite it with caching.save_router")
    _check_threshold_text(f"router file {str(path)!r}", metadata["threshold"])
    return RouterSpec(gates, metadata, str(path))


def _check_threshold_text(owner: str, text: str) -> None:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{owner}: threshold={text!r} is not a number") from None
    check_range(owner, "threshold", value, 0.0, 1.0, "a block computes where its gate >= threshold")
