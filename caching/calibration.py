"""Recording calibration runs: TeaCache's (input change, output change) pairs and MagCache's magnitude ratios.

A trigger that lacks calibrated parameters makes its runtime record one full-compute run (the
first generation, or whatever `calibrate_teacache` / `calibrate_magcache` run); `Calibrator.finish`
then fits the parameters. Recorded values stay on the device until `finish`, which is not on the
hot path and reads them back once.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .runtime import CallFrame

logger = logging.getLogger("caching")
_EPS = 1e-8


@dataclass(frozen=True)
class TeaCacheCalibration:
    """A fitted TeaCache rescaling polynomial.

    Attributes:
        coefficients: polynomial coefficients, highest power first (numpy.polyfit order), mapping
            the relative L1 change of the modulated input to the relative L1 change of the output.
        input_changes / output_changes: the recorded pairs.
    """

    coefficients: tuple[float, ...]
    input_changes: tuple[float, ...]
    output_changes: tuple[float, ...]

    def __str__(self) -> str:
        coeffs = ", ".join(f"{c:.4g}" for c in self.coefficients)
        return f"TeaCacheCalibration(coefficients=[{coeffs}], pairs={len(self.input_changes)})"


@dataclass(frozen=True)
class MagCacheCalibration:
    """Magnitude ratios ||R_t|| / ||R_{t-1}|| of the cached quantity, per step of a reference run.

    Attributes:
        ratios: one ratio per step (ratios[0] = 1), for a run of `len(ratios)` steps.
    """

    ratios: tuple[float, ...]

    def __str__(self) -> str:
        return f"MagCacheCalibration(steps={len(self.ratios)}, min={min(self.ratios):.4g}, max={max(self.ratios):.4g})"


def relative_l1(current: torch.Tensor, previous: torch.Tensor, group: Any = None) -> torch.Tensor:
    """mean|current - previous| / mean|previous|, a 0-d tensor on the inputs' device.

    With a context-parallel `group` the inputs are this rank's token shard and the means are taken
    over every rank's tokens (`caching.parallel.reduced_relative_l1`), so all ranks get one value.
    """
    if group is not None:
        from .parallel import reduced_relative_l1

        return reduced_relative_l1(current, previous, group)
    return (current - previous).abs().mean() / previous.abs().mean().clamp_min(_EPS)


def token_norms(value: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms: over the last dim of (B, N, D), over channels of (B, C, ...)."""
    value = value.float()
    return value.norm(dim=-1) if value.ndim == 3 else value.flatten(2).norm(dim=1)


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple or a diffusers BaseOutput)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def fit_teacache_polynomial(input_changes: Sequence[float], output_changes: Sequence[float],
                            degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial (numpy.polyfit) from input changes to output changes.

    The degree is lowered (with a log line) when there are too few pairs for it.
    """
    count = len(input_changes)
    if count < 2:
        raise ValueError(f"TeaCache calibration recorded {count} (input, output) change pairs; run at "
                         "least one generation of 3 or more steps under calibration")
    if count <= degree:
        logger.info("%d calibration pairs cannot fit degree %d; fitting degree %d",
                    count, degree, count - 1)
        degree = count - 1
    coefficients = np.polyfit(np.asarray(input_changes, dtype=np.float64),
                              np.asarray(output_changes, dtype=np.float64), degree)
    return tuple(float(c) for c in coefficients)


class Calibrator:
    """Records one kind of calibration data during full-compute calls.

    Args:
        kind: "teacache" (pairs of input / output relative changes) or "magcache" (ratios).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._previous: dict[tuple, tuple] = {}
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ratios: list[tuple[int, int, torch.Tensor]] = []

    @property
    def has_data(self) -> bool:
        return bool(self._pairs or self._ratios)

    def note_signal(self, frame: "CallFrame", signal: torch.Tensor) -> None:
        frame.scratch["calibration_signal"] = signal.detach()

    def note_output(self, frame: "CallFrame", output: Any) -> None:
        probe = frame.scratch.get("calibration_signal")
        if self.kind != "teacache" or probe is None or not frame.record:
            return
        key = (frame.context.generation, frame.context.branch, "teacache")
        current = (probe, first_tensor(output).detach())
        previous = self._previous.get(key)
        if previous is not None and previous[0].shape == probe.shape:
            self._pairs.append((relative_l1(current[0], previous[0]), relative_l1(current[1], previous[1])))
        self._previous[key] = current

    def note_quantity(self, frame: "CallFrame", value: torch.Tensor) -> None:
        if self.kind != "magcache":
            return
        key = (frame.context.generation, frame.context.branch, "magcache")
        norms = token_norms(value.detach())
        previous = self._previous.get(key)
        if previous is not None and previous[0].shape == norms.shape:
            ratio = (norms / previous[0].clamp_min(_EPS)).mean()
            self._ratios.append((frame.context.num_steps, frame.context.step_index, ratio))
        self._previous[key] = (norms,)

    def finish(self, trigger: Any):
        """The fitted calibration (TeaCacheCalibration or MagCacheCalibration)."""
        if self.kind == "teacache":
            xs = [float(x) for x, _ in self._pairs]
            ys = [float(y) for _, y in self._pairs]
            coefficients = fit_teacache_polynomial(xs, ys, getattr(trigger, "degree", 4))
            return TeaCacheCalibration(coefficients, tuple(xs), tuple(ys))
        return self._finish_ratios()

    def _finish_ratios(self) -> MagCacheCalibration:
        if not self._ratios:
            raise ValueError("MagCache calibration recorded no magnitude ratios; run at least one "
                             "generation of 2 or more steps under calibration")
        num_steps = Counter(n for n, _, _ in self._ratios).most_common(1)[0][0]
        by_step: dict[int, list[float]] = defaultdict(list)
        for n, step, ratio in self._ratios:
            if n == num_steps:
                by_step[step].append(float(ratio))
        ratios = [1.0] + [float(np.mean(by_step[s])) if by_step.get(s) else 1.0 for s in range(1, num_steps)]
        return MagCacheCalibration(tuple(ratios))
