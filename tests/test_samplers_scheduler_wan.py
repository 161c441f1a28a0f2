"""AccelScheduler in a tiny random-weight WanPipeline, which reads sigmas[i] once per model call."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import samplers
from caching.testing import tiny_model
from samplers import SOLVERS
from samplers.diffusers_scheduler import AccelScheduler
from step_context import current_step

GUIDANCE = 2.0


def _embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def transformer():
    return tiny_model("WanTransformer3DModel").model


def _native(transformer, noise: torch.Tensor, solver: str, steps: int) -> torch.Tensor:
    """Our native sampler on the same model, with Wan's guidance on the raw velocity."""
    cond, uncond = _embeds(1), _embeds(2)

    def velocity(x, sigma):
        timestep = sigma * 1000
        out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        base = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
        return base + GUIDANCE * (out - base)

    denoiser = samplers.Denoiser(velocity, "flow", samplers.FlowSchedule())
    return samplers.sample(denoiser, noise, solver=solver, steps=steps, schedule="flow",
                           schedule_options={"shift": 3.0})


@pytest.mark.parametrize("solver", ["heun", "midpoint", "dpmpp_2s", "dpmpp_2m"])
def test_multi_evaluation_solvers_run_in_wan_and_match_native(transformer, solver):
    steps = 4
    scheduler = AccelScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver=solver)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = transformer.register_forward_pre_hook(lambda *_: seen.append(current_step()))
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(2), height=32, width=32,
                       num_frames=5, guidance_scale=GUIDANCE, num_inference_steps=steps, latents=noise.clone(),
                       output_type="latent").frames
    finally:
        hook.remove()
    nfe = SOLVERS[solver].nfe(steps)
    assert len(scheduler.timesteps) == nfe and len(scheduler.sigmas) == nfe + 1
    assert len(seen) == 2 * nfe and current_step() is None  # cond and uncond per evaluation
    evaluations = seen[::2]
    # the pipeline's sigmas[i] and timesteps[i] are the level of the i-th call, as published
    assert [c.sigma for c in evaluations] == pytest.approx(scheduler.sigmas[:-1].tolist(), rel=1e-6)
    assert [c.timestep for c in evaluations] == pytest.approx(scheduler.timesteps.tolist(), rel=1e-5)
    expected_steps = [i for i in range(steps) for _ in range(SOLVERS[solver].evals_per_step)][:nfe]
    assert [c.step_index for c in evaluations] == expected_steps
    if SOLVERS[solver].evals_per_step == 2:
        assert [c.stage for c in evaluations[:4]] == [0, 1, 0, 1]
        assert float(scheduler.sigmas[1]) < float(scheduler.sigmas[0])
    with torch.no_grad():
        native = _native(transformer, noise, solver, steps)
    assert out.shape == native.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, native, rtol=1e-4, atol=1e-4)
