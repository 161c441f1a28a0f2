"""The one resumable record store: measured configurations keyed by the fingerprint of what made them.

A record is one measured configuration (a reference, a stack, a baseline) with its numbers; its
images sit beside it as safetensors. Every record carries `fingerprint` and `determined_by` (the
payload hashed: the resolved configuration, inputs, model weights hash, code versions). A job asks
for the fingerprint it needs: a record made with the same settings is reused, anything else is
measured again. Records made with other settings stay in the folder untouched and are named with
the keys that differ, so nothing is silently mixed.

    store = RecordStore(folder)
    record = store.get(fp)            # None: measure it, then store.add(record, images)

Layout: `records.rank<R>.jsonl` (one line per record, appended by process R, torn lines skipped)
and `images/<fingerprint>.safetensors` (written atomically).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from accel.io import append_jsonl, read_jsonl, save_safetensors
from accel.lab.fingerprint import differing_keys


class RecordStore:
    """Finished records of one folder, by fingerprint.

    Args:
        folder: where the journals and images live (created on the first write).
        rank: the writing process's index (each appends to its own journal).
    """

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self._records: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._records is None:
            self._records = {}
            for path in sorted(self.folder.glob("records.rank*.jsonl")):
                for record in read_jsonl(path):
                    if "fingerprint" in record:
                        self._records[record["fingerprint"]] = record
        return self._records

    def reload(self) -> None:
        """Forgets what was read (other processes may have appended)."""
        self._records = None

    def records(self) -> dict[str, dict]:
        """Every finished record, by fingerprint."""
        return dict(self._load())

    def get(self, fingerprint: str) -> dict | None:
        """The record of `fingerprint` whose images (if it has any) are present, or None."""
        record = self._load().get(fingerprint)
        if record is None:
            return None
        if record.get("has_images") and not self.image_path(fingerprint).is_file():
            return None
        return record

    def image_path(self, fingerprint: str) -> Path:
        return self.folder / "images" / f"{fingerprint}.safetensors"

    def images(self, fingerprint: str) -> torch.Tensor | None:
        """The images stored with a record, or None (a corrupt file is reported and treated as absent)."""
        from safetensors.torch import load_file

        path = self.image_path(fingerprint)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["images"]
        except Exception:  # noqa: BLE001 - a torn safetensors file raises several classes
            print(f"accel: {path} is unreadable (cut short?); it will be measured again", file=sys.stderr)
            return None

    def add(self, record: dict[str, Any], images: torch.Tensor | None = None) -> None:
        """Stores a record (it must carry `fingerprint`) and its images, images first."""
        fingerprint = record["fingerprint"]
        if images is not None:
            self.image_path(fingerprint).parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(self.image_path(fingerprint), {"images": images})
        record = {**record, "has_images": images is not None}
        append_jsonl(self.folder / f"records.rank{self.rank}.jsonl", record, default=str)
        self._load()[fingerprint] = record

    def superseded(self, label: str, fingerprint: str, determined_by: dict) -> list[str]:
        """Keys that differ from stored records of the same label made with other settings."""
        keys: set[str] = set()
        for record in self._load().values():
            if record.get("label") == label and record["fingerprint"] != fingerprint and "determined_by" in record:
                keys.update(differing_keys(record["determined_by"], determined_by))
        return sorted(keys)
