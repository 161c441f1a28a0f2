"""Prints a markdown table: every diffusers pipeline family x every cache scope, caches or why not.

For each family of tests/tiny_pipelines.py and each scope's preset, the tiny pipeline is loaded as
a user would, the preset applied with `accel.apply` (12 Euler steps, the family's guidance) and
the pipeline run once. A cell says "caches" when the run cached at least one step with a finite
output, or gives the one-line refusal (or failure) otherwise. Parameters are chosen so that each
preset must cache on random weights (interval 2, thresholds at their top, TeaCache's rescaling
polynomial the identity instead of a calibration).

    python scripts/family_table.py [family ...]      # run from the repository root
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import accel  # noqa: E402
from accel.pipeline import applied  # noqa: E402
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack  # noqa: E402
from tiny_pipelines import FAMILIES, denoiser, load, run  # noqa: E402

STEPS = 12
# (column, preset, parameters that make the preset cache on random weights)
SCOPES = [
    ("residual (taylorseer)", "taylorseer", {"interval": 2}),
    ("blocks (dbcache)", "dbcache", {"threshold": 1.0}),
    ("blocks (fbcache)", "fbcache", {"threshold": 1.0}),
    ("attention (fora)", "fora", {"interval": 2}),
    ("tokens (toca)", "toca", {"interval": 2}),
    ("single blocks (deltadit)", "deltadit", {"interval": 2}),
    ("teacache", "teacache", {"threshold": 2.0, "coefficients": [1.0, 0.0]}),
    ("deepcache", "deepcache", {"interval": 2}),
]


def cell(name: str, preset: str, params: dict, folder: str) -> str:
    """Returns "caches", or the one-line reason the preset does not cache family `name`."""
    pipe, kwargs = load(name, folder)
    text = _cell(pipe, kwargs, name, preset, params)
    return text.replace(type(denoiser(pipe)).__name__, "<denoiser>")  # one note for one refusal


def _cell(pipe, kwargs: dict, name: str, preset: str, params: dict) -> str:
    stack = Stack(SamplerPlan("euler", STEPS), CachePlan(preset, params),
                  guidance=GuidancePlan(FAMILIES[name].guidance_scale))
    try:
        accel.apply(pipe, stack)
    except ValueError as error:
        return "refused: " + str(error).splitlines()[0]
    try:
        output = run(pipe, kwargs, STEPS)
        cached = applied(pipe).cache.stats.last_run().steps_cached()
    except Exception as error:  # a failure is a table entry, not the end of the table
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0]}"
    finally:
        accel.remove(pipe)
    if not torch.isfinite(output).all():
        return "fails: non-finite output"
    return "caches" if cached else "runs, caches no step"


def table(names: list[str]) -> str:
    """The markdown table of `names` x SCOPES; each distinct refusal is a numbered note below it."""
    lines = ["| family | " + " | ".join(column for column, _, _ in SCOPES) + " |",
             "|---" * (len(SCOPES) + 1) + "|"]
    notes: dict[str, int] = {}
    for name in names:
        cells = []
        for _, preset, params in SCOPES:
            with tempfile.TemporaryDirectory() as folder:
                text = cell(name, preset, params, folder)
            if text != "caches":
                number = notes.setdefault(text, len(notes) + 1)
                text = f"{text.split(':')[0]} [{number}]"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(f"{name} done", file=sys.stderr, flush=True)
    lines.append("")
    lines += [f"[{number}] {text}" for text, number in notes.items()]
    return "\n".join(lines)


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    print(table(names))


if __name__ == "__main__":
    main()
