"""Model support, exact removal, no leakage between runs or models, and errors on bad input."""

import json
import logging

import pytest
import torch

from caching import (AttentionScope, BlockRangeScope, CacheConfig, IntervalTrigger, MagCacheTrigger,
                     ResidualScope, ResidualTrigger, TokenScope, apply_cache, get_cache, get_preset, remove_cache)
from caching.testing import TINY_MODELS, ToyTransformer, drive, run_steps, tiny_model
from step_context import StepContext, new_generation, publish_step

# (preset at which it computes everything, the same preset caching)
EXACT_AND_CACHED = {
    "FluxTransformer2DModel": ("fbcache", {"threshold": 0.0}, {"threshold": 0.3}),
    "SD3Transformer2DModel": ("dbcache", {"threshold": 0.0}, {"threshold": 0.5, "warmup": 0.0}),
    "DiTTransformer2DModel": ("taylorseer", {"interval": 1}, {"interval": 3}),
    "PixArtTransformer2DModel": ("pab", {"interval": 1, "cross_interval": 1}, {}),
    "WanTransformer3DModel": ("toca", {"interval": 1}, {"interval": 2}),
    "UNet2DConditionModel": ("deepcache", {"interval": 1}, {"interval": 2}),
    "UNet2DModel": ("deepcache", {"interval": 1}, {"interval": 3}),
}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_model_class_matches_full_compute_at_threshold_zero(name):
    preset, exact, caching = EXACT_AND_CACHED[name]
    tiny = tiny_model(name)
    reference = run_steps(tiny, 6, branches=("cond", "uncond"))
    handle = apply_cache(tiny.model, get_preset(preset, **exact))
    outputs = run_steps(tiny, 6, branches=("cond", "uncond"))
    remove_cache(tiny.model)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference))
    assert handle.stats.last_run().steps_computed("uncond") == list(range(6))
    handle = apply_cache(tiny.model, get_preset(preset, **caching))
    outputs = run_steps(tiny, 6, branches=("cond", "uncond"))
    remove_cache(tiny.model)
    run = handle.stats.last_run()
    assert run.flops_speedup > 1.05 and len(run.steps_cached("cond")) >= 2
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(torch.equal(a, b) for a, b in zip(run_steps(tiny, 6, branches=("cond", "uncond")), reference))


def module_attributes(model):
    return {name: set(vars(module)) for name, module in model.named_modules()}


@pytest.mark.parametrize("preset,kwargs", [("teacache", {"coefficients": (1.0, 0.0), "threshold": 0.5}),
                                           ("dbcache", {"threshold": 0.5}), ("fora", {}), ("toca", {}),
                                           ("deltadit", {}), ("pab", {})])
def test_remove_restores_the_model_exactly(preset, kwargs):
    tiny = tiny_model("FluxTransformer2DModel")
    before_attributes = module_attributes(tiny.model)
    before = run_steps(tiny, 5, batch=2)
    apply_cache(tiny.model, get_preset(preset, **kwargs))
    cached = run_steps(tiny, 5, batch=2)
    remove_cache(tiny.model)
    assert module_attributes(tiny.model) == before_attributes
    assert get_cache(tiny.model) is None
    after = run_steps(tiny, 5, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(before, cached))


def test_no_leak_across_generations_step_counts_resolutions_and_batches():
    tiny = tiny_model("FluxTransformer2DModel")
    config = get_preset("taylorseer", interval=2, warmup=0.0)
    handle = apply_cache(tiny.model, config)
    run_steps(tiny, 8, batch=2, size=4, seed=1, branches=("cond", "uncond"))
    second = run_steps(tiny, 5, batch=1, size=6, seed=2)
    third = run_steps(tiny, 7, batch=3, size=2, seed=3)
    remove_cache(tiny.model)
    for runs, (steps, batch, size, seed) in ((second, (5, 1, 6, 2)), (third, (7, 3, 2, 3))):
        apply_cache(tiny.model, config)
        fresh = run_steps(tiny, steps, batch=batch, size=size, seed=seed)
        remove_cache(tiny.model)
        assert all(torch.equal(a, b) for a, b in zip(runs, fresh))
    assert len(handle.stats.runs) == 3


def test_shape_change_within_a_generation_resets_the_cache():
    tiny = tiny_model("FluxTransformer2DModel")
    apply_cache(tiny.model, get_preset("fora", interval=3))
    generation = new_generation()
    run_steps(tiny, 4, size=4, generation=generation)
    mixed = run_steps(tiny, 4, size=6, generation=generation)
    remove_cache(tiny.model)
    apply_cache(tiny.model, get_preset("fora", interval=3))
    fresh = run_steps(tiny, 4, size=6)
    remove_cache(tiny.model)
    assert all(torch.equal(a, b) for a, b in zip(mixed, fresh))


def test_two_cached_models_in_one_process_do_not_interact():
    first, second = tiny_model("FluxTransformer2DModel", seed=0), tiny_model("FluxTransformer2DModel", seed=1)
    apply_cache(first.model, get_preset("fbcache", threshold=0.3))
    alone = run_steps(first, 6)
    remove_cache(first.model)
    apply_cache(first.model, get_preset("fbcache", threshold=0.3))
    apply_cache(second.model, get_preset("foca", interval=2))
    runs = [(first, first.inputs(1, 4, 0), new_generation(), []), (second, second.inputs(1, 4, 0), new_generation(), [])]
    with torch.no_grad():
        for index in range(6):
            for tiny, kwargs, generation, outputs in runs:  # one step of each model in turn
                sigma = 1.0 - index / 6
                with publish_step(StepContext(index, 6, sigma, sigma * 1000, generation=generation)):
                    outputs.append(tiny.model(**kwargs, return_dict=False)[0])
                kwargs["hidden_states"] = kwargs["hidden_states"] - outputs[-1] / 6
    interleaved = runs[0][3]
    remove_cache(first.model)
    remove_cache(second.model)
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved))


def test_bad_input_gives_one_line_errors():
    tiny = tiny_model("FluxTransformer2DModel")
    unet = tiny_model("UNet2DModel")
    cases = [
        (lambda: get_preset("fbcache", threshold=1.5), "out of range"),
        (lambda: get_preset("teacache", threshold=-0.1), "out of range"),
        (lambda: get_preset("nocache"), "unknown cache preset 'nocache'; choose one of"),
        (lambda: get_preset("fbcache", interval=3), "takes no parameter interval"),
        (lambda: get_preset("fora", interval=0), "interval"),
        (lambda: get_preset("taylorseer", warmup=1.2), "warmup=1.2 is out of range"),
        (lambda: get_preset("taylorseer", warmup=0.6, cooldown=0.5), "cover the whole run"),
        (lambda: get_preset("taylorseer", update="magic"), "unknown update"),
        (lambda: apply_cache(unet.model, get_preset("toca")), "scope 'tokens' cannot be provided by UNet2DModel"),
        (lambda: apply_cache(tiny.model, get_preset("deepcache")), "cannot be provided by FluxTransformer2DModel"),
        (lambda: CacheConfig(IntervalTrigger(2), ResidualScope(), max_cached=2.0), "max_cached"),
        (lambda: CacheConfig(get_preset("fbcache").trigger, ResidualScope()), "cannot drive scope 'residual'"),
        (lambda: CacheConfig(IntervalTrigger(2), TokenScope(fraction=0.0)), "fraction"),
        (lambda: apply_cache(torch.nn.Linear(2, 2), get_preset("fbcache")), "Linear has no block layout"),
        (lambda: apply_cache(tiny.model, CacheConfig(MagCacheTrigger(), AttentionScope())), "pass ratios="),
        (lambda: get_preset("fbcache", first=0), "takes no parameter first"),
        (lambda: CacheConfig(ResidualTrigger(), BlockRangeScope(first=0)), "cannot drive scope 'blocks'"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            build()
        assert "\n" not in str(error.value)


def test_summary_and_description_are_json_ready():
    tiny = tiny_model("FluxTransformer2DModel")
    handle = apply_cache(tiny.model, get_preset("dbcache", threshold=0.5))
    run_steps(tiny, 4, branches=("cond", "uncond"))
    remove_cache(tiny.model)
    summary = json.loads(json.dumps(handle.stats.summary()))
    assert summary["runs"][0]["steps_computed"]["uncond"][0] == 0
    assert json.loads(json.dumps(handle.describe()))["trigger"] == {"kind": "residual", "threshold": 0.5}


def test_apply_twice_is_refused_and_remove_without_cache_is_logged(caplog):
    tiny = tiny_model("DiTTransformer2DModel")
    apply_cache(tiny.model, get_preset("fora"))
    with pytest.raises(ValueError, match="already has a cache"):
        apply_cache(tiny.model, get_preset("fbcache"))
    remove_cache(tiny.model)
    with caplog.at_level(logging.WARNING, logger="caching"):
        remove_cache(tiny.model)
    assert "nothing to remove" in caplog.text


def test_short_runs_log_the_adjustment(caplog):
    tiny = tiny_model("DiTTransformer2DModel")
    apply_cache(tiny.model, get_preset("taylorseer", warmup=0.5, cooldown=0.4, max_cached=0.05))
    with caplog.at_level(logging.INFO, logger="caching"):
        run_steps(tiny, 2)
    remove_cache(tiny.model)
    assert "cover the whole run" in caplog.text and "allowing 1 cached step" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_static_triggers_do_not_sync():
    model = ToyTransformer(dim=4, num_blocks=2, kind="mlp").cuda().eval()
    inputs = [dict(hidden_states=torch.randn(2, 5, 4, device="cuda"), temb=torch.zeros(2, device="cuda"))
              for _ in range(6)]
    handle = apply_cache(model, get_preset("taylorseer", interval=3, warmup=0.0, count_flops=False))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = drive(model, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        remove_cache(model)
    assert handle.stats.last_run().steps_computed() == [0, 3] and outputs[-1].is_cuda
