"""Offline digit data for the embedded models.

Two sources of real glyphs, both available without a network:

* the handwritten digits bundled with scikit-learn (1,797 images of 8x8), and
* the digits 0-9 rendered from the TrueType fonts that matplotlib ships
  (DejaVu Sans/Serif/Mono, STIX General and Computer Modern, 21 faces).

Every glyph is kept at 64x64 in a "glyph bank"; samples are drawn by applying a
random affine transform and a random stroke width at 64x64 and then box-filtering
down to the working resolution. The result is a rich, multi-modal distribution
per class, so that sampling trajectories are curved like a large model's rather
than nearly straight.

Images are returned in [-1, 1] with shape (B, 1, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BANK_SIZE = 64
NUM_CLASSES = 10
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
    "cmtt10.ttf", "cmti10.ttf",
)
# Handwritten glyphs with index % 5 == 0 are held out of training (the "test" split).
HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class GlyphBank:
    """All base glyphs at 64x64.

    Attributes:
        images: (N, 1, 64, 64) float tensor in [0, 1], ink = 1.
        labels: (N,) long tensor of digit classes.
        is_font: (N,) bool tensor, True for rendered font glyphs.
    """

    images: torch.Tensor
    labels: torch.Tensor
    is_font: torch.Tensor


def _render_font_digits(size: int = BANK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    images, labels = [], []
    for name in FONT_FILES:
        font = ImageFont.truetype(str(font_dir / name), size=int(size * 0.8))
        for digit in range(NUM_CLASSES):
            canvas = Image.new("L", (size * 2, size * 2), 0)
            ImageDraw.Draw(canvas).text((size // 2, size // 4), str(digit), fill=255, font=font)
            ink = np.asarray(canvas, dtype=np.float32) / 255.0
            rows, cols = np.nonzero(ink > 0.05)
            glyph = ink[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
            images.append(_fit_to_square(glyph, size))
            labels.append(digit)
    return torch.stack(images), torch.tensor(labels)


def _fit_to_square(glyph: np.ndarray, size: int, fill: float = 0.78) -> torch.Tensor:
    """Scales a cropped glyph so its longer side is `fill * size` and centres it."""
    height, width = glyph.shape
    scale = fill * size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(torch.from_numpy(glyph)[None, None], size=(new_h, new_w),
                            mode="bilinear", align_corners=False, antialias=True)[0, 0]
    out = torch.zeros(size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top: top + new_h, left: left + new_w] = resized
    return out[None]


def _handwritten_digits(size: int = BANK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    # The 8x8 digits fill their frame; pad one pixel so they sit like the font glyphs.
    small = F.pad(small, (1, 1, 1, 1))
    big = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return big, torch.from_numpy(digits.target).long()


def load_glyph_bank(split: str = "train") -> GlyphBank:
    """Builds the glyph bank for one split.

    Args:
        split: "train" (fonts + 80% of handwritten digits), "test" (fonts + the held-out
            20% of handwritten digits) or "all".

    Returns:
        The GlyphBank of that split.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    font_images, font_labels = _render_font_digits()
    hand_images, hand_labels = _handwritten_digits()
    held_out = torch.arange(len(hand_labels)) % HELD_OUT_MODULUS == 0
    if split == "train":
        keep = ~held_out
    elif split == "test":
        keep = held_out
    else:
        keep = torch.ones_like(held_out)
    hand_images, hand_labels = hand_images[keep], hand_labels[keep]
    images = torch.cat([font_images, hand_images])
    labels = torch.cat([font_labels, hand_labels])
    is_font = torch.cat([torch.ones(len(font_labels), dtype=torch.bool),
                         torch.zeros(len(hand_labels), dtype=torch.bool)])
    return GlyphBank(images=images, labels=labels, is_font=is_font)


def _random_affine(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random (B, 2, 3) affine matrices: rotation, scale, aspect, shear, translation."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.95, 1.35)  # >1 shrinks the glyph (the grid samples a wider area)
    aspect = uniform(0.85, 1.15)
    shear = uniform(-0.25, 0.25)
    shift_x, shift_y = uniform(-0.12, 0.12), uniform(-0.12, 0.12)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = scale * aspect, scale / aspect
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * sy + shear * sx
    theta[:, 1, 0] = sin * sx
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    return theta


def _random_stroke(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Thins, keeps or thickens each glyph's strokes at 64x64 (erode / identity / dilate)."""
    choice = torch.randint(0, 4, (images.shape[0],), generator=generator)
    dilated = F.max_pool2d(images, 5, stride=1, padding=2)
    thick = F.max_pool2d(images, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-images, 3, stride=1, padding=1)
    out = torch.where((choice == 0)[:, None, None, None], thin, images)
    out = torch.where((choice == 2)[:, None, None, None], thick, out)
    return torch.where((choice == 3)[:, None, None, None], dilated, out)


def sample_batch(bank: GlyphBank, batch_size: int, resolution: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws an augmented batch, half font glyphs and half handwritten digits.

    Args:
        bank: the glyph bank to draw from.
        batch_size: B.
        resolution: output side H = W (a divisor of 64).
        generator: the random source (CPU generator); the batch is a pure function of it.

    Returns:
        images (B, 1, H, W) in [-1, 1] and labels (B,).
    """
    fonts = torch.nonzero(bank.is_font).squeeze(1)
    hand = torch.nonzero(~bank.is_font).squeeze(1)
    from_font = torch.rand(batch_size, generator=generator) < 0.5
    pick_font = fonts[torch.randint(0, len(fonts), (batch_size,), generator=generator)]
    pick_hand = hand[torch.randint(0, len(hand), (batch_size,), generator=generator)]
    index = torch.where(from_font, pick_font, pick_hand)
    glyphs = _random_stroke(bank.images[index], generator)
    grid = F.affine_grid(_random_affine(batch_size, generator), list(glyphs.shape), align_corners=False)
    warped = F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.avg_pool2d(warped, BANK_SIZE // resolution)
    return small.clamp(0, 1) * 2 - 1, bank.labels[index]


def real_reference_set(num: int, resolution: int, seed: int = 1234,
                       split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of real images (B, 1, H, W) in [-1, 1] with labels, for FD and the judge."""
    generator = torch.Generator().manual_seed(seed)
    return sample_batch(load_glyph_bank(split), num, resolution, generator)
