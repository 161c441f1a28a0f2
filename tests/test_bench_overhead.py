"""`accel bench overhead`: its records and files (not its timings, which tests never assert)."""

import json

import pytest

from accel.bench import SUITES
from accel.bench import overhead
from accel.bench._overhead_pipelines import PipelineSpec


def test_records_have_one_row_per_mode_and_variant_with_counted_flops(tmp_path):
    settings = overhead.Settings(PipelineSpec(height=64, width=64), steps=6, repeats=1,
                                 variants=("bare", "none", "fora-1", "reuse-3"), backend="eager")
    records = overhead.run_settings(settings, tmp_path / "records.json", tmp_path)
    assert [(r["mode"], r["variant"]) for r in records] == [(m, v) for m in overhead.MODES for v in settings.variants]
    by = {(r["mode"], r["variant"]): r for r in records}
    for mode in overhead.MODES:
        bare = by[(mode, "bare")]
        assert bare["overhead_ms_per_step"] == 0 and bare["flop_ratio"] == 1 and bare["wall_ratio"] == 1
        assert by[(mode, "none")]["flops"] == bare["flops"] == by[(mode, "fora-1")]["flops"]  # nothing skipped
        # reuse-3 computes steps 0 and 3 of 6 in full: the blocks of 4 steps are skipped
        assert 1.2 < by[(mode, "reuse-3")]["flop_ratio"] < 3
        for record in (by[(mode, v)] for v in settings.variants):
            assert record["step_ms"] > 0 and record["steps"] == 6 and record["repeats"] == 1
            assert record["efficiency"] == pytest.approx(record["wall_ratio"] / record["flop_ratio"])
    assert all(by[("compiled", v)]["steady_graphs"] == 0 for v in settings.variants)
    assert all(by[("eager", v)]["graphs"] is None for v in settings.variants)
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved == json.loads((tmp_path / "records.json").read_text()) and saved["records"] == records
    assert "| compiled | reuse-3 |" in (tmp_path / "overhead.md").read_text()


def test_overhead_is_a_bench_suite_and_its_command_checks_its_flags(tmp_path, capsys):
    assert "overhead" in SUITES
    assert overhead.main(["--height", "20", "--out", str(tmp_path)]) == 2
    assert "height=20 must be a multiple of 16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="variants"):
        overhead.Settings(variants=("none",))
