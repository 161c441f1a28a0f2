"""The one training core: `train(objective, TrainConfig(...)) -> TrainResult`.

Objectives (distill.objective.Objective) plug into one accelerate loop with mixed precision,
gradient accumulation, LR warm-up + cosine decay, gradient clipping, optional EMA, atomic
safetensors checkpoints with resume, NaN checks, a progress bar, a loss CSV and a loss plot.
"""

from distill.training.checkpoint import TrainingError
from distill.training.config import TrainConfig
from distill.training.loop import TrainResult, train, trainable_parameters

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train", "trainable_parameters"]
