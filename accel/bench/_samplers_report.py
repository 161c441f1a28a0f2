"""What `accel bench samplers` prints and writes: the comparison per NFE, the PSNR pivot and the
JSON, with the tables and Pareto plots of the lab's report module (`accel.lab.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from accel import io
from accel.lab.report import format_table, markdown_table, plot_pareto

ORIGINS = ("baseline", "accel", "diffusers")  # the fewer-steps baseline, ours, diffusers' schedulers


def sort_records(records: Sequence[dict]) -> list[dict]:
    """By model, NFE, origin (baseline, ours, diffusers), then PSNR, best first."""
    return sorted(records, key=lambda r: (r["model"], r["nfe"], ORIGINS.index(r["origin"]), -r["psnr"]))


def best_per_nfe(records: Sequence[dict]) -> list[dict]:
    """The record with the highest PSNR for each (model, NFE, origin)."""
    best: dict[tuple, dict] = {}
    for record in records:
        group = (record["model"], record["nfe"], record["origin"])
        if group not in best or record["psnr"] > best[group]["psnr"]:
            best[group] = record
    return sort_records(best.values())


def comparison(records: Sequence[dict]) -> list[dict]:
    """Per model and NFE: the best of ours, of diffusers' and of the fewer-steps baseline (by PSNR),
    and our margins over the other two (dB)."""
    best = {(r["model"], r["nfe"], r["origin"]): r for r in best_per_nfe(records)}
    rows = []
    for model, nfe in sorted({(r["model"], r["nfe"]) for r in records}):
        picked = {origin: best.get((model, nfe, origin)) for origin in ORIGINS}
        entry = {"model": model, "nfe": nfe}
        for origin, record in picked.items():
            entry[origin] = None if record is None else {"configuration": f"{record['solver']}/{record['schedule']}",
                                                         "psnr": record["psnr"], "fd": record["fd"]}
        ours = picked["accel"]
        for origin in ("diffusers", "baseline"):
            other = picked[origin]
            entry[f"margin_over_{origin}_db"] = (None if ours is None or other is None
                                                 else ours["psnr"] - other["psnr"])
        rows.append(entry)
    return rows


def _cell(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['configuration']} {entry['psnr']:.2f} (FD {entry['fd']:.3f})"


def _margin(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def comparison_table(rows: Sequence[dict]) -> str:
    """Markdown: one row per model and NFE."""
    lines = ["| model | NFE | baseline (pipeline's walk) | ours | diffusers | ours - baseline | ours - diffusers |",
             "|---|---:|---|---|---|---:|---:|"]
    for entry in rows:
        lines.append(f"| {entry['model']} | {entry['nfe']} | {_cell(entry['baseline'])} | {_cell(entry['accel'])} | "
                     f"{_cell(entry['diffusers'])} | {_margin(entry['margin_over_baseline_db'])} | "
                     f"{_margin(entry['margin_over_diffusers_db'])} |")
    return "\n".join(lines)


def psnr_pivot(records: Sequence[dict]) -> str:
    """Markdown: per model, one row per origin/solver/schedule and one PSNR column per NFE."""
    nfes = sorted({r["nfe"] for r in records})
    rows: dict[tuple, dict[int, float]] = {}
    for r in records:
        rows.setdefault((r["model"], ORIGINS.index(r["origin"]), r["origin"], r["solver"], r["schedule"]),
                        {})[r["nfe"]] = r["psnr"]
    lines = ["| model | origin | solver / schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|" + "---:|" * len(nfes)]
    for (model, _, origin, solver, schedule), values in sorted(rows.items()):
        cells = [f"{values[n]:.2f}" if n in values else "-" for n in nfes]
        lines.append(f"| {model} | {origin} | {solver} / {schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(records: list[dict], skipped: list[str], settings: dict, timing: dict, json_path: Path | None,
                  out_dir: Path) -> dict:
    """Prints the tables and time; writes samplers.json (and json_path), samplers.md and one Pareto
    plot per model (samplers-<model>.png). Returns the JSON summary.

    Args:
        records: the bench rows (lab records with model, origin, solver, schedule, nfe per branch).
        skipped: one line per configuration that cannot meet its NFE exactly.
        settings: the run's settings and models, stored in the JSON.
        timing: {"wall_seconds": ..., "cpu_seconds": ...} of the run.
        json_path: an extra path for the JSON summary.
        out_dir: the output folder.
    """
    records = sort_records(records)
    best, compared = best_per_nfe(records), comparison(records)
    print("\nBest per NFE and origin (by PSNR; NFE per guidance branch):\n" + format_table(best))
    print("\nOurs against the fewer-steps baseline and diffusers:\n" + comparison_table(compared))
    if skipped:
        print(f"\nSkipped {len(skipped)} configurations that cannot meet an NFE exactly:\n  " + "\n  ".join(skipped))
    print(f"\nTime taken: {timing['wall_seconds'] / 60:.1f} min wall-clock, "
          f"{timing['cpu_seconds'] / 60:.1f} min CPU (all processes)")
    summary = {"records": records, "comparison": compared, "skipped": skipped, **timing, "settings": settings}
    for path in [out_dir / "samplers.json"] + ([Path(json_path)] if json_path else []):
        io.write_json(path, summary, indent=1, default=str)
    plots = []
    for model in sorted({r["model"] for r in records}):
        plots.append(f"samplers-{model}.png")
        plot_pareto(out_dir / plots[-1], [r for r in records if r["model"] == model],
                    title=f"accel bench samplers: {model} (grey: ours, orange: diffusers, red: UniPC / DPM++ "
                          "on the pipeline's walk)")
    io.write_text(out_dir / "samplers.md",
                  "NFE: model evaluations per guidance branch (CFG doubles the calls); PSNR (dB) against the "
                  "200-step reference of the same seeds.\n\n"
                  f"## Ours against the fewer-steps baseline and diffusers\n\n{comparison_table(compared)}\n\n"
                  f"## Best per NFE and origin\n\n{markdown_table(best)}\n\n"
                  f"## PSNR (dB) by NFE\n\n{psnr_pivot(records)}\n\n## All\n\n{markdown_table(records)}\n\n"
                  + "".join(f"![{name}]({name})\n\n" for name in plots))
    print(f"wrote {out_dir / 'samplers.json'}, samplers.md, {', '.join(plots)}"
          + (f" and {json_path}" if json_path else ""))
    return summary
