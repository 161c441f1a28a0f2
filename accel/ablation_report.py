"""Outputs of `accel ablate`: JSON, CSV, a Markdown table, a Pareto plot and an image grid."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from omegaconf import DictConfig

from accel import io as files
from accel import measure
from accel.recipe import to_yaml
from accel.report import format_table, markdown_table, save_grid

CSV_FIELDS = ("label", "kind", "family", "nfe", "flops", "flops_speedup", "wall_speedup", "psnr", "ssim", "fd",
              "accuracy", "beats_equal_flops_baseline", "skipped")
FAMILY_COLOURS = {"sampler": "tab:gray", "cache": "tab:blue", "adapter": "tab:green",
                  "cache+adapter": "tab:purple", "reference": "black"}


def _measured(records: list[dict]) -> list[dict]:
    return [r for r in records if "psnr" in r]


def write_csv(path: Path, records: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in CSV_FIELDS})
    files.write_text(path, text.getvalue())


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right Pareto frontier of (speedup, quality) with higher both better."""
    frontier, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: -p[0]):
        if y > best:
            frontier.append((x, y))
            best = y
    return sorted(frontier)


def plot_pareto(path: Path, records: list[dict]) -> None:
    """FLOPs speedup vs PSNR and vs FD, one colour per family; the plain baselines as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = [r for r in _measured(records) if r["kind"] != "reference"]
    for axis, metric, sign in ((axes[0], "psnr", 1), (axes[1], "fd", -1)):
        for family, colour in FAMILY_COLOURS.items():
            points = [(r["flops_speedup"], r[metric]) for r in measured if r.get("family", "sampler") == family
                      and r["kind"] == "stack"]
            if points:
                axis.scatter(*zip(*points), color=colour, label=f"stack: {family}", s=22)
        baselines = [(r["flops_speedup"], sign * r[metric]) for r in measured if r["kind"] == "equal-flops-baseline"]
        if baselines:
            frontier = [(x, sign * y) for x, y in _frontier(baselines)]
            axis.plot(*zip(*frontier), color="tab:red", linestyle="--", marker="x",
                      label="fewer-steps baseline (frontier)")
        axis.set_xscale("log")
        axis.set_xlabel("FLOPs speedup vs reference (log)")
        axis.set_ylabel("PSNR vs reference (dB)" if metric == "psnr" else "FD to real data (lower is better)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def _first_per_class(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    picks = [torch.nonzero(labels == c).squeeze(1)[:1] for c in labels.unique(sorted=True)]
    return images[torch.cat(picks)]


def save_ablation_grid(path: Path, records: list[dict], store, labels: torch.Tensor, rows: int) -> None:
    """Reference row, then the best stacks by PSNR and the best baseline, one sample per class."""
    stacks = sorted((r for r in _measured(records) if r["kind"] == "stack"), key=lambda r: -r["psnr"])[:rows]
    baselines = sorted((r for r in _measured(records) if r["kind"] == "equal-flops-baseline"),
                       key=lambda r: -r["flops_speedup"] * (r["psnr"] >= 28))[:1]
    shown = [("reference", store.images("reference"))]
    shown += [(f"{r['label'][:28]} ({r['flops_speedup']:.1f}x)", store.images(r["key"])) for r in stacks + baselines]
    shown = [(title, images) for title, images in shown if images is not None]
    save_grid([measure.to_unit_range(_first_per_class(images, labels)) for _, images in shown],
              [title for title, _ in shown], path)


def write_ablation_outputs(folder: Path, recipe: DictConfig, records: list[dict], store,
                           labels: torch.Tensor) -> None:
    """Writes ablation.json/.csv/.md, pareto.png and grid.png, and prints the table."""
    files.write_json(folder / "ablation.json", {"name": recipe.name, "records": records}, indent=2, default=str)
    write_csv(folder / "ablation.csv", records)
    rows = [dict(r, label=f"{r['label']} [{r['kind']}]" + (" *" if r.get("beats_equal_flops_baseline") else ""))
            for r in _measured(records)]
    skipped = [f"- {r['label']}: {r['skipped']}" for r in records if "skipped" in r]
    files.write_text(
        folder / "ablation.md",
        f"# Ablation: {recipe.name}\n\n`*` marks stacks that beat the best fewer-steps baseline of equal or "
        f"lower FLOPs.\n\n{markdown_table(rows)}\n\n![pareto](pareto.png)\n\n![grid](grid.png)\n\n"
        + ("## Skipped\n\n" + "\n".join(skipped) + "\n\n" if skipped else "")
        + f"## Recipe\n\n```yaml\n{to_yaml(recipe)}```\n")
    plot_pareto(folder / "pareto.png", records)
    save_ablation_grid(folder / "grid.png", records, store, labels, recipe.ablation.grid_rows)
    print(format_table(rows))
    print(f"\nwrote {folder}/ablation.json, ablation.csv, ablation.md, pareto.png, grid.png")
