"""Searched compute placements and forecast gains of `accel bench caches`, saved with their provenance.

A variant with `steps="calibrated K"` needs its K computed steps placed by
`caching.search_compute_steps` (about 6 minutes on one CPU core for the embedded model), and one
with `gains="calibrated"` then its forecast gains by `caching.search_forecast_gains` (about 4 more).
Both searches are deterministic given the weights and the calibration settings, so their results
are saved as small JSON files together with the settings that made them (the provenance): new
searches under the bench's output folder (`<out>/calibrations/<model>/cache-schedules/`), while the
ones shipped beside the weights (`<model_dir>/cache-schedules/`) are only read. A run looks at the
output folder's file first, then the shipped one, and loads the first whose provenance matches;
any difference (other weights, seeds, guidance, step count) searches again and saves under the
output folder. Nothing is written inside the installed package.
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
    """The folders of saved searches and the provenance a saved search must match to be reused.

    Attributes:
        directory: where new searches are written (created on the first save).
        provenance: the weights' hash and the calibration settings of this run.
        shipped: a read-only folder of searches shipped with the weights, looked at after `directory`.
    """

    directory: Path
    provenance: dict
    shipped: Path | None = None

    def file_name(self, variant: Variant) -> str:
        """The file name of a variant: its method and parameters, e.g.
        `taylorseer-gains=calibrated,order=2,steps=calibrated_8,warmup=0.0.json`."""
        items = ",".join(f"{key}={variant.params[key]}" for key in sorted(variant.params))
        return variant.method + "-" + re.sub(r"[^A-Za-z0-9.,=_-]+", "_", items) + ".json"

    def path(self, variant: Variant) -> Path:
        """Where a new search of the variant is saved."""
        return self.directory / self.file_name(variant)

    def load(self, variant: Variant) -> dict | None:
        """The first saved calibration ({"steps": fractions, "gains": ...}) whose provenance matches,
        from the output folder, then the shipped one; else None."""
        folders = [self.directory] + ([self.shipped] if self.shipped is not None else [])
        for folder in folders:
            calibration = self._read(folder / self.file_name(variant))
            if calibration is not None:
                return calibration
        return None

    def _read(self, path: Path) -> dict | None:
        """The calibration saved at `path` if it exists and its provenance matches, else None."""
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
