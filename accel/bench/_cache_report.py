"""Pareto frontiers, the printed table, the plot and the target checks of `accel bench caches`.

Groups: "accel" (our cache presets), "euler-steps" (the plain fewer-steps baseline, also ours),
"cache-dit" and "diffusers" (the anchors). A record is on its group's frontier when no record of
the group has at least its FLOPs speedup and a higher PSNR. "Speedup reached at PSNR level L" is
the largest FLOPs speedup among a group's records with PSNR >= L (the reference, 1x, always
counts), a conservative step function with no interpolation.
"""

from __future__ import annotations

import json
from pathlib import Path

from accel import io

ORIGIN_COLOURS = {"accel": "tab:blue", "euler-steps": "black", "cache-dit": "tab:orange",
                  "diffusers": "tab:green"}
ANCHORS = ("cache-dit", "diffusers")
LEVELS = tuple(range(25, 41))


def group_of(record: dict) -> str:
    """The frontier group of a record (the reference belongs to none)."""
    if record["method"] == "reference":
        return "reference"
    return "euler-steps" if record["method"] == "euler-steps" else record["origin"]


def frontier(records: list[dict]) -> list[dict]:
    """The Pareto frontier (higher FLOPs speedup, higher PSNR), by decreasing speedup."""
    best, kept = float("-inf"), []
    for record in sorted(records, key=lambda r: (-r["flops_speedup"], -r["psnr"])):
        if record["psnr"] > best:
            kept.append(record)
            best = record["psnr"]
    return kept


def speedup_at(records: list[dict], level: float) -> float:
    """The largest FLOPs speedup with PSNR >= level (1.0: only the reference reaches it)."""
    return max([r["flops_speedup"] for r in records if r["psnr"] >= level], default=1.0)


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(group_of(record), []).append(record)
    return groups


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def table_rows(records: list[dict], frontier_only: bool = False) -> list[list[str]]:
    """Rows (group, method, params, FLOPs x, wall x, PSNR, SSIM, FD, acc, frontier mark)."""
    rows = []
    for name, members in _groups(records).items():
        on_front = {id(r) for r in frontier(members)}
        for r in sorted(members, key=lambda r: r["flops_speedup"]):
            if frontier_only and id(r) not in on_front and name != "reference":
                continue
            rows.append([name, r["method"], _params(r["params"]), f"{r['flops_speedup']:.2f}",
                         f"{r['wall_speedup']:.2f}", f"{r['psnr']:.2f}", f"{r.get('ssim', float('nan')):.4f}",
                         f"{r.get('fd', float('nan')):.2f}", f"{r.get('accuracy', float('nan')):.3f}",
                         "*" if id(r) in on_front else ""])
    return rows


HEADER = ["group", "method", "params", "FLOPs x", "wall x", "PSNR", "SSIM", "FD", "acc", "front"]


def format_table(rows: list[list[str]]) -> str:
    """A fixed-width text table."""
    widths = [max(len(str(x)) for x in column) for column in zip(HEADER, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def level_table(records: list[dict]) -> list[dict]:
    """Per PSNR level: speedup reached by ours, the best anchor, fewer-steps Euler."""
    groups = _groups(records)
    anchors = [r for name in ANCHORS for r in groups.get(name, [])]
    rows = []
    for level in LEVELS:
        ours, anchor = speedup_at(groups.get("accel", []), level), speedup_at(anchors, level)
        rows.append({"psnr": level, "accel": ours, "anchor": anchor,
                     "euler_steps": speedup_at(groups.get("euler-steps", []), level),
                     "flops_ratio": anchor / ours})
    return rows


def check_targets(records: list[dict]) -> list[dict]:
    """The three targets of the cache benchmark, each with `met` and a one-line `detail`."""
    levels = level_table(records)
    worst = max(levels, key=lambda row: row["flops_ratio"])
    has_anchor = any(group_of(r) in ANCHORS for r in records)
    dominance = {"target": "FLOPs <= 0.8x the best anchor's at every PSNR level 25-40 dB",
                 "met": has_anchor and worst["flops_ratio"] <= 0.8,
                 "detail": (f"worst at {worst['psnr']} dB: ours {worst['accel']:.2f}x vs anchor "
                            f"{worst['anchor']:.2f}x -> FLOPs ratio {worst['flops_ratio']:.2f}"
                            if has_anchor else "no anchor records (install the bench extra)")}
    reference = next(r for r in records if r["method"] == "reference")
    fd_limit = 1.1 * reference.get("fd", float("inf"))
    good = [r for r in records if group_of(r) == "accel" and r["psnr"] >= 30
            and r.get("fd", 0.0) <= fd_limit]
    best = max(good, key=lambda r: r["flops_speedup"], default=None)
    speed = {"target": ">= 4x FLOPs speedup at PSNR >= 30 dB with FD within 10% of the reference's",
             "met": best is not None and best["flops_speedup"] >= 4,
             "detail": _describe(best, reference)}
    wall_ok = [r for r in good if r["flops_speedup"] >= 4 and r["wall_speedup"] >= 0.85 * r["flops_speedup"]]
    fastest = [r for r in good if r["flops_speedup"] >= 4]
    shown = max(wall_ok or fastest or ([best] if best else []), key=lambda r: r["flops_speedup"], default=None)
    wall = {"target": "wall-clock speedup >= 0.85x the FLOPs speedup there",
            "met": bool(wall_ok),
            "detail": (f"{shown['method']} {_params(shown['params'])}: wall {shown['wall_speedup']:.2f}x = "
                       f"{shown['wall_speedup'] / shown['flops_speedup']:.2f} of FLOPs {shown['flops_speedup']:.2f}x"
                       if shown else "no record qualifies")}
    return [dominance, speed, wall]


def _describe(record: dict | None, reference: dict) -> str:
    if record is None:
        return "no preset reaches PSNR >= 30 dB with FD within 10% of the reference's"
    return (f"{record['method']} {_params(record['params'])}: {record['flops_speedup']:.2f}x at "
            f"{record['psnr']:.2f} dB, FD {record.get('fd', float('nan')):.2f} vs reference "
            f"{reference.get('fd', float('nan')):.2f}")


def format_levels(records: list[dict]) -> str:
    """The per-level comparison as text."""
    lines = ["PSNR >=  ours (accel)  best anchor  euler-steps  FLOPs ours/anchor"]
    for row in level_table(records):
        lines.append(f"{row['psnr']:>5} dB  {row['accel']:>10.2f}x  {row['anchor']:>10.2f}x  "
                     f"{row['euler_steps']:>10.2f}x  {row['flops_ratio']:>12.2f}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    """FLOPs speedup (log x) vs PSNR, one colour per group, frontier lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name, members in _groups(records).items():
        if name == "reference":
            continue
        colour = ORIGIN_COLOURS.get(name, "tab:gray")
        axis.scatter([r["flops_speedup"] for r in members], [min(r["psnr"], 60) for r in members],
                     s=18, alpha=0.45, color=colour)
        front = sorted(frontier(members), key=lambda r: r["flops_speedup"])
        axis.plot([r["flops_speedup"] for r in front], [min(r["psnr"], 60) for r in front], "-o",
                  color=colour, markersize=4, label=f"{name} frontier")
    axis.set_xscale("log")
    axis.set_xlabel("FLOPs speedup vs 50-step Euler (counted)")
    axis.set_ylabel("PSNR vs reference (dB, capped at 60)")
    axis.axhspan(25, 40, color="0.93", zorder=0)
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save_figure(figure, path, dpi=120)
    plt.close(figure)


def write_json(records: list[dict], paths: list[Path]) -> None:
    """Writes the records (a JSON list) to every path."""
    text = json.dumps(records, indent=1)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(path, text)
