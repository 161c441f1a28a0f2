"""Human output beside the JSON: a printed table, report.md and a PNG image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from accel.io import save_figure

COLUMNS = (
    ("label", "run", "{}"),
    ("nfe", "NFE", "{}"),
    ("tflops", "TFLOPs", "{:.4f}"),
    ("flops_speedup", "speedup (FLOPs)", "{:.2f}x"),
    ("wall_speedup", "speedup (wall)", "{:.2f}x"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("fd", "FD", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
)


def _cells(record: dict) -> list[str]:
    cells = []
    for key, _, fmt in COLUMNS:
        value = record.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return cells


def format_table(records: Sequence[dict]) -> str:
    """A fixed-width text table of the records (one row each)."""
    header = [title for _, title, _ in COLUMNS]
    rows = [header] + [_cells(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[dict]) -> str:
    """The same table in Markdown."""
    header = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in records]
    return "\n".join(lines)


def save_grid(rows: Sequence[torch.Tensor], row_titles: Sequence[str], path: Path,
              column_titles: Sequence[str] | None = None) -> None:
    """Saves images as a grid: one row per tensor (K, 1, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.6 * columns + 1.2, 0.7 * len(rows) + 0.4),
                             squeeze=False)
    for r, (images, title) in enumerate(zip(rows, row_titles)):
        for c in range(columns):
            axis = axes[r][c]
            axis.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and column_titles is not None:
                axis.set_title(column_titles[c], fontsize=7)
    fig.tight_layout(pad=0.2)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
