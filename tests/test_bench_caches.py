"""`accel bench caches` machinery on a tiny random-weight FLUX model: records, resuming, outputs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from accel.bench import caches
from accel.bench._cache_harness import Settings
from accel.bench._cache_origins import Variant, cache_dit_available
from accel.bench._cache_report import check_targets, frontier, speedup_at
from accel.embedded import build_flux_digits

FIELDS = ("method", "params", "origin", "flops_speedup", "wall_speedup", "psnr", "ssim", "fd", "accuracy")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    model = build_flux_digits(seed=3, num_layers=1, num_single_layers=2, attention_head_dim=16,
                              num_attention_heads=2, axes_dims_rope=(4, 6, 6))
    model.save_pretrained(folder)
    return folder


def _settings(folder) -> Settings:
    return Settings(model_dir=str(folder), classes=(1, 7), samples_per_class=1, timing_batch=2,
                    timing_repeats=1, real_samples=64, calibration_samples=2, reference_steps=12)


def _variants() -> list[Variant]:
    out = [Variant("accel", "fbcache", {"threshold": 0.2}),
           Variant("accel", "taylorseer", {"steps": "calibrated 3", "warmup": 0.0}, calibrate="steps"),
           Variant("accel", "taylorseer", {"steps": "calibrated 3", "warmup": 0.0, "gains": "calibrated"},
                   calibrate="steps")]
    if cache_dit_available():
        out.append(Variant("cache-dit", "DBCache F1B0", {"Fn": 1, "Bn": 0, "threshold": 0.2, "taylorseer": False}))
    else:
        out.append(Variant("diffusers", "FirstBlockCache", {"threshold": 0.2}))
    return out


def test_bench_caches_records_and_resume(tiny_model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    records = caches.run(True, tmp_path / "out.json", tmp_path / "bench", settings=_settings(tiny_model_dir),
                         variant_list=_variants())
    assert len(records) == 5
    calibrated, with_gains = [r for r in records if r["params"].get("steps") == "calibrated 3"]
    assert 3.0 < calibrated["flops_speedup"] < 4.0  # 3 of 12 steps computed per branch, plus embedders
    # the gains variant reuses the plain variant's placement and adds one gain per later segment
    assert with_gains["calibrated_steps"] == calibrated["calibrated_steps"]
    assert len(with_gains["calibrated_gains"]) == 2 and "calibrated_gains" not in calibrated
    assert with_gains["flops_speedup"] == pytest.approx(calibrated["flops_speedup"])
    for record in records:
        assert set(FIELDS) <= set(record)
        assert record["origin"] in ("accel", "cache-dit", "diffusers")
    reference = records[0]
    assert reference["method"] == "reference" and reference["flops_speedup"] == 1
    assert reference["psnr"] == 100.0
    assert all(r["restored"] or r["origin"] != "accel" for r in records)
    assert json.loads((tmp_path / "out.json").read_text())[0]["method"] == "reference"
    for name in ("caches.json", "caches.md", "caches.png", "caches-quick.jsonl"):
        assert (tmp_path / "bench" / name).is_file()
    out = capsys.readouterr().out
    assert "targets:" in out and "time taken" in out
    # A rerun finds every configuration finished and measures nothing again.
    again = caches.run(True, None, tmp_path / "bench", settings=_settings(tiny_model_dir),
                       variant_list=_variants())
    assert [r["key"] for r in again] == [r["key"] for r in records]
    assert [r["seconds"] for r in again] == [r["seconds"] for r in records]


def test_saved_searches_are_reused_only_with_the_same_provenance(tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"  # a copy, to ship a search in below
    shutil.copytree(tiny_model_dir, model_dir)
    variant = Variant("accel", "taylorseer", {"steps": "calibrated 3", "warmup": 0.0}, calibrate="steps")
    name = "taylorseer-steps=calibrated_3,warmup=0.0.json"
    caches.run(True, None, tmp_path / "a", settings=_settings(model_dir), variant_list=[variant])
    saved = tmp_path / "a" / "calibrations" / "model" / "cache-schedules" / name
    assert saved.is_file() and "saved the search" in capsys.readouterr().out
    assert not (model_dir / "cache-schedules").exists()  # nothing is written beside the weights
    first = json.loads(saved.read_text())
    (model_dir / "cache-schedules").mkdir()  # ship it: a new output folder reads the shipped copy
    shutil.copy(saved, model_dir / "cache-schedules" / name)
    caches.run(True, None, tmp_path / "b", settings=_settings(model_dir), variant_list=[variant])
    assert "saved the search" not in capsys.readouterr().out  # loaded, not searched
    assert not (tmp_path / "b" / "calibrations").exists()
    other_seed = dataclasses.replace(_settings(model_dir), calibration_seed=5)
    caches.run(True, None, tmp_path / "c", settings=other_seed, variant_list=[variant])
    assert "saved the search" in capsys.readouterr().out
    mine = tmp_path / "c" / "calibrations" / "model" / "cache-schedules" / name
    assert json.loads(mine.read_text())["provenance"]["calibration_seed"] == 5
    assert json.loads((model_dir / "cache-schedules" / name).read_text()) == first  # the shipped copy untouched
    assert first["provenance"]["calibration_seed"] == 90_210


def test_anchor_skipped_without_cache_dit(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(caches, "cache_dit_available", lambda: False)
    anchor = Variant("cache-dit", "DBCache F1B0", {"Fn": 1, "Bn": 0, "threshold": 0.2, "taylorseer": False})
    records = caches.run(True, None, tmp_path, settings=_settings(tiny_model_dir), variant_list=[anchor])
    assert [r["method"] for r in records] == ["reference"]


def test_frontier_and_targets():
    def rec(origin, method, speed, psnr, fd=10.0, wall=None):
        return {"origin": origin, "method": method, "params": {}, "flops_speedup": speed, "psnr": psnr,
                "wall_speedup": speed if wall is None else wall, "fd": fd}
    records = [rec("accel", "reference", 1.0, 100.0), rec("accel", "taylorseer", 5.0, 36.0),
               rec("accel", "fora", 2.0, 30.0), rec("accel", "foca", 6.0, 31.0),
               rec("diffusers", "MagCache", 2.0, 41.0), rec("cache-dit", "DBCache F1B0", 3.0, 30.0)]
    ours = [r for r in records if r["method"] in ("taylorseer", "fora", "foca")]
    assert [r["method"] for r in frontier(ours)] == ["foca", "taylorseer"]
    assert speedup_at(ours, 33) == 5.0 and speedup_at(ours, 50) == 1.0
    dominance, speed, wall = check_targets(records)
    assert dominance["met"] is False  # at 41 dB the anchor reaches 2x, ours only the reference
    assert speed["met"] and wall["met"]
