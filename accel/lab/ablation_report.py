"""Outputs of `accel ablate`: JSON, CSV, a Markdown table, the Pareto plot and the image grid."""

from __future__ import annotations

import csv
import io as text_io

from accel import io
from accel.lab.report import format_table, grid_picks, markdown_table, plot_pareto, save_grid
from accel.recipe import to_yaml

CSV_FIELDS = ("label", "kind", "family", "nfe", "flops", "flops_speedup", "wall_speedup", "psnr", "ssim", "lpips",
              "clip_score", "image_reward", "fd", "accuracy", "beats_equal_flops_baseline", "fingerprint")


def _csv(records: list[dict]) -> str:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: record.get(k) for k in CSV_FIELDS})
    return buffer.getvalue()


def _grid(job, records: list[dict], rows: int) -> None:
    """Reference row, then the best stacks by PSNR and the fastest baseline at >= 28 dB."""
    measured = [r for r in records if r.get("psnr") is not None]
    stacks = sorted((r for r in measured if r["kind"] == "stack"), key=lambda r: -r["psnr"])[:rows]
    baselines = sorted((r for r in measured if r["kind"] == "equal-flops-baseline"),
                       key=lambda r: -r["flops_speedup"] * (r["psnr"] >= 28))[:1]
    _, ref_images = job.reference()
    shown = [("reference", ref_images)]
    shown += [(f"{r['label'][:28]} ({r['flops_speedup']:.1f}x)", job.store.images(r["fingerprint"]))
              for r in stacks + baselines]
    shown = [(title, images) for title, images in shown if images is not None]
    picks = grid_picks(job.inputs.label_tensor, len(job.inputs))
    save_grid([images[picks] for _, images in shown], [title for title, _ in shown], job.folder / "grid.png")


def write_ablation_outputs(job, records: list[dict]) -> None:
    """Writes ablation.json/.csv/.md, pareto.png and grid.png under the job's folder, and prints the table."""
    recipe, folder = job.recipe, job.folder
    io.write_json(folder / "ablation.json", {"name": recipe.name, "records": records}, indent=2, default=str)
    io.write_text(folder / "ablation.csv", _csv(records))
    rows = [dict(r, label=f"{r['label']} [{r['kind']}]" + (" *" if r.get("beats_equal_flops_baseline") else ""))
            for r in records if r.get("psnr") is not None]
    io.write_text(folder / "ablation.md",
                  f"# Ablation: {recipe.name}\n\nModel {job.model.name}, {len(job.inputs)} samples, the same seeds in "
                  f"every row. `*` marks stacks that beat the best fewer-steps baseline of equal or lower FLOPs.\n\n"
                  f"{markdown_table(rows)}\n\n![pareto](pareto.png)\n\n![grid](grid.png)\n\n"
                  f"## Recipe\n\n```yaml\n{to_yaml(recipe)}```\n")
    plot_pareto(folder / "pareto.png", records, title=f"{recipe.name}: {job.model.name}")
    _grid(job, records, int(recipe.ablation.grid_rows))
    print(format_table(rows))
    print(f"\nwrote {folder}/ablation.json, ablation.csv, ablation.md, pareto.png, grid.png")
