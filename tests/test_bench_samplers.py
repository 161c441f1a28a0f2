"""`accel bench samplers` on tiny random-weight pipelines: rows, skips, outputs, resume, anchors, walks."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import samplers
from accel.bench import samplers as bench
from accel.bench._samplers_diffusers import anchor_configuration, epsilon_configs, flow_configs
from accel.bench._samplers_models import SETUPS, Reference, bench_model
from accel.bench._samplers_optimized import Calibration, Calibrator
from accel.embedded import build_flux_digits
from accel.embedded.unet import build_unet_digits
from accel.lab.records import RecordStore

TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
TINY_UNET = dict(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_flux_digits(seed=0, **TINY_FLUX).eval().save_pretrained(root / "flux")
    build_unet_digits(seed=0, **TINY_UNET).eval().save_pretrained(root / "unet")
    return {"flux-digits": str(root / "flux"), "unet-digits": str(root / "unet")}


# 6-step Euler references instead of 200-step Heun (the machinery is the same)
CHEAP_REFERENCES = {"flux-digits": Reference("euler", 6, "flow"), "unet-digits": Reference("euler", 6, "karras")}


def _settings(folders, **overrides):
    base = dict(samples=4, batch_size=4, nfes=(4,), real_samples=32, workers=1, models=("flux-digits",),
                references=CHEAP_REFERENCES,
                ours={"flux-digits": ("euler/flow", "heun/flow", "euler/optimized")},
                diffusers=("FlowMatchEulerDiscrete/shift1",), baselines=("unipc_bh2",),
                calibration=Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6),
                timing_batch=1, timing_repeats=1, model_dirs=folders)
    return bench.Settings(**{**base, **overrides})


def _key(row):
    return row["origin"], row["solver"], row["schedule"]


def test_rows_skips_outputs_native_equality_and_resume(folders, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    rows = bench.run(True, tmp_path / "out.json", out, settings=_settings(folders))
    assert {_key(r) for r in rows} == {("baseline", "unipc_bh2", "auto"), ("accel", "euler", "flow"),
                                       ("accel", "euler", "optimized"),
                                       ("diffusers", "FlowMatchEulerDiscrete", "shift1")}
    for row in rows:
        assert row["model"] == "flux-digits" and row["nfe"] == 4 and row["model_calls"] == 8
        assert all(isinstance(row[key], float) for key in ("psnr", "ssim", "fd", "accuracy"))
        assert row["flops_speedup"] == pytest.approx(6 / 4, rel=1e-12)  # counted: a 6-step reference, 4 evaluations
    assert {r["kind"] for r in rows} == {"equal-flops-baseline", "stack", "anchor"}
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary == json.loads((out / "samplers.json").read_text())
    assert any("heun/flow NFE 4" in line and "nfe=3 or 5" in line for line in summary["skipped"])
    compared, = summary["comparison"]
    assert compared["margin_over_baseline_db"] == pytest.approx(
        max(r["psnr"] for r in rows if r["origin"] == "accel") - compared["baseline"]["psnr"])
    assert (out / "samplers-flux-digits.png").stat().st_size > 1000
    assert "ours - baseline" in (out / "samplers.md").read_text()
    # the searched walk is saved under the run's output folder, never beside the (shipped) weights
    assert (out / "calibrations" / "flux-digits" / "schedules" / "euler-nfe4.json").is_file()
    assert not (Path(folders["flux-digits"]) / "schedules").exists()
    assert "Best per NFE" in capsys.readouterr().out

    # the pipeline path is the native sampler: Euler on uniform t, the same seeds, bitwise
    job, subject = bench.open_job("flux-digits", _settings(folders), out)
    euler = next(r for r in rows if _key(r) == ("accel", "euler", "flow"))
    images = RecordStore(out / "flux-digits").images(euler["fingerprint"])
    noise = torch.cat([torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    native = samplers.sample(subject.denoiser, noise, solver="euler", steps=4, schedule="flow",
                             cond={"labels": torch.arange(4)})
    torch.testing.assert_close(images, ((native + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)

    import accel.lab.job as lab_job

    monkeypatch.setattr(lab_job, "generate_counted", lambda *a, **k: pytest.fail("a stored record was measured again"))
    monkeypatch.setattr(lab_job, "time_generation", lambda *a, **k: 1.0)  # the cached reference is timed anew

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.save / torch.load must not be used")

    monkeypatch.setattr(torch, "save", no_pickle)  # records, images, walks and models: JSON and safetensors only
    monkeypatch.setattr(torch, "load", no_pickle)
    again = bench.run(True, None, out, settings=_settings(folders))
    assert again == rows


def test_anchors_run_in_the_pipeline_and_give_its_scheduler_back(folders, tmp_path):
    job, subject = bench.open_job("unet-digits", _settings(folders, models=("unet-digits",)), tmp_path)
    pipe, own = job.model.pipe, job.model.pipe.scheduler
    ddim = next(c for c in epsilon_configs() if (c.solver, c.schedule) == ("DDIM", "leading"))
    config = anchor_configuration(ddim, 6, subject.betas(), subject.guidance)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[1]), with_kwargs=True)
    try:
        with config.install(pipe):
            images = pipe(class_labels=[1, 2], num_inference_steps=config.steps, guidance_scale=3.0).images
    finally:
        handle.remove()
    assert len(calls) == 12 and pipe.scheduler is own and images.shape == (2, 1, 16, 16)
    native = ddim.build(subject.betas())
    native.set_timesteps(6)  # SD's leading spacing with steps_offset 1: the walk starts below t = 999
    assert [int(t[0]) for t in calls[::2]] == native.timesteps.tolist() and native.timesteps[0] < 999

    flux_job, flux = bench.open_job("flux-digits", _settings(folders), tmp_path / "flux")
    unipc = next(c for c in flow_configs() if (c.solver, c.schedule) == ("UniPCMultistep", "dynamic"))
    config = anchor_configuration(unipc, 4, None, 4.0)
    seen = []
    transformer = flux_job.model.pipe.transformer
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["timestep"][0])),
                                                   with_kwargs=True)
    try:
        with config.install(flux_job.model.pipe):
            scheduler = flux_job.model.pipe.scheduler
            flux_job.model.pipe(class_labels=[3], num_inference_steps=config.steps, guidance_scale=1.0)
            levels = scheduler.sigmas[:-1].tolist()
    finally:
        handle.remove()
    truncated = [int(level * 1000) / 1000 for level in levels]  # what UniPC's integer timesteps would give
    assert seen == pytest.approx(levels, abs=1e-6) and seen != pytest.approx(truncated, abs=1e-6)


def test_calibrator_searches_from_every_start_and_keeps_the_best(folders, tmp_path):
    from samplers.schedules import OptimizedSchedule

    job, subject = bench.open_job("flux-digits", _settings(folders), tmp_path / "job")
    subject.lab = dataclasses.replace(subject.lab, folder=tmp_path / "weights")
    calibrator = Calibrator(subject, Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6),
                            tmp_path / "out", log=lambda message: None)
    found = calibrator.get("euler", 4)
    assert found == tmp_path / "out" / "euler-nfe4.json" and not (tmp_path / "weights").exists()
    saved = OptimizedSchedule.load(found)
    starts = saved.reference["starts"]
    assert set(starts) == set(subject.schedules)
    assert saved.initial_schedule == min(starts, key=starts.get)
    assert saved.reference["objective_value"] == pytest.approx(min(starts.values()), abs=1e-6)
    assert calibrator.existing("euler", 4) is not None


def test_calibrator_reads_its_output_folder_first_then_the_shipped_walk(folders, tmp_path):
    import shutil

    calibration = Calibration(samples=2, sweeps=1, iterations=1, reference_nfe=6)
    job, subject = bench.open_job("flux-digits", _settings(folders), tmp_path / "job")
    subject.lab = dataclasses.replace(subject.lab, folder=tmp_path / "weights")
    made = Calibrator(subject, calibration, tmp_path / "first", log=lambda message: None).get("euler", 4)
    subject.schedule_dir.mkdir(parents=True)
    shipped = shutil.copy(made, subject.schedule_dir / made.name)
    calibrator = Calibrator(subject, calibration, tmp_path / "second", log=lambda message: None)
    searched = []
    calibrator.search = lambda *args: searched.append(args)  # a search would be a failure here
    assert calibrator.get("euler", 4) == shipped and searched == []
    (tmp_path / "second").mkdir()
    own = shutil.copy(made, tmp_path / "second" / made.name)
    assert calibrator.get("euler", 4) == own
    other = Calibrator(subject, dataclasses.replace(calibration, seed=8), tmp_path / "second", log=lambda m: None)
    assert other.existing("euler", 4) is None  # another provenance: neither copy fits
    assert sorted(p.name for p in subject.schedule_dir.iterdir()) == ["euler-nfe4.json"]


def test_shipped_models_keep_the_provenance_of_their_shipped_walks(tmp_path):
    """The walks shipped beside the weights were searched on these parameters (no recalibration)."""
    from omegaconf import OmegaConf

    from accel.lab.models import load_model
    from samplers.schedules import OptimizedSchedule

    for name in ("flux-digits", "unet-digits"):
        subject = bench_model(SETUPS[name], load_model(OmegaConf.create({"name": name})))
        shipped = OptimizedSchedule.load(subject.schedule_dir / "unipc_bh2-nfe6.json")
        calibrator = Calibrator(subject, Calibration(), tmp_path, log=lambda message: None)
        assert shipped.reference["bench"] == calibrator.provenance(), name
        assert calibrator.existing("unipc_bh2", 6) == subject.schedule_dir / "unipc_bh2-nfe6.json"
