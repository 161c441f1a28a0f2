"""Uncond-branch reuse in classifier-free guidance (samplers.cfg_model_fn, uncond_interval)."""

from __future__ import annotations

import pytest
import torch

import samplers
from step_context import StepContext, publish_step


def counting_model():
    calls = []

    def model_fn(x, sigma, *, labels):
        calls.append(int(labels[0]))
        return x * (1.0 + labels.view(-1, 1).float()) + sigma.view(-1, 1)  # uncond label 0, cond label 1
    return model_fn, calls


def run(fn, steps: int, generation: int):
    outputs = []
    for index in range(steps):
        context = StepContext(step_index=index, num_steps=steps, sigma=1.0 - index / steps, timestep=0.0,
                              generation=generation)
        with publish_step(context):
            x = torch.full((1, 2), float(index + 1))
            outputs.append(fn(x, torch.tensor([context.sigma]), labels=torch.ones(1, dtype=torch.long)))
    return outputs


def test_uncond_computed_every_k_steps_and_offset_reused():
    model_fn, calls = counting_model()
    fn = samplers.cfg_model_fn(model_fn, 3.0, cond_key="labels", uncond_value=torch.zeros_like, uncond_interval=2)
    outputs = run(fn, 4, generation=101)
    assert calls == [1, 0, 1, 1, 0, 1]  # uncond on steps 0 and 2 only
    # step 1: cond = 2 * 2 + 0.75 = 4.75; offset from step 0: uncond - cond = (1 + 1) - (2 + 1) = -1
    torch.testing.assert_close(outputs[1], torch.full((1, 2), 4.75 + (1 - 3.0) * -1.0))
    # step 2 computes: uncond = 3 + 0.5, cond = 6 + 0.5 -> 3.5 + 3 * 3 = 12.5
    torch.testing.assert_close(outputs[2], torch.full((1, 2), 12.5))


def test_new_generation_computes_uncond_again_and_interval_one_is_plain_cfg():
    model_fn, calls = counting_model()
    fn = samplers.cfg_model_fn(model_fn, 3.0, cond_key="labels", uncond_value=torch.zeros_like, uncond_interval=2)
    run(fn, 2, generation=201)
    calls.clear()
    run(fn, 2, generation=202)
    assert calls == [1, 0, 1]
    plain_fn, plain_calls = counting_model()
    plain = samplers.cfg_model_fn(plain_fn, 3.0, cond_key="labels", uncond_value=torch.zeros_like)
    run(plain, 3, generation=203)
    assert plain_calls == [1, 0] * 3


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="uncond_interval must be an integer >= 1"):
        samplers.cfg_model_fn(lambda x, s, **c: x, 2.0, cond_key="labels", uncond_value=torch.zeros_like,
                              uncond_interval=0)


def test_ablation_may_vary_uncond_reuse_but_not_a_shared_reference():
    from accel.recipe import load_recipe
    from accel.recipe.load import RecipeError

    recipe = load_recipe("ablations/embedded", ["ablation.axes={guidance.uncond_interval: [1, 2]}"])
    assert list(recipe.ablation.axes["guidance.uncond_interval"]) == [1, 2]
    with pytest.raises(RecipeError, match="set eval.reference.guidance_scale"):
        load_recipe("ablations/embedded", ["ablation.axes={guidance.scale: [2.0, 4.0]}",
                                           "eval.reference.guidance_scale=null"])
    with pytest.raises(RecipeError, match="only sampler, cache, adapters"):
        load_recipe("ablations/embedded", ["ablation.axes={inputs.seed: [1, 2]}"])
