"""No host read-back on the per-step path, except one per decision of a feature-watching trigger.

Every way Python can read a tensor's value (`item`, `bool`, `float`, `int`, `tolist`, `numpy`,
`__index__`) is counted while a tiny FLUX pipeline with CFG runs a warm generation. The pipeline
reads a few CPU values once per call (its own sigmas, the walk's levels), so the counts are taken
at two step counts: what grows with the steps is per-step. On a GPU each such read is a device
synchronisation; `torch.cuda.set_sync_debug_mode("warn")` shows the same.
"""

import collections

import pytest
import torch
from tiny_pipelines import load, run

import accel
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack
from step_context import StepContext, current_step, guidance_branch, publish_step

READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "__index__")


def _reads(pipe, kwargs, steps: int) -> int:
    """Tensor reads to the host during one generation of `steps` steps (after a warm-up one)."""
    run(pipe, kwargs, steps)
    count = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            count[name] += 1
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        run(pipe, kwargs, steps)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sum(count.values())


@pytest.mark.parametrize("cache, per_step", [
    (None, 0),
    (CachePlan("fora", {"interval": 1}), 0),
    (CachePlan("taylorseer", {"interval": 3, "update": "reuse", "warmup": 0.0}), 0),
    (CachePlan("fbcache", {"threshold": 0.0}), 2),  # one decision per branch per step
    (CachePlan("teacache", {"threshold": 0.2, "coefficients": [1.0, 0.0]}), 2),
])
def test_reads_per_step_are_zero_or_one_per_feature_decision(tmp_path, cache, per_step):
    pipe, kwargs = load("flux", tmp_path)
    bare = _reads(pipe, kwargs, 8), _reads(pipe, kwargs, 16)
    assert bare[1] == bare[0]  # diffusers' own loop reads nothing per step
    accel.apply(pipe, Stack(SamplerPlan("euler", 8), cache, guidance=GuidancePlan(2.0)))
    short, long = _reads(pipe, kwargs, 8), _reads(pipe, kwargs, 16)
    assert long - short == per_step * 8
    accel.remove(pipe)


def test_current_step_reuses_the_relabelled_context():
    context = StepContext(3, 10, 0.5, 500.0)
    with publish_step(context), guidance_branch("uncond"):
        first, second = current_step(), current_step()
    assert first is second and first.branch == "uncond" and first.step_index == 3
    with publish_step(StepContext(4, 10, 0.4, 400.0)), guidance_branch("uncond"):
        assert current_step().step_index == 4  # a new published context is relabelled anew
