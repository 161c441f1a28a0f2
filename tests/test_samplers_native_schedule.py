"""schedule="auto": AccelScheduler walks exactly the levels and timesteps of the pipeline's own scheduler.

Each case is a model family's shipped scheduler config (as in its hub scheduler_config.json) and the
set_timesteps arguments its pipeline passes for N steps.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

import diffusers
import samplers
from samplers import SOLVERS
from samplers.diffusers_scheduler import AccelScheduler
from step_context import current_step

FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
_LINEAR_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_WAN = dict(_class_name="UniPCMultistepScheduler", **_LINEAR_BETAS, disable_corrector=[], final_sigmas_type="zero",
            lower_order_final=True, num_train_timesteps=1000, predict_x0=True, prediction_type="flow_prediction",
            solver_order=2, solver_type="bh2", steps_offset=0, timestep_spacing="linspace", use_flow_sigmas=True)

CONFIGS = {
    "flux-dev": dict(_class_name=FLOW_MATCH, base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                     max_shift=1.15, num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
    "sd3.5": dict(_class_name=FLOW_MATCH, num_train_timesteps=1000, shift=3.0),
    "wan2.1-shift3": dict(_WAN, flow_shift=3.0),
    "wan2.1-shift5": dict(_WAN, flow_shift=5.0),
    "sana": dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", **_LINEAR_BETAS,
                 euler_at_final=False, final_sigmas_type="zero", flow_shift=3.0, lower_order_final=True,
                 num_train_timesteps=1000, prediction_type="flow_prediction", solver_order=2,
                 solver_type="midpoint", timestep_spacing="linspace", use_flow_sigmas=True),
    "qwenimage": dict(_class_name=FLOW_MATCH, base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      time_shift_type="exponential", use_dynamic_shifting=True),
    "cogview4": dict(_class_name=FLOW_MATCH, base_image_seq_len=256, base_shift=0.25, max_image_seq_len=4096,
                     max_shift=0.75, num_train_timesteps=1000, shift=1.0, time_shift_type="linear",
                     use_dynamic_shifting=True),
    "hunyuanvideo": dict(_class_name=FLOW_MATCH, num_train_timesteps=1000, shift=7.0),
    "ltx-video": dict(_class_name=FLOW_MATCH, base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096,
                      max_shift=2.05, num_train_timesteps=1000, shift=1.0, shift_terminal=0.1,
                      use_dynamic_shifting=True),
    "mochi": dict(_class_name=FLOW_MATCH, invert_sigmas=True, num_train_timesteps=1000, shift=1.0),
    "sdxl": dict(_class_name="EulerDiscreteScheduler", **_SD_BETAS, interpolation_type="linear",
                 num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                 use_karras_sigmas=False),
    "sdxl-dpm-karras": dict(_class_name="DPMSolverMultistepScheduler", **_SD_BETAS, num_train_timesteps=1000,
                            prediction_type="epsilon", steps_offset=1, use_karras_sigmas=True),
    "sd1.5": dict(_class_name="PNDMScheduler", **_SD_BETAS, num_train_timesteps=1000, set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1),
    "pixart-alpha": dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", **_LINEAR_BETAS,
                         lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon",
                         solver_order=2, solver_type="midpoint", timestep_spacing="linspace"),
    "dit": dict(_class_name="DDIMScheduler", **_LINEAR_BETAS, clip_sample=False, num_train_timesteps=1000,
                prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0),
}


def _flux_mu(config: dict, image_seq_len: int) -> float:
    """diffusers' calculate_shift, as FluxPipeline / QwenImagePipeline / LTXPipeline call it."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * slope + config["base_shift"] - slope * config["base_image_seq_len"]


def _pipeline_arguments(name: str, steps: int) -> dict:
    """The set_timesteps arguments the family's pipeline passes for `steps` steps (1024^2 images)."""
    config = CONFIGS[name]
    uniform = np.linspace(1.0, 1 / steps, steps)
    if name in ("flux-dev", "qwenimage"):
        return dict(sigmas=uniform, mu=_flux_mu(config, 4096))
    if name == "ltx-video":
        return dict(sigmas=uniform, mu=_flux_mu(config, 4 * 16 * 16))
    if name == "cogview4":
        timesteps = np.linspace(1000, 1.0, steps).astype(np.int64).astype(np.float32)
        return dict(timesteps=timesteps, sigmas=timesteps / 1000, mu=math.sqrt(4096 / 256) * 0.75 + 0.25)
    if name == "hunyuanvideo":
        return dict(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    if name == "mochi":
        return dict(sigmas=np.array(linear_quadratic_schedule(steps, 0.025)))
    return dict(num_inference_steps=steps)


def _native(name: str, steps: int):
    config = CONFIGS[name]
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(**_pipeline_arguments(name, steps))
    return scheduler


@pytest.mark.parametrize("steps", [4, 8, 28])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_auto_timesteps_equal_the_native_schedulers(name, steps):
    native = _native(name, steps)
    ours = AccelScheduler.from_config(CONFIGS[name], solver="euler")
    ours.set_timesteps(**_pipeline_arguments(name, steps))
    expected = torch.unique_consecutive(native.timesteps.to(torch.float64))  # PNDM repeats its second timestep
    assert ours.schedule_name == "native" and len(ours.timesteps) == len(expected) == ours.num_inference_steps
    torch.testing.assert_close(ours.timesteps.to(torch.float64), expected, rtol=1e-4, atol=0)
    assert float(ours.sigmas[-1]) == 0.0 and bool((ours.sigmas[1:] < ours.sigmas[:-1]).all())
    if ours.model_schedule.name == "flow":  # the levels are the native sigmas (flow time t)
        levels = native.sigmas[:len(expected)].to(torch.float64)
        levels = 1 - levels if CONFIGS[name].get("invert_sigmas") else levels
        torch.testing.assert_close(ours.sigmas[:-1].to(torch.float64), levels, rtol=1e-5, atol=1e-6)
    else:  # the VE sigma of each native timestep, from the training alphas
        abar = ours.model_schedule.alphas_cumprod.to(torch.float64)
        train = ((1 - abar) / abar).sqrt().log().numpy()
        ve = np.exp(np.interp(expected.numpy(), np.arange(len(train)), train))
        torch.testing.assert_close(ours.sigmas[:-1].to(torch.float64), torch.from_numpy(ve), rtol=1e-5, atol=0)


def test_native_timesteps_are_what_the_old_auto_missed():
    """The measured failures of the family-default walk, now the native numbers."""
    sd3 = AccelScheduler.from_config(CONFIGS["sd3.5"], solver="euler")
    sd3.set_timesteps(4)
    assert float(sd3.timesteps[-1]) == pytest.approx(8.9286, abs=1e-3)  # was 136 (uniform t to 0, shifted)
    cogview = AccelScheduler.from_config(CONFIGS["cogview4"], solver="euler")
    cogview.set_timesteps(**_pipeline_arguments("cogview4", 4))
    assert cogview.timesteps.tolist() == [1000.0, 667.0, 334.0, 1.0]  # the pipeline's, not 1000 t
    assert float(cogview.sigmas[1]) != pytest.approx(0.667, abs=1e-2)  # linear time shift of the levels
    qwen = AccelScheduler.from_config(CONFIGS["qwenimage"], solver="euler")
    qwen.set_timesteps(**_pipeline_arguments("qwenimage", 8))
    assert float(qwen.sigmas[-2]) == pytest.approx(0.02, abs=1e-6)  # shift_terminal


def test_describe_states_the_native_schedule():
    def describe(name, **kwargs):
        return AccelScheduler.from_config(CONFIGS[name], solver="euler", **kwargs).describe()

    assert describe("sd3.5") == "flow, shift 3.0 (from the pipeline's FlowMatchEulerDiscreteScheduler)"
    assert describe("qwenimage") == ("flow, dynamic shift (mu from the image size), shift_terminal 0.02 "
                                     "(from the pipeline's FlowMatchEulerDiscreteScheduler)")
    assert describe("cogview4").startswith("flow, dynamic shift (mu from the image size), linear time shift (")
    assert describe("wan2.1-shift5") == "flow, flow_shift 5.0 (from the pipeline's UniPCMultistepScheduler)"
    assert describe("sdxl") == "vp, leading spacing, steps_offset 1 (from the pipeline's EulerDiscreteScheduler)"
    assert describe("sdxl-dpm-karras") == "vp, karras sigmas (from the pipeline's DPMSolverMultistepScheduler)"
    assert describe("dit") == "vp, leading spacing (from the pipeline's DDIMScheduler)"  # DDIM's default spacing
    assert describe("mochi").startswith("flow, no shift, inverted sigmas")
    assert describe("sd3.5", schedule="flux") == ("flow, flux schedule (base_shift 0.5, max_shift 1.15, "
                                                  "base_image_seq_len 256, max_image_seq_len 4096)")
    assert AccelScheduler(solver="euler", shift=3.0).describe() == (
        "flow, flow schedule (shift 3.0), the family default (no pipeline scheduler config)")


def test_config_round_trips_and_exposes_the_native_keys(tmp_path):
    scheduler = AccelScheduler.from_config(CONFIGS["qwenimage"], solver="unipc_bh2", shift=2.0)
    # pipelines read their scheduler's keys; this scheduler's own values win over the native ones
    assert scheduler.config.get("max_image_seq_len") == 8192 and scheduler.config.shift_terminal == 0.02
    assert scheduler.config.shift == 2.0 and scheduler.config.native_config["shift"] == 1.0
    sana = AccelScheduler.from_config(CONFIGS["sana"], solver="euler")
    assert sana.config.use_flow_sigmas is True and sana.config.flow_shift == 3.0
    scheduler.save_pretrained(tmp_path)
    loaded = AccelScheduler.from_pretrained(tmp_path)
    assert loaded.config.native_config == scheduler.config.native_config
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config) 
    assert set(public(loaded.config)) == set(public(loaded._internal_dict)) | {"shift_terminal", "time_shift_type"}
    for each in (scheduler, loaded):
        each.set_timesteps(**_pipeline_arguments("qwenimage", 6))
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps, rtol=0, atol=0)
    again = AccelScheduler.from_config(scheduler.config)  # its own config, extra keys and all
    assert again.config.native_config == scheduler.config.native_config and again.schedule_name == "native"


def test_a_scheduler_object_brings_its_class_name():
    native = FlowMatchEulerDiscreteScheduler(shift=3.0)  # built in code: its config has no _class_name
    assert "_class_name" not in native.config
    assert AccelScheduler.from_config(native.config).schedule_name == "flow"  # the family default
    scheduler = AccelScheduler.from_config(native, solver="euler")
    scheduler.set_timesteps(5)
    native.set_timesteps(5)
    assert scheduler.schedule_name == "native" and scheduler.timesteps.tolist() == native.timesteps.tolist()


def test_two_evaluation_solvers_take_native_timesteps_at_native_levels():
    scheduler = AccelScheduler.from_config(CONFIGS["cogview4"], solver="heun")
    scheduler.set_timesteps(**_pipeline_arguments("cogview4", 4))
    # heun evaluates level i, then level i + 1: both get the pipeline's timesteps
    assert scheduler.timesteps.tolist() == [1000.0, 667.0, 667.0, 334.0, 334.0, 1.0, 1.0]
    seen = []
    x = torch.ones(1, 2)
    for t in scheduler.timesteps:
        seen.append(current_step().timestep)
        x = scheduler.step(torch.zeros(1, 2), t, x).prev_sample
    assert seen == scheduler.timesteps.tolist()


# ---------------------------------------------------------------- starting mid-walk (img2img)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.1 * torch.tanh(2 * x)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc_bh2", "ipndm"])
def test_begin_index_walks_the_rest_of_the_walk(solver):
    scheduler = AccelScheduler.from_config(CONFIGS["sd3.5"], solver=solver)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2)
    x = start = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    steps = []
    for t in scheduler.timesteps[2:]:
        steps.append(current_step().step_index)
        x = scheduler.step(_smooth(x), t, x).prev_sample
    assert steps == [2, 3, 4, 5] and current_step() is None
    denoiser = samplers.Denoiser(lambda y, sigma: _smooth(y), "flow")
    expected = SOLVERS[solver].fn(denoiser, start, scheduler.solver_sigmas[2:])
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


def test_scale_noise_and_add_noise_are_the_native_forward_process():
    sample, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    native = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = AccelScheduler.from_config(native, solver="euler")
    for scheduler in (native, ours):
        scheduler.set_timesteps(8)
        scheduler.set_begin_index(3)
    timestep = ours.timesteps[3:4].repeat(2)
    assert torch.equal(ours.scale_noise(sample, timestep, noise), native.scale_noise(sample, timestep, noise))
    ddpm = DDPMScheduler(**_SD_BETAS)
    vp = AccelScheduler.from_config(ddpm, solver="ddim")
    timesteps = torch.tensor([999, 501])
    torch.testing.assert_close(vp.add_noise(sample, noise, timesteps), ddpm.add_noise(sample, noise, timesteps),
                               rtol=1e-5, atol=1e-6)
    assert AccelScheduler.supports_partial_start("unipc_bh2") and not AccelScheduler.supports_partial_start("heun")


def test_walks_that_are_not_model_walks_are_refused_in_one_line():
    edm = dict(CONFIGS["sdxl"], prediction_type="v_prediction", timestep_type="continuous")
    scheduler = AccelScheduler.from_config(edm, solver="euler")
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler's timesteps .* are not DDPM timesteps in "
                                         r"\[0, 999\]; use a named schedule") as info:
        scheduler.set_timesteps(4)
    assert "\n" not in str(info.value)
    custom = AccelScheduler(native_config={"_class_name": "MySampler"})  # not a diffusers class: family default
    assert custom.schedule_name == "flow" and "MySampler is not a diffusers scheduler" in custom.describe()
