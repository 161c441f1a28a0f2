"""`accel bench samplers` on its worker pool gives the rows of the in-process run (tiny pipelines)."""

import dataclasses
import shutil

import pytest

from accel.bench import samplers as bench
from accel.bench._samplers_models import Reference
from accel.bench._samplers_optimized import Calibration
from accel.embedded import build_flux_digits
from accel.embedded.unet import build_unet_digits

TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
TINY_UNET = dict(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)


def test_pool_and_in_process_runs_agree(tmp_path):
    dirs = {"flux-digits": tmp_path / "flux", "unet-digits": tmp_path / "unet"}
    build_flux_digits(seed=0, **TINY_FLUX).eval().save_pretrained(dirs["flux-digits"])
    build_unet_digits(seed=0, **TINY_UNET).eval().save_pretrained(dirs["unet-digits"])
    settings = bench.Settings(
        samples=3, batch_size=3, nfes=(4,), real_samples=32, baselines=("dpmpp_2m",),
        ours={"flux-digits": ("euler/flow", "unipc_bh2/optimized"), "unet-digits": ("dpmpp_2m/karras",)},
        diffusers=("FlowMatchEulerDiscrete/shift1", "DDIM/trailing"),
        calibration=Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6), timing_batch=1, timing_repeats=1,
        references={"flux-digits": Reference("euler", 6, "flow"), "unet-digits": Reference("euler", 6, "karras")},
        model_dirs={name: str(folder) for name, folder in dirs.items()})
    pooled = bench.run(True, None, tmp_path / "pool", settings=settings)
    searched = tmp_path / "pool" / "calibrations" / "flux-digits" / "schedules" / "unipc_bh2-nfe4.json"
    assert searched.is_file() and not (dirs["flux-digits"] / "schedules").exists()  # weights folder untouched
    assert sorted(p.name for p in (tmp_path / "pool" / "flux-digits").glob("records.rank*.jsonl")) != \
        ["records.rank0.jsonl"]  # each worker appends to its own journal
    shipped = dirs["flux-digits"] / "schedules" / "unipc_bh2-nfe4.json"  # ship it beside the weights
    shipped.parent.mkdir()
    shutil.copy(searched, shipped)
    alone = bench.run(True, None, tmp_path / "alone", settings=dataclasses.replace(settings, workers=1))
    assert not (tmp_path / "alone" / "calibrations").exists()  # the shipped walk is reused, not remade

    def key(row):
        return row["model"], row["origin"], row["solver"], row["schedule"], row["nfe"]
    assert sorted(map(key, pooled)) == sorted(map(key, alone)) == sorted([
        ("flux-digits", "baseline", "dpmpp_2m", "auto", 4), ("unet-digits", "baseline", "dpmpp_2m", "auto", 4),
        ("flux-digits", "accel", "euler", "flow", 4), ("flux-digits", "accel", "unipc_bh2", "optimized", 4),
        ("flux-digits", "diffusers", "FlowMatchEulerDiscrete", "shift1", 4),
        ("unet-digits", "accel", "dpmpp_2m", "karras", 4), ("unet-digits", "diffusers", "DDIM", "trailing", 4)])
    by_key = {key(row): row for row in alone}
    for row in pooled:
        other = by_key[key(row)]
        # worker processes run one thread, this one maybe more: equal up to reduction order
        assert row["psnr"] == pytest.approx(other["psnr"], rel=1e-5), key(row)
        assert row["fd"] == pytest.approx(other["fd"], rel=1e-4, abs=1e-6), key(row)
        assert row["flops"] == other["flops"], key(row)
