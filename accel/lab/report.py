"""The one report module: printed and Markdown tables, the Pareto plot and the image grid.

Every lab command and bench writes its human output through these functions, beside the JSON.
Tables show the same columns everywhere (what is absent reads "-"); the Pareto plot puts FLOP
speedup against PSNR (and FD where measured) with the best fewer-steps baseline as a frontier; the
image grid shows the reference row above the configurations' rows, the same samples in each.
"""

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
    ("lpips", "LPIPS", "{:.4f}"),
    ("clip_score", "CLIP", "{:.2f}"),
    ("image_reward", "ImageReward", "{:.3f}"),
    ("fd", "FD", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
)
FAMILY_COLOURS = {"sampler": "tab:gray", "cache": "tab:blue", "adapter": "tab:green", "cache+adapter": "tab:purple",
                  "anchor": "tab:orange"}


Columns = Sequence[tuple[str, str, str]]  # (record key, title, format)


def _columns(records: Sequence[dict], columns: Columns) -> list[tuple[str, str, str]]:
    """The columns at least one record has (label always)."""
    return [c for c in columns if c[0] == "label" or any(r.get(c[0]) is not None for r in records)]


def _cells(record: dict, columns: list[tuple[str, str, str]]) -> list[str]:
    cells = []
    for key, _, fmt in columns:
        value = record.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return cells


def format_table(records: Sequence[dict], columns: Columns = COLUMNS) -> str:
    """A fixed-width text table of the records (one row each); `columns` for a bench's own."""
    columns = _columns(records, columns)
    rows = [[title for _, title, _ in columns]] + [_cells(r, columns) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[dict], columns: Columns = COLUMNS) -> str:
    """The same table in Markdown."""
    columns = _columns(records, columns)
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(r, columns)) + " |" for r in records]
    return "\n".join(lines)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right Pareto frontier of (speedup, quality), both higher-is-better, by speedup."""
    frontier, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # at equal speedup the best quality first
        if y > best:
            frontier.append((x, y))
            best = y
    return sorted(frontier)


def plot_pareto(path: Path, records: Sequence[dict], title: str = "") -> None:
    """FLOPs speedup vs PSNR (and vs FD where measured), one colour per family; the fewer-steps
    baselines (the best solver's equal-FLOPs line) as a frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if r.get("psnr") is not None and r.get("kind") != "reference"]
    metrics = [("psnr", 1, "PSNR vs reference (dB)")]
    if any(r.get("fd") is not None for r in measured):
        metrics.append(("fd", -1, "FD to real data (lower is better)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for axis, (metric, sign, ylabel) in zip(axes[0], metrics):
        for family, colour in FAMILY_COLOURS.items():
            points = [(r["flops_speedup"], r[metric]) for r in measured if r.get("family", "sampler") == family
                      and r["kind"] != "equal-flops-baseline"]
            if points:
                axis.scatter(*zip(*points), color=colour, label=family, s=22)
        baselines = [(r["flops_speedup"], sign * r[metric]) for r in measured if r["kind"] == "equal-flops-baseline"]
        if baselines:
            frontier = [(x, sign * y) for x, y in pareto_frontier(baselines)]
            axis.plot(*zip(*frontier), color="tab:red", linestyle="--", marker="x", label="fewer steps (frontier)")
        axis.set_xscale("log")
        axis.set_xlabel("FLOPs speedup vs reference (log)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _displayable(images: torch.Tensor) -> torch.Tensor:
    """(K, C, H, W) or videos (K, F, C, H, W) -> (K, H, W, C) in [0, 1] (a video's middle frame)."""
    if images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    return images.float().clamp(0, 1).permute(0, 2, 3, 1)


def save_grid(rows: Sequence[torch.Tensor], row_titles: Sequence[str], path: Path,
              column_titles: Sequence[str] | None = None) -> None:
    """Saves images as a grid: one row per tensor of K images (grey or RGB; videos by their middle frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.9 * columns + 1.4, 0.95 * len(rows) + 0.4),
                             squeeze=False)
    for r, (images, title) in enumerate(zip(rows, row_titles)):
        shown = _displayable(images)
        for c in range(columns):
            axis = axes[r][c]
            picture = shown[c]
            if picture.shape[-1] == 1:
                axis.imshow(picture[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(picture.numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and column_titles is not None:
                axis.set_title(column_titles[c], fontsize=7)
    fig.tight_layout(pad=0.2)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def grid_picks(labels: torch.Tensor | None, count: int, per_class: int = 1, limit: int = 12) -> torch.Tensor:
    """Which samples an image grid shows: the first `per_class` of each class, else the first `limit`."""
    if labels is None:
        return torch.arange(min(count, limit))
    picks = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in labels.unique(sorted=True)]
    return torch.cat(picks)[:limit * per_class]
