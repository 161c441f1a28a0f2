"""Honest measurement: counted FLOPs, NFE, wall-clock, peak memory, and quality metrics.

FLOPs are counted by torch's FlopCounterMode over the actual computation. Wall-clock is the
median of repeats after a warm-up, synchronising the device. Quality compares images in [0, 1]
with the full-compute reference of the same seeds (PSNR, SSIM from torchmetrics); FD is
torchmetrics' Frechet distance with the judge's features.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

import caching.flops  # noqa: F401  (quantized linears count their FLOPs)


@dataclass
class ComputeStats:
    """Compute spent by one generation.

    Attributes:
        flops: floating-point operations counted by torch (multiply-add = 2).
        nfe: model evaluations (a guided step with cond and uncond counts 2).
        wall_seconds: median wall-clock of the timed repeats.
        peak_memory_mb: peak device memory (CUDA) or None on CPU.
    """

    flops: int
    nfe: int
    wall_seconds: float
    peak_memory_mb: float | None = None


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """Runs `fn()` under torch's FLOP counter; returns (result, total FLOPs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
                device: torch.device | str = "cpu") -> float:
    """Median wall-clock seconds of `repeats` calls after `warmup` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


class NonFiniteImagesError(ValueError):
    """Generated images hold NaN or infinity; its message is one line naming the run."""


def check_finite(images: torch.Tensor, label: str = "images") -> torch.Tensor:
    """Returns `images` (any shape) if every value is finite, else raises NonFiniteImagesError.

    Metrics of non-finite images are meaningless (and FD's matrix square root can crash on them),
    so every metric here checks first. One host sync per call: for whole generations, not steps.
    """
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteImagesError(
            f"{label}: {bad} of {images.numel()} generated values are NaN or infinite; check the guidance scale, "
            "schedule and solver parameters and the adapters (their scales and weights)")
    return images


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images vs reference, both (B, C, H, W) in [0, 1]."""
    check_finite(images)
    check_finite(reference, "reference")
    values = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none",
                                     dim=(1, 2, 3))
    return float(values.clamp(max=100.0).mean())


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images vs reference, both (B, C, H, W) in [0, 1] (7x7 Gaussian window)."""
    check_finite(images)
    check_finite(reference, "reference")
    return float(structural_similarity_index_measure(images, reference, data_range=1.0,
                                                     kernel_size=7))


class FrechetDistance:
    """FD between generated and real images in the judge's feature space (torchmetrics FID).

    Args:
        feature_module: an nn.Module mapping (B, 1, H, W) in [0, 1] to (B, F), with `num_features`.
        real_images: (N, 1, H, W) in [0, 1], the real reference set (fixed for a model).
    """

    def __init__(self, feature_module: torch.nn.Module, real_images: torch.Tensor):
        # sync_on_compute=False: only the main process evaluates under `accelerate launch`.
        self.metric = FrechetInceptionDistance(feature=feature_module, normalize=True,
                                               reset_real_features=False, sync_on_compute=False)
        self.metric.update(real_images, real=True)

    def __call__(self, images: torch.Tensor) -> float:
        """FD of `images` (B, 1, H, W) in [0, 1] to the real set."""
        check_finite(images)
        self.metric.reset()
        self.metric.update(images, real=False)
        return float(self.metric.compute())


def class_accuracy(judge: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (B, 1, H, W) in [0, 1] the judge assigns to their requested label."""
    check_finite(images)
    with torch.no_grad():
        predicted = judge(images).argmax(dim=1)
    return float((predicted == labels.to(predicted.device)).float().mean())
