"""accel.apply with torch.compile: a compiled transformer, compiling after apply, and compiled code reuse.

Dynamo compiles through a backend that counts graphs (`CompileCounter`, which runs them eagerly: no
C++ toolchain needed), and hitting its recompile limit is an error (instead of a silent fall-back to
eager). After three generations of different step counts (10, 12, 50) with CFG, every function of
accel's own packages holds at most 2 compiled variants (the computed and the cached path; cond and
uncond share them), and a fourth generation compiles nothing. A feature-watching decision (FBCache,
DBCache, budget) stays in the graph as a tensor that picks each block's path with `torch.cond`, and
decides exactly as the eager run does.
"""

import pytest
import torch
from tiny_pipelines import FAMILIES, denoiser, load, run
from torch._dynamo.testing import CompileCounter

import accel
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

STEPS = (10, 12, 50)


@pytest.fixture
def strict_dynamo():
    """Dynamo with its default limit, where hitting the limit raises."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    saved = config.fail_on_recompile_limit_hit
    config.fail_on_recompile_limit_hit = True
    yield
    config.fail_on_recompile_limit_hit = saved
    torch._dynamo.reset()


def _variants_of_our_functions() -> dict[str, int]:
    """Compiled variants (cache entries) of every function dynamo compiled from accel's packages."""
    from torch._dynamo.convert_frame import input_codes
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    variants = {}
    for ref in input_codes.seen:
        code = ref()
        if code is not None and any(f"/{package}/" in code.co_filename for package in OUR_PACKAGES):
            variants[f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}:{code.co_firstlineno}"] = \
                len(_debug_get_cache_entry_list(code))
    return variants


OUR_PACKAGES = ("caching", "accel", "step_context", "samplers")


def _stack(preset: str, params: dict) -> Stack:
    return Stack(SamplerPlan("euler", 10), CachePlan(preset, params), guidance=GuidancePlan(2.0))


def _graphs_per_generation(pipe, kwargs, counter: CompileCounter) -> list[int]:
    counts = []
    for steps in (*STEPS, STEPS[0]):
        run(pipe, kwargs, steps)
        counts.append(counter.frame_count)
    return counts


@pytest.mark.parametrize("family, preset, params, most_graphs", [
    ("flux", "taylorseer", {"interval": 3, "update": "reuse", "warmup": 0.0}, 2),  # whole residual
    ("flux", "fora", {"interval": 2}, 2),                    # every attention / MLP output
    ("flux", "fora", {"interval": 1}, 1),                    # computes every step: one graph
    ("flux", "deltadit", {"interval": 2}, 4),                # per block, early / late phase
    ("flux", "toca", {"interval": 3}, 2),                    # token subsets
    ("flux", "fbcache", {"threshold": 0.3}, 2),              # decides from features in the graph (torch.cond)
    ("flux", "dbcache", {"threshold": 0.3}, 2),
    ("flux", "budget", {"threshold": 0.3}, 3),               # + whether a drift was accumulated yet
    ("flux", "taylorseer", {"interval": 3, "warmup": 0.0}, 12),  # forecasts eagerly at the range exit
    ("sd3", "fora", {"interval": 2}, 2),                     # cond and uncond batched in one call
    ("sd15", "deepcache", {"interval": 2}, 2),               # a UNet's deep branch
])
def test_compiling_after_apply_reuses_compiled_code_across_step_counts(tmp_path, strict_dynamo, family, preset,
                                                                       params, most_graphs):
    pipe, kwargs = load(family, tmp_path)
    accel.apply(pipe, _stack(preset, params))
    counter = CompileCounter()
    denoiser(pipe).compile(backend=counter)
    counts = _graphs_per_generation(pipe, kwargs, counter)
    assert counts[0] == counts[-1] <= most_graphs, counts  # nothing compiled after the first generation
    variants = _variants_of_our_functions()
    assert variants and max(variants.values()) <= 2, variants
    branches = accel.summary(pipe).branches
    assert {b.branch for b in branches} == ({"cond", "uncond"} if family == "flux" else {"batched"})
    assert all(b.calls == 10 for b in branches)
    assert all(b.steps_cached for b in branches) or preset == "fora" and params["interval"] == 1
    accel.remove(pipe)


def test_compiled_cached_generation_matches_the_eager_one(tmp_path, strict_dynamo):
    pipe, kwargs = load("flux", tmp_path)
    stack = _stack("taylorseer", {"interval": 3, "update": "reuse", "warmup": 0.0})
    accel.apply(pipe, stack)
    eager = run(pipe, kwargs, 12)
    eager_summary = accel.summary(pipe)
    pipe.transformer.compile(backend=CompileCounter())
    compiled = run(pipe, kwargs, 12)
    summary = accel.summary(pipe)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert [(b.steps_computed, b.steps_cached, b.flops_computed) for b in summary.branches] == \
        [(b.steps_computed, b.steps_cached, b.flops_computed) for b in eager_summary.branches]
    assert summary.branches[0].steps_computed == (0, 3, 6, 9)


def test_apply_on_a_compiled_transformer_hooks_the_original_module_and_keeps_the_compiled_forward(
        tmp_path, strict_dynamo):
    pipe, kwargs = load("flux", tmp_path)
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    compiled = pipe.transformer
    bare = run(pipe, kwargs, 10)  # the pipeline's cache_context gives the model a hook registry already
    accel.apply(pipe, _stack("taylorseer", {"interval": 3, "update": "reuse", "warmup": 0.0}))
    assert pipe.transformer is compiled and compiled._orig_mod._diffusers_hook.hooks
    graphs_before = counter.frame_count
    counts = _graphs_per_generation(pipe, kwargs, counter)
    assert counter.frame_count > graphs_before and counts[0] == counts[-1]  # compiled with the hooks, once
    assert accel.summary(pipe).branches[0].steps_cached == (1, 2, 4, 5, 7, 8)
    accel.remove(pipe)
    assert not compiled._orig_mod._diffusers_hook.hooks and "forward" not in vars(compiled._orig_mod)
    assert torch.equal(run(pipe, kwargs, 10), bare)


TRANSFORMER_FAMILIES = [name for name, family in FAMILIES.items() if name not in ("sd15", "sdxl")]
# dynamo cannot trace their blocks inside a torch.cond branch (e.g. Flux2's attention calls inspect.signature)
TRACED_WITH_GRAPH_BREAKS = {"flux2", "hidream", "mochi"}


@pytest.mark.parametrize("family, preset", [(name, "fbcache") for name in TRANSFORMER_FAMILIES]
                         + [("flux", "dbcache"), ("flux", "budget")])
def test_a_compiled_feature_watching_cache_decides_and_computes_as_the_eager_one(tmp_path, strict_dynamo, caplog,
                                                                                  family, preset):
    pipe, kwargs = load(family, tmp_path)
    accel.apply(pipe, _stack(preset, {"threshold": 0.3}))
    eager, eager_summary = run(pipe, kwargs, 12), accel.summary(pipe)
    counter = CompileCounter()
    denoiser(pipe).compile(backend=counter)
    with caplog.at_level("WARNING", logger="caching"):
        compiled, summary = run(pipe, kwargs, 12), accel.summary(pipe)
    assert torch.equal(compiled, eager)
    computed = [(b.branch, b.steps_computed, b.flops_computed) for b in summary.branches]
    assert computed == [(b.branch, b.steps_computed, b.flops_computed) for b in eager_summary.branches]
    falls_back = "cached blocks inside torch.cond" in caplog.text
    assert falls_back == (family in TRACED_WITH_GRAPH_BREAKS)
    if not falls_back:
        assert counter.frame_count <= 5  # the model's forward in one graph (plus accel's hooks around it)


def test_a_model_whose_blocks_cannot_be_traced_in_torch_cond_falls_back_to_graph_breaks(tmp_path, strict_dynamo,
                                                                                          caplog):
    # Flux2's single-stream attention calls inspect.signature, which dynamo cannot trace in a cond branch
    pipe, kwargs = load("flux2", tmp_path)
    accel.apply(pipe, _stack("fbcache", {"threshold": 0.3}))
    eager, eager_summary = run(pipe, kwargs, 12), accel.summary(pipe)
    denoiser(pipe).compile(backend=CompileCounter())
    with caplog.at_level("WARNING", logger="caching"):
        compiled = run(pipe, kwargs, 12)
    assert "cannot trace Flux2Transformer2DModel's cached blocks inside torch.cond" in caplog.text
    assert torch.equal(compiled, eager)
    assert [b.steps_computed for b in accel.summary(pipe).branches] == \
        [b.steps_computed for b in eager_summary.branches]
