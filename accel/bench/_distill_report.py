"""Tables, target checks, JSON, Markdown and the plot of `accel bench distill`."""

from __future__ import annotations

from pathlib import Path

from accel import io

COLUMNS = ("method", "nfe", "model_calls", "cache", "adapter", "flops_speedup", "wall_speedup", "psnr", "ssim",
           "fd", "accuracy")
FIELDS = ("method", "nfe", "model_calls", "flops_speedup", "wall_speedup", "psnr", "ssim", "fd", "accuracy",
          "cache", "adapter", "solver", "steps", "flops", "wall_seconds")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def rows(records: list[dict]) -> list[list[str]]:
    return [[_cell(r.get(c)) for c in COLUMNS] for r in records]


def format_table(records: list[dict]) -> str:
    table = [list(COLUMNS)] + rows(records)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def markdown(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows(records)])


def _best(records, **match):
    chosen = [r for r in records if all(r.get(k) == v for k, v in match.items()) and r.get("psnr") is not None]
    return max(chosen, key=lambda r: r["psnr"], default=None)


def check_targets(records: list[dict]) -> list[dict]:
    """The four targets of the distillation issue, each {target, met, detail}."""
    reference = records[0]
    ref_fd = reference.get("fd")
    out = []
    plain4 = _best([r for r in records[1:]], nfe=4, adapter=None, cache=None)
    step4 = _best(records, nfe=4, adapter="step")
    if plain4 and step4:
        gain = step4["psnr"] - plain4["psnr"]
        fd_ok = ref_fd is None or step4["fd"] <= 1.2 * ref_fd
        out.append({"target": "step LoRA at 4 NFE: >= +3 dB over the best plain solver at 4 NFE, FD within 20%",
                    "met": gain >= 3 and fd_ok,
                    "detail": f"{step4['psnr']:.2f} dB vs {plain4['method']} {plain4['psnr']:.2f} (+{gain:.2f}); "
                              f"FD {step4['fd']:.3f} vs reference {ref_fd:.3f}"})
    aware = _best(records, adapter="cache-aware")
    if aware:
        plain = _best(records, cache=aware["cache"], adapter=None, steps=aware.get("steps"))
        if plain:
            gain = aware["psnr"] - plain["psnr"]
            out.append({"target": "cache-aware LoRA: >= +2 dB over the same cache and steps without it",
                        "met": gain >= 2, "detail": f"{aware['psnr']:.2f} dB vs {plain['psnr']:.2f} (+{gain:.2f})"})
    routers = [r for r in records if r.get("adapter") == "router" and r.get("psnr") is not None]
    if routers:
        good = [r for r in routers if r["psnr"] >= 32]
        best = max(good, key=lambda r: r["flops_speedup"], default=max(routers, key=lambda r: r["psnr"]))
        out.append({"target": "router: >= 1.5x FLOP speedup at PSNR >= 32 dB",
                    "met": bool(good) and best["flops_speedup"] >= 1.5,
                    "detail": f"{best['method']}: {best['flops_speedup']:.2f}x at {best['psnr']:.2f} dB"})
    stacks = [r for r in records if r.get("cache") and r.get("adapter") in ("step", "cache-aware")]
    if stacks:
        fd_ok = [r for r in stacks if ref_fd is None or r["fd"] <= 1.15 * ref_fd]
        best = max(fd_ok or stacks, key=lambda r: (round(r["flops_speedup"], 6), r["psnr"]))  # ties: better PSNR
        out.append({"target": "best full stack (solver + cache + adapter): >= 15x fewer FLOPs, FD within 15%",
                    "met": bool(fd_ok) and best["flops_speedup"] >= 15,
                    "detail": f"{best['method']}: {best['flops_speedup']:.1f}x, FD {best['fd']:.3f} vs "
                              f"reference {ref_fd:.3f}"})
    return out


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {None: "tab:gray", "step": "tab:green", "cache-aware": "tab:purple", "router": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in records[1:]:
        if record.get("psnr") is None:
            continue
        ax.scatter(record["flops_speedup"], record["psnr"], color=colours.get(record.get("adapter"), "tab:blue"),
                   marker="s" if record.get("cache") else "o")
        ax.annotate(record["method"], (record["flops_speedup"], record["psnr"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs speedup vs 50-step Euler with CFG (log)")
    ax.set_ylabel("PSNR vs the reference (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    io.save_figure(fig, path, dpi=120)
    plt.close(fig)


def write(records: list[dict], out_dir: Path, json_path: Path | None, mode: str, seconds: float) -> None:
    """Prints the table and targets; writes distill.json, distill.md, distill.png (and json_path)."""
    print()
    print(format_table(records))
    targets = check_targets(records)
    print("\ntargets:")
    for target in targets:
        print(f"  [{'met' if target['met'] else 'MISSED'}] {target['target']}: {target['detail']}")
    payload = {"mode": mode, "seconds": seconds, "targets": targets,
               "records": [{k: r.get(k) for k in FIELDS} for r in records]}
    for path in [out_dir / "distill.json"] + ([Path(json_path)] if json_path else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, payload, indent=1, default=str)
    title = f"accel bench distill ({mode})"
    plot(records, out_dir / "distill.png", title)
    io.write_text(
        out_dir / "distill.md",
        f"# {title}\n\n{markdown(records)}\n\n## Targets\n\n"
        + "\n".join(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['detail']}" for t in targets) + "\n")
    print(f"\nwrote {out_dir}/distill.json, distill.md, distill.png" + (f" and {json_path}" if json_path else ""))
    print(f"time taken: {seconds / 60:.1f} min")
