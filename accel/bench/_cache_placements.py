"""Searched compute placements and forecast gains of `accel bench caches`, kept beside the weights.

A variant with `steps="calibrated K"` needs its K computed steps placed by
`caching.search_compute_steps` (about 6 minutes on one CPU core for the embedded model), and one
with `gains="calibrated"` then its forecast gains by `caching.search_forecast_gains` (about 4 more).
Both searches are deterministic given the weights and the calibration settings, so their results
are saved as small JSON files in `<model_dir>/cache-schedules/` together with the settings that
made them (the provenance). A run whose provenance matches loads them instead of searching; any
difference (other weights, seeds, guidance, step count) searches again and overwrites the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from accel import io
from accel.bench._cache_origins import Variant


@dataclass(frozen=True)
class PlacementStore:
    """The folder of saved searches and the provenance a saved search must match to be reused.

    Attributes:
        directory: where the JSON files live (created on the first save).
        provenance: the weights' hash and the calibration settings of this run.
    """

    directory: Path
    provenance: dict

    def path(self, variant: Variant) -> Path:
        """The file of a variant: its method and parameters, e.g.
        `taylorseer-gains=calibrated,order=2,steps=calibrated_8,warmup=0.0.json`."""
        items = ",".join(f"{key}={variant.params[key]}" for key in sorted(variant.params))
        return self.directory / (variant.method + "-" + re.sub(r"[^A-Za-z0-9.,=_-]+", "_", items) + ".json")

    def load(self, variant: Variant) -> dict | None:
        """The saved calibration ({"steps": fractions, "gains": ...}) if its provenance matches, else None."""
        path = self.path(variant)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(stored, dict) or stored.get("provenance") != self.provenance:
            return None
        calibration = stored.get("calibration")
        return calibration if isinstance(calibration, dict) and "steps" in calibration else None

    def save(self, variant: Variant, calibration: dict, search: dict) -> Path:
        """Writes the calibration with the provenance and the search's own numbers (objectives, trials)."""
        path = self.path(variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"method": variant.method, "params": variant.params, "calibration": calibration,
                   "search": search, "provenance": self.provenance}
        io.write_text(path, json.dumps(payload, indent=1) + "\n")
        return path
