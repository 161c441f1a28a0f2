"""`accel bench samplers` machinery on tiny random-weight models: records, skips, outputs, resume."""

import dataclasses
import json

import pytest
import torch

from accel.bench import samplers as bench
from accel.bench._samplers_diffusers import flow_configs, epsilon_configs, sample_diffusers
from accel.bench._samplers_models import Reference, epsilon_subject, flow_subject
from accel.bench._samplers_optimized import Calibration
from accel.bench._samplers_report import FIELDS, check_targets
from accel.embedded import build_flux_digits
from accel.embedded.unet import build_unet_digits

TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
TINY_UNET = dict(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    subject = flow_subject(build_flux_digits(seed=0, **TINY_FLUX).eval(), tmp_path_factory.mktemp("flux"))
    subject.reference = Reference("euler", 6, "flow")
    return subject


@pytest.fixture(scope="module")
def epsilon(tmp_path_factory):
    model = build_unet_digits(seed=0, **TINY_UNET).eval()
    subject = epsilon_subject(model, tmp_path_factory.mktemp("unet"))
    subject.reference = Reference("euler", 6, "karras")
    return subject, dict(model.betas)


def _settings(**overrides):
    base = dict(samples=4, batch_size=4, nfes=(4,), real_samples=32,
                ours={"flux-digits": ("euler/flow", "heun/flow", "euler/optimized")},
                diffusers=("FlowMatchEulerDiscrete/shift1",),
                calibration=Calibration(samples=2, sweeps=1, iterations=1))
    return bench.Settings(**{**base, **overrides})


def test_records_skips_outputs_and_resume(flow, tmp_path, capsys):
    subjects = [(flow, flow_configs(), None)]
    records = bench.run(True, tmp_path / "out.json", tmp_path / "run", settings=_settings(), subjects=subjects)
    assert {(r["origin"], r["solver"], r["schedule"]) for r in records} == {
        ("accel", "euler", "flow"), ("accel", "euler", "optimized"),
        ("diffusers", "FlowMatchEulerDiscrete", "shift1")}
    for record in records:
        assert set(FIELDS) <= set(record)
        assert record["model"] == "flux-digits" and record["nfe"] == 4
        assert all(isinstance(record[key], float) for key in ("psnr", "ssim", "fd", "accuracy"))
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary == json.loads((tmp_path / "run" / "samplers.json").read_text())
    assert len(summary["records"]) == 3
    assert any("heun/flow NFE 4" in line and "nfe=3 or 5" in line for line in summary["skipped"])
    assert (tmp_path / "run" / "samplers.png").stat().st_size > 0
    # the searched walk is saved under the run's output folder, never beside the (shipped) weights
    assert (tmp_path / "run" / "calibrations" / "flux-digits" / "schedules" / "euler-nfe4.json").is_file()
    assert not flow.schedule_dir.exists()
    out = capsys.readouterr().out
    assert "Best per NFE" in out and "Time taken" in out

    calls = []
    flow.denoiser.model_fn, original = (lambda *a, **k: calls.append(1)), flow.denoiser.model_fn
    try:
        again = bench.run(True, None, tmp_path / "run", settings=_settings(), subjects=subjects)
    finally:
        flow.denoiser.model_fn = original
    assert calls == [] and again == records


def test_diffusers_loop_spends_exactly_the_nfe_on_the_unet(epsilon):
    subject, betas = epsilon
    config = next(c for c in epsilon_configs() if c.solver == "DDIM" and c.schedule == "leading")
    calls = []
    noise, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 5])
    images = sample_diffusers(config, subject, betas, 6, noise, labels, 2, count=lambda: calls.append(1))
    assert images.shape == noise.shape and torch.isfinite(images).all() and len(calls) == 6


def test_target_check_needs_margin_and_lower_fd():
    def rec(origin, psnr, fd, nfe=6):
        return dict(model="m", solver="s", schedule="k", nfe=nfe, origin=origin, psnr=psnr, ssim=1.0, fd=fd,
                    accuracy=1.0)
    met, = check_targets([rec("accel", 30.0, 1.0), rec("diffusers", 28.4, 2.0), rec("diffusers", 20.0, 0.5)])
    assert met["met"] and met["margin_db"] == pytest.approx(1.6)
    missed, = check_targets([rec("accel", 30.0, 3.0), rec("diffusers", 28.0, 2.0)])
    assert not missed["met"]


def test_calibrator_searches_from_every_start_and_keeps_the_best(flow, tmp_path):
    from accel.bench._samplers_optimized import Calibrator
    from samplers.schedules import OptimizedSchedule

    flow.weights_dir = tmp_path / "weights"
    calibrator = Calibrator(flow, Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6),
                            tmp_path / "out", log=lambda message: None)
    found = calibrator.get("euler", 4)
    assert found == tmp_path / "out" / "euler-nfe4.json" and not flow.weights_dir.exists()
    saved = OptimizedSchedule.load(found)
    starts = saved.reference["starts"]
    assert set(starts) == set(flow.schedules)
    assert saved.initial_schedule == min(starts, key=starts.get)
    assert saved.reference["objective_value"] == pytest.approx(min(starts.values()), abs=1e-6)
    assert calibrator.existing("euler", 4) is not None


def test_calibrator_reads_its_output_folder_first_then_the_shipped_walk(flow, tmp_path):
    import shutil

    from accel.bench._samplers_optimized import Calibrator

    calibration = Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6)
    flow.weights_dir = tmp_path / "weights"
    made = Calibrator(flow, calibration, tmp_path / "first", log=lambda message: None).get("euler", 4)
    flow.schedule_dir.mkdir(parents=True)
    shipped = shutil.copy(made, flow.schedule_dir / made.name)
    calibrator = Calibrator(flow, calibration, tmp_path / "second", log=lambda message: None)
    searched = []
    calibrator.search = lambda *args: searched.append(args)  # a search would be a failure here
    assert calibrator.get("euler", 4) == shipped and searched == []
    (tmp_path / "second").mkdir()
    own = shutil.copy(made, tmp_path / "second" / made.name)
    assert calibrator.get("euler", 4) == own
    other = Calibrator(flow, dataclasses.replace(calibration, seed=8), tmp_path / "second", log=lambda message: None)
    assert other.existing("euler", 4) is None  # another provenance: neither copy fits
    assert sorted(p.name for p in flow.schedule_dir.iterdir()) == ["euler-nfe4.json"]
