"""Human and machine output of the samplers benchmark: the resumable JSONL store, the tables, the
quality-vs-NFE plot and the target check."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from accel import io

FIELDS = ("model", "solver", "schedule", "nfe", "origin", "psnr", "ssim", "fd", "accuracy")
TARGET_NFES = (6, 8)
TARGET_MARGIN_DB = 1.5


def record_key(record: dict) -> str:
    """The identity of a configuration: model, origin, solver, schedule, NFE."""
    return "|".join(str(record[name]) for name in ("model", "origin", "solver", "schedule", "nfe"))


class RecordStore:
    """Finished records, one JSON line each, so an interrupted run resumes where it stopped.

    A line is reused only if its `signature` (weights, seeds, sample count, reference) matches.

    Args:
        path: the JSONL file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        for record in io.read_jsonl(path):  # a line cut short by an interruption is skipped (and said)
            try:
                self.records[f"{record['signature']}#{record_key(record)}"] = record
            except KeyError:
                continue

    def get(self, signature: str, key: str) -> dict | None:
        return self.records.get(f"{signature}#{key}")

    def add(self, record: dict) -> None:
        self.records[f"{record['signature']}#{record_key(record)}"] = record
        io.append_jsonl(self.path, record)


def _row(record: dict) -> list[str]:
    return [record["model"], str(record["nfe"]), record["origin"], record["solver"], record["schedule"],
            f"{record['psnr']:.2f}", f"{record['ssim']:.4f}", f"{record['fd']:.3f}", f"{record['accuracy']:.3f}"]


HEADER = ["model", "NFE", "origin", "solver", "schedule", "PSNR dB", "SSIM", "FD", "accuracy"]


def text_table(records: Sequence[dict]) -> str:
    """A fixed-width table, one row per record."""
    rows = [HEADER] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(records: Sequence[dict]) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_row(r)) + " |" for r in records])


def sort_records(records: Iterable[dict]) -> list[dict]:
    """By model, NFE, origin (ours first), then PSNR, best first."""
    return sorted(records, key=lambda r: (r["model"], r["nfe"], r["origin"], -r["psnr"]))


def best_per_nfe(records: Sequence[dict]) -> list[dict]:
    """The record with the highest PSNR for each (model, NFE, origin)."""
    best: dict[tuple, dict] = {}
    for record in records:
        group = (record["model"], record["nfe"], record["origin"])
        if group not in best or record["psnr"] > best[group]["psnr"]:
            best[group] = record
    return sort_records(best.values())


def psnr_pivot(records: Sequence[dict]) -> str:
    """Markdown: per model, one row per origin/solver/schedule and one PSNR column per NFE."""
    nfes = sorted({r["nfe"] for r in records})
    rows: dict[tuple, dict[int, float]] = {}
    for r in records:
        rows.setdefault((r["model"], r["origin"], r["solver"], r["schedule"]), {})[r["nfe"]] = r["psnr"]
    lines = ["| model | origin | solver / schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|" + "---:|" * len(nfes)]
    for (model, origin, solver, schedule), values in sorted(rows.items()):
        cells = [f"{values[n]:.2f}" if n in values else "-" for n in nfes]
        lines.append(f"| {model} | {origin} | {solver} / {schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(records: Sequence[dict]) -> list[dict]:
    """At NFE 6 and 8 per model: our best (by PSNR) against diffusers' best (by PSNR).

    Met when ours is >= 1.5 dB higher in PSNR and has the lower FD.
    """
    best = {(r["model"], r["nfe"], r["origin"]): r for r in best_per_nfe(records)}
    results = []
    for model in sorted({r["model"] for r in records}):
        for nfe in TARGET_NFES:
            ours, theirs = best.get((model, nfe, "accel")), best.get((model, nfe, "diffusers"))
            if ours is None or theirs is None:
                continue
            margin = ours["psnr"] - theirs["psnr"]
            results.append({
                "model": model, "nfe": nfe, "ours": f"{ours['solver']}/{ours['schedule']}",
                "diffusers": f"{theirs['solver']}/{theirs['schedule']}", "psnr_ours": ours["psnr"],
                "psnr_diffusers": theirs["psnr"], "margin_db": margin, "fd_ours": ours["fd"],
                "fd_diffusers": theirs["fd"],
                "met": bool(margin >= TARGET_MARGIN_DB and ours["fd"] < theirs["fd"])})
    return results


def format_targets(results: Sequence[dict]) -> str:
    """One line per target check."""
    lines = []
    for t in results:
        lines.append(
            f"{t['model']} NFE {t['nfe']}: ours {t['ours']} {t['psnr_ours']:.2f} dB, FD {t['fd_ours']:.3f} vs "
            f"diffusers {t['diffusers']} {t['psnr_diffusers']:.2f} dB, FD {t['fd_diffusers']:.3f}: "
            f"{t['margin_db']:+.2f} dB -> {'MET' if t['met'] else 'MISSED'} "
            f"(target >= +{TARGET_MARGIN_DB} dB and lower FD)")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: Path) -> None:
    """PSNR and FD against NFE: one row per model, one line per solver/schedule, diffusers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(len(models), 2, figsize=(17, 5.5 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        lines: dict[tuple, list[dict]] = {}
        for record in records:
            if record["model"] == model:
                lines.setdefault((record["origin"], record["solver"], record["schedule"]), []).append(record)
        for index, ((origin, solver, schedule), points) in enumerate(sorted(lines.items())):
            points = sorted(points, key=lambda r: r["nfe"])
            style = dict(linestyle="--" if origin == "diffusers" else "-", marker="o", markersize=3,
                         color=plt.cm.tab20(index % 20) if index < 20 else plt.cm.tab20b(index % 20),
                         linewidth=1.0, label=f"{'diffusers ' if origin == 'diffusers' else ''}{solver}/{schedule}")
            for column, metric in enumerate(("psnr", "fd")):
                axes[row][column].plot([p["nfe"] for p in points], [p[metric] for p in points], **style)
        for column, title in enumerate(("PSNR vs 200-step reference (dB, higher is better)",
                                        "FD to real data (lower is better)")):
            axes[row][column].set_title(f"{model}: {title}", fontsize=10)
            axes[row][column].set_xlabel("NFE (per guidance branch)")
            axes[row][column].set_xticks(sorted({r["nfe"] for r in records}))
            axes[row][column].grid(alpha=0.3)
        axes[row][1].set_yscale("log")
        axes[row][1].legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save_figure(fig, path, dpi=90)
    plt.close(fig)


def write_outputs(records: list[dict], skipped: list[str], settings: dict, timing: dict,
                  json_path: Path | None, out_dir: Path) -> dict:
    """Prints the tables, target checks and time; writes samplers.json (and json_path), .md and .png.

    Args:
        records: the measured records.
        skipped: one line per configuration that cannot meet its NFE exactly.
        settings: the run's settings and models, stored in the JSON.
        timing: {"wall_seconds": ..., "cpu_seconds": ...} of the run.
        json_path: an extra path for the JSON summary.
        out_dir: the output folder.
    """
    records = sort_records(records)
    best, targets = best_per_nfe(records), check_targets(records)
    print("\nBest per NFE and origin (by PSNR):\n" + text_table(best))
    print("\nAll configurations:\n" + text_table(records))
    if skipped:
        print(f"\nSkipped {len(skipped)} configurations that cannot meet an NFE exactly:\n  " + "\n  ".join(skipped))
    print("\nTargets (NFE 6 and 8, our best vs diffusers' best):\n" + format_targets(targets))
    print(f"\nTime taken: {timing['wall_seconds'] / 60:.1f} min wall-clock, "
          f"{timing['cpu_seconds'] / 60:.1f} min CPU (all processes)")
    summary = {
        "records": [{k: v for k, v in r.items() if k != "signature"} for r in records],
        "targets": targets, "skipped": skipped, **timing, "settings": settings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in [out_dir / "samplers.json"] + ([json_path] if json_path else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, summary, indent=2)
    io.write_text(
        out_dir / "samplers.md",
        f"## Best per NFE and origin\n\n{markdown_table(best)}\n\n## PSNR (dB) by NFE\n\n{psnr_pivot(records)}\n\n"
        f"## All\n\n"
        f"{markdown_table(records)}\n\n## Targets\n\n{format_targets(targets)}\n")
    plot(records, out_dir / "samplers.png")
    print(f"wrote {out_dir / 'samplers.json'}, samplers.md, samplers.png" + (f" and {json_path}" if json_path else ""))
    return summary
