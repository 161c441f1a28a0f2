"""Scopes (what): block ranges, single blocks, attention kinds, token subsets, the UNet deep branch."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from caching import (CacheConfig, IntervalTrigger, TokenScope, apply_cache, get_preset,
                     remove_cache)
from caching.testing import ToyTransformer, drive, run_steps, tiny_model


@pytest.fixture(scope="module")
def flux():
    return tiny_model("FluxTransformer2DModel")


def cached_run(tiny, config, num_steps=8, **kwargs):
    handle = apply_cache(tiny.model, config)
    try:
        outputs = run_steps(tiny, num_steps, **kwargs)
    finally:
        remove_cache(tiny.model)
    return handle.stats.last_run(), outputs


def test_dbcache_skips_only_the_middle_blocks(flux):
    run, _ = cached_run(flux, get_preset("dbcache", threshold=1.0, first=1, last=1, warmup=0.0))
    assert run.steps_computed() == [0]
    assert run.units_skipped(3) == ("transformer_blocks.1", "single_transformer_blocks.0")


def test_residual_scope_skips_every_block(flux):
    run, _ = cached_run(flux, get_preset("taylorseer", interval=4, warmup=0.0))
    assert run.units_skipped(1) == ("transformer_blocks.0", "transformer_blocks.1",
                                    "single_transformer_blocks.0", "single_transformer_blocks.1")
    assert run.units_skipped(4) == ()


def test_block_range_too_wide_for_the_model_is_an_error(flux):
    with pytest.raises(ValueError, match="leaves no block to cache"):
        apply_cache(flux.model, get_preset("dbcache", first=2, last=2))
    assert not hasattr(flux.model, "_diffusers_hook")


def test_deltadit_caches_rear_blocks_early_and_front_blocks_late(flux):
    run, _ = cached_run(flux, get_preset("deltadit", interval=2, fraction=0.5, boundary=0.5))
    assert run.steps_cached() == [1, 3, 5, 7]
    assert run.units_skipped(1) == ("single_transformer_blocks.0", "single_transformer_blocks.1")
    assert run.units_skipped(5) == ("transformer_blocks.0", "transformer_blocks.1")


def test_pab_keeps_a_separate_interval_per_attention_kind():
    pixart = tiny_model("PixArtTransformer2DModel")
    run, _ = cached_run(pixart, get_preset("pab", interval=2, cross_interval=3, warmup=0.0, cooldown=0.0))
    self_attn = tuple(f"transformer_blocks.{i}.attn1" for i in range(3))
    cross_attn = tuple(f"transformer_blocks.{i}.attn2" for i in range(3))
    assert run.units_skipped(1) == tuple(u for pair in zip(self_attn, cross_attn) for u in pair)
    assert run.units_skipped(2) == cross_attn        # self recomputed (interval 2), cross not yet
    assert run.units_skipped(3) == self_attn         # cross recomputed (interval 3)


def test_fora_reuses_attention_and_mlp_outputs(flux):
    run, _ = cached_run(flux, get_preset("fora", interval=3))
    assert run.steps_computed() == [0, 3, 6]
    assert "transformer_blocks.0.ff_context" in run.units_skipped(1)
    assert "single_transformer_blocks.1.proj_mlp" in run.units_skipped(2)


def test_toca_recomputes_the_most_changed_tokens():
    torch.manual_seed(0)
    model = ToyTransformer(dim=4, num_blocks=1, kind="mlp").eval()
    base = torch.randn(1, 8, 4)
    moved = base.clone()
    moved[0, [2, 5]] += 3.0                              # only tokens 2 and 5 change
    inputs = [dict(hidden_states=base, temb=torch.zeros(1)), dict(hidden_states=moved, temb=torch.zeros(1))]
    full = drive(model, inputs)
    handle = apply_cache(model, CacheConfig(IntervalTrigger(10), TokenScope(fraction=0.25)))
    cached = drive(model, inputs)
    remove_cache(model)
    assert torch.allclose(cached[1][0, [2, 5]], full[1][0, [2, 5]], atol=1e-6, rtol=0)  # recomputed
    stale = moved[0, [0, 1, 3]] + (full[0] - base)[0, [0, 1, 3]]         # others reuse step 0's MLP output
    assert torch.allclose(cached[1][0, [0, 1, 3]], stale)
    call = handle.stats.last_run().calls[1]
    assert (call.tokens_computed, call.tokens_total) == (2, 8)


def test_toca_token_counts_on_flux(flux):
    run, _ = cached_run(flux, get_preset("toca", interval=3, fraction=0.25))
    # 16 image + 3 text tokens: ff 4/16, ff_context 1/3 (2 double blocks); proj_mlp, proj_out 5/19 (2 single)
    assert (run.calls[1].tokens_computed, run.calls[1].tokens_total) == (30, 114)
    assert (run.calls[0].tokens_computed, run.calls[0].tokens_total) == (114, 114)


def test_deepcache_skips_the_deep_branch_of_both_unets():
    for name in ("UNet2DModel", "UNet2DConditionModel"):
        unet = tiny_model(name)
        reference = run_steps(unet, 4)
        run, outputs = cached_run(unet, get_preset("deepcache", interval=2), num_steps=4)
        assert run.steps_computed() == [0, 2]
        assert run.units_skipped(1) == ("down_blocks.1", "mid_block", "up_blocks.0")
        assert torch.equal(outputs[0], reference[0]) and not torch.equal(outputs[1], reference[1])
        assert 1.2 < run.flops_speedup < 2.0
        with pytest.raises(ValueError, match="branch in 0..0"):
            apply_cache(unet.model, get_preset("deepcache", branch=1))


def test_counted_flops_match_the_flop_counter(flux):
    unet = tiny_model("UNet2DModel")
    for tiny, config in ((flux, get_preset("fbcache", threshold=0.3)), (flux, get_preset("toca")),
                         (flux, get_preset("teacache", threshold=0.3, coefficients=(1.0, 0.0))),
                         (unet, get_preset("deepcache"))):
        with FlopCounterMode(display=False) as full:
            run_steps(tiny, 6)
        handle = apply_cache(tiny.model, config)
        with FlopCounterMode(display=False) as counter:
            run_steps(tiny, 6)
        remove_cache(tiny.model)
        run = handle.stats.last_run()
        assert run.flops_full == full.get_total_flops(), config.name
        assert run.flops_computed == counter.get_total_flops(), config.name
        assert run.flops_speedup > 1.0


def test_cache_memory_is_reported(flux):
    run, _ = cached_run(flux, get_preset("taylorseer", interval=3, order=2))
    # residual (1, 16, 16) and text residual (1, 3, 16) float32, orders 0..2
    assert run.peak_cache_bytes == 3 * (16 * 16 + 3 * 16) * 4
