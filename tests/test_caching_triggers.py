"""Cache decisions (when): intervals, trajectory fractions, TeaCache, FBCache, MagCache, budget, stages."""

import logging

import pytest
import torch

from caching import (BlockRangeScope, BudgetTrigger, CacheConfig, IntervalTrigger, MagCacheTrigger,
                     ResidualScope, ResidualTrigger, TeaCacheTrigger, apply_cache, get_preset, remove_cache)
from caching.testing import ToyTransformer, drive
from step_context import StepContext, publish_step


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = ToyTransformer(dim=4, num_blocks=2, kind="shift").eval()
    yield model
    remove_cache(model)


def shift_inputs(num_steps, hidden=None):
    hidden = torch.zeros(1, 3, 4) if hidden is None else hidden
    return [dict(hidden_states=hidden, temb=torch.tensor([float(i)])) for i in range(num_steps)]


def computed(model, config, inputs, **drive_kwargs):
    handle = apply_cache(model, config)
    drive(model, inputs, **drive_kwargs)
    run = handle.stats.last_run()
    remove_cache(model)
    return run


def interval(n, **fractions):
    return CacheConfig(IntervalTrigger(n), ResidualScope(), **fractions)


def test_interval_three_computes_every_third_step(toy):
    assert computed(toy, interval(3), shift_inputs(9)).steps_computed() == [0, 3, 6]
    assert computed(toy, interval(1), shift_inputs(5)).steps_computed() == [0, 1, 2, 3, 4]


def test_warmup_fraction_of_eight_steps_is_two_steps(toy):
    run = computed(toy, interval(100, warmup=0.25), shift_inputs(8))
    assert run.steps_computed() == [0, 1]
    assert run.steps_cached() == [2, 3, 4, 5, 6, 7]


def test_fractions_are_converted_per_run_length(toy):
    config = interval(100, warmup=0.25, cooldown=0.25)
    assert computed(toy, config, shift_inputs(8)).steps_computed() == [0, 1, 6, 7]
    assert computed(toy, config, shift_inputs(16)).steps_computed() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_interval_restarts_after_warmup(toy):
    assert computed(toy, interval(3, warmup=0.25), shift_inputs(8)).steps_computed() == [0, 1, 4, 7]


def test_max_cached_fraction_forces_a_refresh(toy):
    # 0.25 of 8 steps = at most 2 cached steps in a row
    assert computed(toy, interval(100, max_cached=0.25), shift_inputs(8)).steps_computed() == [0, 3, 6]


def test_teacache_accumulates_until_threshold(toy):
    # the modulated input grows by 10 % per step: each step adds 0.1 with identity coefficients
    inputs = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([0.0])) for i in range(8)]
    config = CacheConfig(TeaCacheTrigger(threshold=0.25, coefficients=(1.0, 0.0)), ResidualScope())
    assert computed(toy, config, inputs).steps_computed() == [0, 3, 6]
    config = CacheConfig(TeaCacheTrigger(threshold=0.15, coefficients=(1.0, 0.0)), ResidualScope())
    assert computed(toy, config, inputs).steps_computed() == [0, 2, 4, 6]


def test_teacache_rescales_with_its_polynomial(toy):
    inputs = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([0.0])) for i in range(8)]
    # 3x the input change: 0.3 per step reaches 0.25 at once
    config = CacheConfig(TeaCacheTrigger(threshold=0.25, coefficients=(3.0, 0.0)), ResidualScope())
    assert computed(toy, config, inputs).steps_computed() == list(range(8))


def test_first_block_residual_trigger(toy):
    # block 0 adds temb * direction: its residual changes by |t - t_ref| / |t_ref|
    inputs = [dict(hidden_states=torch.zeros(1, 3, 4), temb=torch.tensor([10.0 + i])) for i in range(6)]
    config = CacheConfig(ResidualTrigger(threshold=0.25), BlockRangeScope(first=1, last=0))
    run = computed(toy, config, inputs)
    # reference 10 at step 0: 11, 12 within 25 %; 13 is 30 % -> compute; reference 13: 14, 15 within
    assert run.steps_computed() == [0, 3]
    assert run.units_skipped(1) == ("blocks.1",)


def test_budget_charges_every_cached_step(toy):
    inputs = [dict(hidden_states=torch.zeros(1, 3, 4), temb=torch.tensor([10.0 + i])) for i in range(6)]
    # drift 1/10, 1/11, ... per step: 0.1 + 0.0909 = 0.19 < 0.2 then 0.27 -> compute at step 3
    config = CacheConfig(BudgetTrigger(threshold=0.2), BlockRangeScope(first=1, last=0))
    assert computed(toy, config, inputs).steps_computed() == [0, 3]
    config = CacheConfig(BudgetTrigger(threshold=0.2, total=0.105), BlockRangeScope(first=1, last=0))
    assert computed(toy, config, inputs).steps_computed() == [0, 2, 3, 4, 5]


def test_magcache_accumulates_ratio_error(toy):
    config = CacheConfig(MagCacheTrigger(threshold=0.15, ratios=(1.0,) + (1.1,) * 7), ResidualScope(), warmup=0.25)
    # error 0.1 after one cached step, 0.1 + 0.21 after two: cached, computed, cached, ...
    assert computed(toy, config, shift_inputs(8)).steps_computed() == [0, 1, 3, 5, 7]
    flat = CacheConfig(MagCacheTrigger(threshold=0.15, ratios=(1.0,) * 4), ResidualScope(), warmup=0.25,
                       max_cached=0.25)
    assert computed(toy, flat, shift_inputs(8)).steps_computed() == [0, 1, 4, 7]


def test_threshold_zero_computes_everything(toy):
    inputs = shift_inputs(6)
    for config in (get_preset("fbcache", threshold=0.0), get_preset("budget", threshold=0.0),
                   get_preset("teacache", threshold=0.0, coefficients=(1.0, 0.0)),
                   get_preset("magcache", threshold=0.0, ratios=(1.0, 1.0))):
        assert computed(toy, config, inputs).steps_computed() == list(range(6)), config.name


def test_later_stages_follow_the_step_decision(toy):
    run = computed(toy, interval(3), shift_inputs(6), stages=2)
    stage1 = [(c.step, c.computed) for c in run.calls if c.stage == 1]
    assert stage1 == [(0, True), (1, False), (2, False), (3, True), (4, False), (5, False)]


def test_feature_triggers_with_later_stages(toy):
    inputs = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([10.0 + i])) for i in range(6)]
    for config in (CacheConfig(ResidualTrigger(threshold=0.25), BlockRangeScope(first=1, last=0)),
                   CacheConfig(TeaCacheTrigger(threshold=0.25, coefficients=(1.0, 0.0)), ResidualScope())):
        run = computed(toy, config, inputs, stages=2)
        assert [c.computed for c in run.calls if c.stage == 1] == [c.computed for c in run.calls if c.stage == 0]
        assert run.steps_computed() == [0, 3], config.trigger.name


def test_branches_keep_separate_state(toy):
    config = CacheConfig(TeaCacheTrigger(threshold=0.25, coefficients=(1.0, 0.0)), ResidualScope())
    grow = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([0.0])) for i in range(8)]
    fast = [dict(hidden_states=torch.full((1, 3, 4), 2.0 ** i), temb=torch.tensor([0.0])) for i in range(8)]
    handle = apply_cache(toy, config)
    from step_context import new_generation
    generation = new_generation()
    drive(toy, grow, branch="cond", generation=generation)
    drive(toy, fast, branch="uncond", generation=generation)
    run = handle.stats.last_run()
    assert run.steps_computed("cond") == [0, 3, 6]
    assert run.steps_computed("uncond") == list(range(8))


def test_full_branches_are_computed_every_call_while_others_are_cached(toy):
    from step_context import new_generation

    config = CacheConfig(IntervalTrigger(3), ResidualScope(), full_branches=["uncond"])
    handle = apply_cache(toy, config)
    generation = new_generation()
    drive(toy, shift_inputs(7), branch="cond", generation=generation)
    drive(toy, shift_inputs(7), branch="uncond", generation=generation)
    run = handle.stats.last_run()
    assert run.steps_computed("cond") == [0, 3, 6] and run.steps_computed("uncond") == list(range(7))
    with pytest.raises(ValueError, match="full_branches=.*'negative'"):
        CacheConfig(IntervalTrigger(3), ResidualScope(), full_branches=("negative",))


def test_no_context_computes_everything_and_warns_once(toy, caplog):
    handle = apply_cache(toy, interval(3))
    with caplog.at_level(logging.WARNING, logger="caching"), torch.no_grad():
        outputs = [toy(**kwargs)[0] for kwargs in shift_inputs(4)]
    assert sum("no step context" in r.message for r in caplog.records) == 1
    assert handle.stats.passthrough_calls == 4 and handle.stats.last_run() is None
    remove_cache(toy)
    with torch.no_grad():
        assert all(torch.equal(a, toy(**kw)[0]) for a, kw in zip(outputs, shift_inputs(4)))


def test_rewound_step_index_resets_the_cache(toy, caplog):
    handle = apply_cache(toy, interval(3))
    with caplog.at_level(logging.WARNING, logger="caching"), torch.no_grad():
        for step in (0, 1, 2, 0, 1):  # same generation id, steps start over
            with publish_step(StepContext(step, 3, 1.0, 1000.0, generation=123456)):
                toy(**shift_inputs(1)[0])
    assert [c.computed for c in handle.stats.last_run().calls] == [True, False, False, True, False]
    assert any("went back" in r.message for r in caplog.records)


def test_listed_steps_are_computed_as_trajectory_fractions(toy):
    config = CacheConfig(IntervalTrigger(steps=(0.0, 0.25, 0.5)), ResidualScope())
    assert computed(toy, config, shift_inputs(8)).steps_computed() == [0, 2, 4]
    assert computed(toy, config, shift_inputs(16)).steps_computed() == [0, 4, 8]
    preset = get_preset("taylorseer", steps=[0.0, 0.5], warmup=0.0)
    assert computed(toy, preset, shift_inputs(10)).steps_computed() == [0, 5]


def test_bad_step_lists_are_refused():
    with pytest.raises(ValueError, match="increasing trajectory fractions"):
        IntervalTrigger(steps=(0.5, 0.2))
    with pytest.raises(ValueError, match="increasing trajectory fractions"):
        IntervalTrigger(steps=(0.0, 1.0))
    with pytest.raises(ValueError, match="takes no `steps`"):
        get_preset("teacache", steps=[0.0])


def test_compute_schedule_search_finds_the_step_where_features_jump(toy):
    from caching import search_compute_steps

    temb = [0.0] * 6 + [1.0] * 4  # the residual changes once, at step 6
    inputs = [dict(hidden_states=torch.zeros(1, 3, 4), temb=torch.tensor([t])) for t in temb]

    def run_fn():
        return torch.stack(drive(toy, inputs))

    reference = run_fn()
    found = search_compute_steps(toy, lambda steps: CacheConfig(IntervalTrigger(steps=steps), ResidualScope()),
                                 run_fn, reference, initial_steps=[0, 3], num_steps=10)
    assert found.steps == (0, 6) and found.fractions() == (0.0, 0.6)
    assert found.objective < found.initial_objective - 10 and found.trials >= 8
    assert torch.equal(run_fn(), reference)  # the search leaves the model bare


def test_documented_preset_defaults_are_the_code_defaults():
    import re
    from pathlib import Path

    from caching import PRESETS, preset_parameters

    rows = {}
    for line in (Path(__file__).parents[1] / "docs" / "caching.md").read_text().splitlines():
        match = re.match(r"\| `(\w+)` \|.*\| ([^|]*) \|$", line)
        if match and match.group(1) in PRESETS:
            rows[match.group(1)] = match.group(2)
    assert set(rows) == set(PRESETS)
    for name, text in rows.items():
        for key, value in re.findall(r"(\w+)=([-0-9.]+)", text):
            assert preset_parameters(name)[key] == pytest.approx(float(value)), (name, key)
