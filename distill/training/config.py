"""The training loop's settings: one typed, validated dataclass."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

MIXED_PRECISION = ("no", "bf16", "fp16")
# Fields that change where files go or how often they are written, not the weights a run produces;
# they are left out of the config hash so that a resumed run may change them.
NOT_HASHED = ("out_dir", "export_dir", "threads", "checkpoint_every", "keep_checkpoints", "log_every")


@dataclass
class TrainConfig:
    """How the one training loop (`distill.training.train`) runs an objective.

    Attributes:
        steps: optimizer steps in the whole run (a resumed run continues to this count).
        out_dir: folder for checkpoints/, loss.csv and loss.png.
        export_dir: where `objective.export` writes the result (default: <out_dir>/export).
        grad_accumulation: micro-batches per optimizer step and process; the gradient is the mean
            over all micro-batches of all processes.
        lr: peak learning rate.
        warmup_steps: linear warm-up from lr / warmup_steps to lr over this many steps.
        min_lr_fraction: the cosine decay after warm-up ends at lr * min_lr_fraction.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's (beta1, beta2).
        adam_eps: AdamW's epsilon.
        max_grad_norm: clip the global gradient norm to this; None turns clipping off.
        ema_decay: decay of the exponential moving average of the trainable weights, warmed up as
            min(ema_decay, (1 + s) / (10 + s)) at step s; None turns EMA off. The export uses
            the EMA weights when it is on.
        checkpoint_every: write a checkpoint every this many steps (and at the last step).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: steps between loss-log flushes (one host sync and one NaN check each).
        seed: the run's seed, passed to objectives' `seeded_generator` by whoever builds them.
        mixed_precision: "no", "bf16" or "fp16" (accelerate's autocast; fp16 adds a grad scaler).
        threads: torch CPU threads (None leaves torch's default).
    """

    steps: int
    out_dir: Path
    grad_accumulation: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    ema_decay: Optional[float] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "no"
    threads: Optional[int] = None
    export_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.export_dir = Path(self.export_dir) if self.export_dir is not None else self.out_dir / "export"
        self.betas = tuple(float(b) for b in self.betas) if _is_pair(self.betas) else self.betas
        self.validate()

    def validate(self) -> None:
        """Checks every field.

        Raises:
            ValueError: one line naming the field, its value and what is allowed.
        """
        for name in ("steps", "grad_accumulation", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("min_lr_fraction", self.min_lr_fraction, low=0.0, high=1.0)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("adam_eps", self.adam_eps, low=0.0, low_open=True)
        if not _is_pair(self.betas):
            raise ValueError(f"betas: {self.betas!r} must be two numbers (beta1, beta2)")
        for index, beta in enumerate(self.betas):
            _check_float(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.ema_decay is not None:
            _check_float("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} is not allowed; "
                             f"choose one of: {', '.join(MIXED_PRECISION)}")
        if str(self.out_dir) in ("", "."):
            raise ValueError("out_dir: give a folder for checkpoints and logs (not the working directory)")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay from lr to lr * min_lr_fraction at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_fraction + (1 - self.min_lr_fraction) * cosine)

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay used after optimizer step `step` (0-based): warmed up, capped at ema_decay."""
        if self.ema_decay is None:
            raise ValueError("ema_decay is None: EMA is off")
        return min(self.ema_decay, (1 + step) / (10 + step))

    def to_dict(self) -> dict:
        """The fields as JSON-friendly values."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values["out_dir"] = str(self.out_dir)
        values["export_dir"] = str(self.export_dir)
        values["betas"] = list(self.betas)
        return values

    def fingerprint(self) -> str:
        """sha256 of the fields that decide the trained weights (not paths, threads or intervals)."""
        values = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}: {value} must be >= {minimum}")


def _check_float(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: {value} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name}: {value} must be {'<' if high_open else '<='} {high}")


__all__ = ["TrainConfig", "MIXED_PRECISION"]
