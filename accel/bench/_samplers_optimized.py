"""Optimised schedules for the samplers benchmark: calibrated once per (model weights, solver, NFE)
on calibration seeds disjoint from the evaluation seeds, saved next to the weights, then reused.

The search (`samplers.optimized.optimize_schedule`) starts from whichever of our named schedules
is best for the solver at that NFE *on the calibration samples*, and minimises the MSE against the
same fine-step reference the benchmark measures with. A saved file is reused only if it was made
for the same weights (fingerprint), guidance scale and reference; otherwise it is recalibrated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from accel.bench._samplers_models import BenchModel, sample_ours, sample_reference
from accel.generate import sample_noise
from samplers.optimized import optimize_schedule
from samplers.schedules import OptimizedSchedule


@dataclass(frozen=True)
class Calibration:
    """The calibration set and the search effort.

    Attributes:
        seed: noise seed of the calibration samples (the evaluation uses another seed).
        samples: number of calibration samples (labels cycle through the classes).
        sweeps: coordinate-descent passes (at most).
        iterations: golden-section iterations per level and pass.
    """

    seed: int = 7
    samples: int = 10
    sweeps: int = 2
    iterations: int = 4


class Calibrator:
    """Finds, loads or makes the optimised schedule of one model for (solver, NFE).

    Args:
        subject: the model.
        calibration: the calibration set and effort.
        log: `log(message)` for progress lines.
    """

    def __init__(self, subject: BenchModel, calibration: Calibration, log: Callable[[str], None] = print):
        self.subject = subject
        self.calibration = calibration
        self.log = log
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def path(self, solver: str, nfe: int) -> Path:
        return self.subject.schedule_dir / f"{solver}-nfe{nfe}.json"

    def provenance(self) -> dict:
        """What a saved schedule must have been made with to be reused."""
        ref = self.subject.reference
        return {"weights": self.subject.fingerprint, "guidance": self.subject.guidance,
                "calibration_seed": self.calibration.seed, "calibration_samples": self.calibration.samples,
                "reference": ref.describe()}

    def existing(self, solver: str, nfe: int) -> Path | None:
        """The saved schedule's path if it fits these weights and settings, else None."""
        path = self.path(solver, nfe)
        if not path.is_file():
            return None
        try:
            stored = OptimizedSchedule.load(path)
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
        made = stored.reference.get("bench", {})
        return path if made == self.provenance() and stored.solver == solver and stored.nfe == nfe else None

    def digest(self, solver: str, nfe: int) -> str | None:
        """A short hash of the saved schedule that fits (records made with another are stale), or None."""
        path = self.existing(solver, nfe)
        return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, labels, reference) of the calibration set, computed once."""
        if self._inputs is None:
            count = self.calibration.samples
            labels = torch.arange(count) % 10
            noise = sample_noise(self.calibration.seed, range(count), self.subject.shape)
            self.log(f"{self.subject.name}: calibration reference ({self.subject.reference.describe()}, "
                     f"{count} samples, seed {self.calibration.seed})")
            self._inputs = noise, labels, sample_reference(self.subject, noise, labels, count)
        return self._inputs

    def best_start(self, solver: str, nfe: int) -> tuple[str, dict]:
        """Our named schedule with the lowest calibration MSE for this solver and NFE."""
        noise, labels, reference = self.inputs()
        errors = {}
        for name, options in self.subject.schedules.items():
            out = sample_ours(self.subject, solver, nfe, name, options, noise, labels, len(noise))
            errors[name] = float((out.double() - reference.double()).pow(2).mean())
        best = min(errors, key=errors.get)
        return best, self.subject.schedules[best]

    def get(self, solver: str, nfe: int) -> Path:
        """The path of the optimised schedule for (solver, NFE), calibrating it if needed."""
        found = self.existing(solver, nfe)
        if found is not None:
            return found
        noise, labels, reference = self.inputs()
        start, options = self.best_start(solver, nfe)
        result = optimize_schedule(self.subject.denoiser, solver, nfe, noise, cond={"labels": labels},
                                   reference=reference, initial_schedule=start, initial_options=options,
                                   sweeps=self.calibration.sweeps, iterations=self.calibration.iterations)
        result = dataclasses.replace(result, reference={**result.reference, "bench": self.provenance()})
        path = result.save(self.path(solver, nfe))
        self.log(f"{self.subject.name}: optimised {solver} at NFE {nfe} from {start}: calibration MSE "
                 f"{result.initial_error:.3e} -> {result.error:.3e} ({path})")
        return path

