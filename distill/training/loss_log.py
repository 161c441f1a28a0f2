"""The loss log (`loss.csv`: step,loss,lr,seconds) and its plot (`loss.png`)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

HEADER = ("step", "loss", "lr", "seconds")


class LossLog:
    """An append-only CSV of per-step losses that a resumed run continues without duplicates.

    Args:
        path: the CSV file.
        start: the first step this run will log; rows at or after it (written by a run that was
            killed after its last checkpoint) are dropped, so every step appears once.
    """

    def __init__(self, path: Path, start: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_loss_log(self.path) if row[0] < start] if start > 0 else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(_format(row) for row in kept)
        os.replace(tmp, self.path)

    def append(self, rows: list[tuple[int, float, float, float]]) -> None:
        """Appends (step, loss, lr, seconds) rows and flushes them to disk."""
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerows(_format(row) for row in rows)


def _format(row: tuple[int, float, float, float]) -> list[str]:
    step, loss, lr, seconds = row
    return [str(int(step)), f"{loss:.6g}", f"{lr:.6g}", f"{seconds:.2f}"]


def read_loss_log(path: Path) -> list[tuple[int, float, float, float]]:
    """The rows of a loss log (empty if the file does not exist or has no header)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        if tuple(next(reader, ())) != HEADER:
            return []
        rows = []
        for number, line in enumerate(reader, start=2):
            try:
                if len(line) != len(HEADER):
                    raise ValueError("not four fields")
                rows.append((int(line[0]), float(line[1]), float(line[2]), float(line[3])))
            except ValueError:
                if any(field.strip("\x00 ") for field in line):  # not just a blank or NUL-filled tail
                    print(f"skipping line {number} of {path}: not a whole loss row (cut short by an "
                          "interruption?)", file=sys.stderr)
        return rows


def plot_loss_log(csv_path: Path, png_path: Path, title: str = "training loss") -> Path:
    """Plots loss against step (log scale, with a moving average) with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_loss_log(csv_path)
    steps = [row[0] for row in rows]
    losses = [row[1] for row in rows]
    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(steps, losses, linewidth=0.6, alpha=0.5, label="loss")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        axes.plot(steps, smooth, linewidth=1.2, label=f"mean of {window}")
    if losses and min(losses) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(str(png_path))
    return Path(png_path)
