"""What `accel bench distill` prints and writes: each stack against its equal-FLOPs baseline, and the
JSON, with the tables and the Pareto plot of the lab's report module (`accel.lab.report`)."""

from __future__ import annotations

from pathlib import Path

from accel import io
from accel.lab.report import format_table, markdown_table, plot_pareto

FIELDS = ("method", "label", "kind", "family", "nfe", "model_calls", "cache", "adapter", "solver", "steps",
          "schedule", "flops", "flops_speedup", "wall_seconds", "wall_speedup", "psnr", "ssim", "fd", "accuracy",
          "beats_equal_flops_baseline", "equal_flops_baseline", "resolved", "fingerprint")


def _marked(records: list[dict]) -> list[dict]:
    """Rows for the tables: the label with its kind, `*` where a stack beats its equal-FLOPs baseline."""
    return [dict(r, label=f"{r['method']}" + (" (baseline)" if r["kind"] == "equal-flops-baseline" else "")
                 + (" *" if r.get("beats_equal_flops_baseline") else "")) for r in records]


def versus_baseline(records: list[dict]) -> str:
    """Markdown: every stack beside the best fewer-steps baseline of equal or lower FLOPs."""
    lines = ["| stack | FLOPs x | PSNR dB | FD | equal-FLOPs baseline | its FLOPs x | its PSNR dB | margin dB |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in records:
        base = r.get("equal_flops_baseline")
        if r["kind"] != "stack" or not base:
            continue
        lines.append(f"| {r['method']} | {r['flops_speedup']:.2f} | {r['psnr']:.2f} | {r['fd']:.3f} | "
                     f"{base['label']} | {base['flops_speedup']:.2f} | {base['psnr']:.2f} | "
                     f"{r['psnr'] - base['psnr']:+.2f} |")
    return "\n".join(lines)


def write(records: list[dict], out_dir: Path, json_path: Path | None, mode: str, seconds: float) -> dict:
    """Prints the tables; writes distill.json (and json_path), distill.md and distill.png. Returns the JSON."""
    rows = _marked(records)
    print()
    print(format_table(rows))
    print("\nEach stack against the best fewer-steps baseline (DPM-Solver++(2M) / UniPC) of equal or lower FLOPs:")
    print(versus_baseline(records))
    payload = {"mode": mode, "seconds": seconds, "records": [{k: r.get(k) for k in FIELDS} for r in records]}
    for path in [out_dir / "distill.json"] + ([Path(json_path)] if json_path else []):
        io.write_json(path, payload, indent=1, default=str)
    title = f"accel bench distill ({mode}): flux-digits, against 50-step Euler with CFG 4"
    plot_pareto(out_dir / "distill.png", records, title=title)
    io.write_text(
        out_dir / "distill.md",
        f"# {title}\n\nNFE: model evaluations per guidance branch; `*`: beats the best fewer-steps baseline "
        f"of equal or lower FLOPs.\n\n{markdown_table(rows)}\n\n## Against the equal-FLOPs baseline\n\n"
        f"{versus_baseline(records)}\n\n![pareto](distill.png)\n")
    print(f"\nwrote {out_dir}/distill.json, distill.md, distill.png" + (f" and {json_path}" if json_path else ""))
    print(f"time taken: {seconds / 60:.1f} min")
    return payload
