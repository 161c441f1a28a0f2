"""The independent judge: a small CNN digit classifier trained on the real data only.

It gives class accuracy of generated samples and the features for the Frechet distance (FD) to
real data. Inputs are images (B, 1, H, W) in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from accel.embedded.model import WEIGHTS_DIR

JUDGE_DIR = WEIGHTS_DIR / "judge"


class DigitJudge(ModelMixin, ConfigMixin):
    """Conv(32)-Conv(64)-Conv(128) -> `num_features` features -> class logits.

    Args:
        num_classes: number of digit classes.
        num_features: width of the penultimate (feature) layer used for FD.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, num_features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, num_features), nn.SiLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, num_features)."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images))


class JudgeFeatures(nn.Module):
    """The feature extractor torchmetrics' FrechetInceptionDistance accepts as `feature`."""

    def __init__(self, judge: DigitJudge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images.float())


def load_judge(folder: str | Path = JUDGE_DIR, device: str = "cpu") -> DigitJudge:
    """Loads the committed judge with `from_pretrained` (safetensors only)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no judge at {folder}: train it with `python scripts/train_judge.py`")
    return DigitJudge.from_pretrained(folder, use_safetensors=True).to(device).eval()
