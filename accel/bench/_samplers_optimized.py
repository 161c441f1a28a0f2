"""Optimised schedules for the samplers benchmark: calibrated once per (model weights, solver, NFE)
on calibration seeds disjoint from the evaluation seeds (searched natively on the model's modules,
measured by the bench through the pipeline), saved under the bench's output folder
(`<out>/calibrations/<model>/schedules/`), then reused.

The search (`samplers.optimized.optimize_schedule`) is a local one, so it runs from each of our
named schedules of the model's family in turn and keeps the walk with the best calibration
objective: the mean PSNR (mean per-sample log MSE) against a fine-step reference of the calibration
samples, each search with a price on moving away from its start. (Starting only from the schedule
that was best before the search lost 1-2 dB on the UNet: at NFE 6 the log-SNR walk ranked first on
20 calibration samples, yet the searches from uniform timesteps and Karras ended 2 dB better.)
The calibration reference is cheaper than the benchmark's 200-step Heun: UniPC-bh2 at 60 NFE on the
same schedule, which agrees with it to 51 dB (flow) and 55 dB (UNet), far above the 25-40
dB the calibrated walks reach. A saved file is reused only if it was made for the same weights
(fingerprint), guidance scale and calibration settings; otherwise it is recalibrated. The output
folder's copy is looked at first, then the one shipped beside the weights
(`<weights>/schedules/`, read-only: nothing is written inside the installed package).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import samplers
from accel.bench._samplers_models import BenchModel, Reference
from accel.lab.inputs import sample_seed
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
        reference_solver: our solver for the calibration reference, on the model's reference schedule.
        reference_nfe: its model evaluations.
        objective: "psnr" (mean per-sample log MSE) or "mse" (pooled), see optimize_schedule.
        penalty: the price of moving away from the starting walk, see optimize_schedule.
        compensation: also calibrate per-step compensation ratios (samplers.compensation, DC-Solver's
            two-point form) for the optimised walk; they are saved in its file and applied with it.
    """

    seed: int = 7
    samples: int = 40
    sweeps: int = 2
    iterations: int = 5
    reference_solver: str = "unipc_bh2"
    reference_nfe: int = 60
    objective: str = "psnr"
    penalty: float = 2.0
    compensation: bool = True

    def reference(self, subject: BenchModel) -> Reference:
        """The calibration reference of a model: our solver on the schedule of its benchmark reference."""
        spec = samplers.get_solver(self.reference_solver)
        return Reference(self.reference_solver, spec.steps_for_nfe(self.reference_nfe), subject.reference.schedule,
                         subject.reference.options)


def walk_digest(path: Path) -> str:
    """A short hash of a saved walk file (a record made with another walk is not reused)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def calibration_noise(seed: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(count, *shape) noise of the calibration samples, sample i from its own seed (`sample_seed`)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in range(count)])


@torch.no_grad()
def sample_native(subject: BenchModel, reference: Reference, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Samples (N, C, H, W) natively (`samplers.sample`) with the reference's solver, steps and schedule."""
    return samplers.sample(subject.denoiser, noise, solver=reference.solver, steps=reference.steps,
                           schedule=reference.schedule, schedule_options=dict(reference.options),
                           cond={"labels": labels})


class Calibrator:
    """Finds, loads or makes the optimised schedule of one model for (solver, NFE).

    Args:
        subject: the model (its `schedule_dir` holds the shipped walks, only read).
        calibration: the calibration set and effort.
        save_dir: where new searches are written, e.g. `<out>/calibrations/flux-digits/schedules`.
        log: `log(message)` for progress lines.
    """

    def __init__(self, subject: BenchModel, calibration: Calibration, save_dir: Path,
                 log: Callable[[str], None] = print):
        self.subject = subject
        self.calibration = calibration
        self.save_dir = Path(save_dir)
        self.log = log
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def path(self, solver: str, nfe: int) -> Path:
        """Where a new search for (solver, NFE) is saved."""
        return self.save_dir / f"{solver}-nfe{nfe}.json"

    def candidates(self, solver: str, nfe: int) -> list[Path]:
        """Saved walks to try, in order: the output folder's, then the shipped one."""
        return [self.path(solver, nfe), self.subject.schedule_dir / f"{solver}-nfe{nfe}.json"]

    def provenance(self) -> dict:
        """What a saved schedule must have been made with to be reused."""
        calibration = self.calibration
        return {"weights": self.subject.fingerprint, "guidance": self.subject.guidance,
                "calibration_seed": calibration.seed, "calibration_samples": calibration.samples,
                "reference": calibration.reference(self.subject).describe(), "sweeps": calibration.sweeps,
                "iterations": calibration.iterations, "objective": calibration.objective,
                "penalty": calibration.penalty, "compensation": calibration.compensation}

    def existing(self, solver: str, nfe: int) -> Path | None:
        """The first saved schedule (output folder, then shipped) that fits these weights and
        settings, else None."""
        for path in self.candidates(solver, nfe):
            if self._fits(path, solver, nfe):
                return path
        return None

    def _fits(self, path: Path, solver: str, nfe: int) -> bool:
        """Whether the file at `path` is a walk for (solver, NFE) made with this provenance."""
        if not path.is_file():
            return False
        try:
            stored = OptimizedSchedule.load(path)
        except (ValueError, TypeError, json.JSONDecodeError):
            return False
        made = stored.reference.get("bench", {})
        return made == self.provenance() and stored.solver == solver and stored.nfe == nfe

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, labels, reference) of the calibration set, computed once."""
        if self._inputs is None:
            count = self.calibration.samples
            labels = torch.arange(count) % 10
            noise = calibration_noise(self.calibration.seed, count, self.subject.shape)
            ref = self.calibration.reference(self.subject)
            self.log(f"{self.subject.name}: calibration reference ({ref.describe()}, "
                     f"{count} samples, seed {self.calibration.seed})")
            images = sample_native(self.subject, ref, noise, labels)
            self._inputs = noise, labels, images
        return self._inputs

    def search(self, solver: str, nfe: int, start: str) -> OptimizedSchedule:
        """The walk searched from one named schedule on the calibration set."""
        noise, labels, reference = self.inputs()
        calibration = self.calibration
        return optimize_schedule(self.subject.denoiser, solver, nfe, noise, cond={"labels": labels},
                                 reference=reference, initial_schedule=start,
                                 initial_options=self.subject.schedules[start],
                                 sweeps=calibration.sweeps, iterations=calibration.iterations,
                                 objective=calibration.objective, penalty=calibration.penalty,
                                 compensation=calibration.compensation)

    def get(self, solver: str, nfe: int) -> Path:
        """The path of the optimised schedule for (solver, NFE), calibrating it if needed: searched
        from every named schedule of the model, the best calibration objective kept."""
        found = self.existing(solver, nfe)
        if found is not None:
            return found
        began = time.perf_counter()
        results = {}
        for start in self.subject.schedules:
            results[start] = self.search(solver, nfe, start)
            self.log(f"{self.subject.name}: {solver} NFE {nfe} from {start}: calibration objective "
                     f"{results[start].reference['objective_value']:.4f}")
        start = min(results, key=lambda name: results[name].reference["objective_value"])
        result = results[start]
        searched = {name: round(found.reference["objective_value"], 6) for name, found in results.items()}
        result = dataclasses.replace(result, reference={**result.reference, "starts": searched,
                                                        "bench": self.provenance()})
        path = result.save(self.path(solver, nfe))
        self.log(f"{self.subject.name}: optimised {solver} at NFE {nfe} (best from {start}) in "
                 f"{time.perf_counter() - began:.0f} s: calibration MSE {result.initial_error:.3e} -> "
                 f"{result.error:.3e} ({path})")
        return path

