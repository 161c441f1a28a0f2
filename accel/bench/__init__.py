"""`accel bench <suite>`: benchmarks that print tables and write JSON records.

Each suite is a module `accel.bench.<suite>` with `run(quick: bool, json_path: Path | None,
out_dir: Path) -> list[dict]`; speed and quality targets live here, not in timed tests.
"""

from __future__ import annotations

import importlib
from pathlib import Path

SUITES = ("samplers", "caches", "distill", "overhead")


def run_suite(name: str, quick: bool, json_path: Path | None, out_dir: Path) -> list[dict]:
    """Runs one suite by name."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(SUITES)}")
    module = importlib.import_module(f"accel.bench.{name}")
    return module.run(quick=quick, json_path=json_path, out_dir=out_dir)
