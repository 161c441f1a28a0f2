"""The one Evaluator: quality of generated samples against the full-compute reference of the same seeds.

Metrics are chosen by name (`eval.metrics`):

* `psnr`, `ssim` (torchmetrics; always available) against the reference images; videos per frame.
* `lpips` (torchmetrics' LPIPS; needs the `metrics` extra and its backbone weights), against the
  reference images.
* `clip_score` (torchmetrics' CLIPScore) of each image with its prompt, with the CLIP model folder
  given in `eval.metric_models.clip_score` (never downloaded).
* `image_reward` (the ImageReward package, `metrics` extra) with its weights in
  `eval.metric_models.image_reward`.
* `fd` (Frechet distance to real digits in the judge's features) and `accuracy` (the judge's class
  accuracy): the embedded digit models only.

Images are float (N, C, H, W) in [0, 1], or (N, F, C, H, W) for videos. Non-finite images are
refused before any metric sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from accel import measure
from accel.lab.inputs import Inputs

ALWAYS = ("psnr", "ssim")
OPTIONAL = ("lpips", "clip_score", "image_reward")
EMBEDDED_ONLY = ("fd", "accuracy")
METRICS = ALWAYS + OPTIONAL + EMBEDDED_ONLY


class EvalError(ValueError):
    """A metric that cannot be computed here; the message is one line naming the key and the fix."""


def frames(images: torch.Tensor) -> torch.Tensor:
    """Videos (N, F, C, H, W) as frames (N*F, C, H, W); images unchanged."""
    return images.flatten(0, 1) if images.ndim == 5 else images


def _extra(metric: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvalError(f"eval.metrics: {metric} needs the optional extra: pip install 'accel-stack[metrics]' "
                        f"(it imports {module})") from None


def _model_path(settings: dict, metric: str) -> str:
    path = settings.get(metric)
    if not path or not Path(str(path)).exists():
        raise EvalError(f"eval.metric_models.{metric}: {metric} needs its model weights in a local folder or file "
                        f"(nothing is downloaded at run time); got {path!r}")
    return str(path)


class Evaluator:
    """Scores samples against the reference.

    Args:
        metrics: metric names (see METRICS).
        inputs: the samples' prompts / labels.
        embedded: the model is an embedded digit model (fd, accuracy available).
        metric_models: metric name -> local weights (clip_score, image_reward).
        real_samples: real images for the FD statistics (embedded models).
        resolution: image side of the real images (embedded models).
    """

    def __init__(self, metrics: list[str], inputs: Inputs, *, embedded: bool, metric_models: dict | None = None,
                 real_samples: int = 2000, resolution: int = 16) -> None:
        self.metrics = list(metrics)
        self.inputs = inputs
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise EvalError(f"eval.metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if not embedded and any(m in EMBEDDED_ONLY for m in self.metrics):
            raise EvalError("eval.metrics: fd and accuracy need the embedded digit models' judge; for your pipeline "
                            f"use {', '.join(ALWAYS + OPTIONAL)}")
        if "fd" in self.metrics and len(inputs) < 2:
            raise EvalError(f"eval.metrics: fd compares distributions and needs at least 2 samples, this run has "
                            f"{len(inputs)}; add samples (inputs.samples_per_class) or drop fd")
        settings = dict(metric_models or {})
        self._scorers: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {}
        for metric in self.metrics:
            self._scorers[metric] = self._build(metric, settings, real_samples, resolution)

    def _build(self, metric: str, settings: dict, real_samples: int, resolution: int):
        if metric == "psnr":
            return lambda images, reference: measure.psnr(frames(images), frames(reference))
        if metric == "ssim":
            return lambda images, reference: measure.ssim(frames(images), frames(reference))
        if metric == "lpips":
            return _lpips()
        if metric == "clip_score":
            return _clip_score(_model_path(settings, metric), self.inputs)
        if metric == "image_reward":
            return _image_reward(_model_path(settings, metric), self.inputs)
        return _judge_metric(metric, self.inputs, real_samples, resolution)

    def __call__(self, images: torch.Tensor, reference: torch.Tensor, label: str = "images") -> dict[str, float]:
        """Every metric of `images` against `reference` (same shapes, [0, 1]); `label` names the run in errors."""
        if not torch.isfinite(images).all():
            raise EvalError(f"{label}: the generated images are not finite (NaN or inf); no metric can score them")
        return {metric: float(score(images, reference)) for metric, score in self._scorers.items()}


def _lpips() -> Callable:
    module = _extra("lpips", "torchmetrics.image.lpip")
    try:
        metric = module.LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as error:  # noqa: BLE001 - a missing backbone surfaces as several classes
        raise EvalError(f"eval.metrics: lpips cannot load its backbone weights ({type(error).__name__}); install "
                        "the metrics extra and cache torchvision's alexnet weights") from None

    def score(images: torch.Tensor, reference: torch.Tensor) -> float:
        a, b = frames(images), frames(reference)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        return float(metric(a, b))
    return score


def _clip_score(path: str, inputs: Inputs) -> Callable:
    from torchmetrics.multimodal.clip_score import CLIPScore

    if inputs.prompts is None:
        raise EvalError("eval.metrics: clip_score scores images against their prompts; this model takes class labels")
    metric = CLIPScore(model_name_or_path=path)

    def score(images: torch.Tensor, reference: torch.Tensor) -> float:
        first = images[:, 0] if images.ndim == 5 else images
        metric.reset()
        metric.update((first * 255).to(torch.uint8), list(inputs.prompts[:len(first)]))
        return float(metric.compute())
    return score


def _image_reward(path: str, inputs: Inputs) -> Callable:
    reward = _extra("image_reward", "ImageReward")
    model = reward.load(path, device="cpu")

    def score(images: torch.Tensor, reference: torch.Tensor) -> float:
        from PIL import Image

        first = images[:, 0] if images.ndim == 5 else images
        pictures = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")) for img in first]
        values = [model.score(prompt, [picture]) for prompt, picture in zip(inputs.prompts, pictures)]
        return float(sum(values) / len(values))
    return score


def _judge_metric(metric: str, inputs: Inputs, real_samples: int, resolution: int) -> Callable:
    from accel.embedded import JudgeFeatures, load_judge
    from accel.embedded.data import real_reference_set

    judge = load_judge()
    if metric == "accuracy":
        labels = inputs.label_tensor
        return lambda images, reference: measure.class_accuracy(judge, images, labels[:len(images)])
    real, _ = real_reference_set(real_samples, resolution)
    fd = measure.FrechetDistance(JudgeFeatures(judge), measure.to_unit_range(real))
    return lambda images, reference: fd(images)
