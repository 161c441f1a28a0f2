"""Caches on quantized and offloaded pipelines: they cache, count FLOPs as on the float model, remove exactly.

Quantization: torch's dynamic int8 (`quantize_dynamic`, counted through `caching.flops`), and
torchao's int8 weight-only tensors when torchao is installed (not a dependency). Offloading:
diffusers' model offload (accelerate hooks on every component) and group offloading at block and
leaf level (diffusers hooks on the transformer, beside ours), here with the CPU as both devices.
"""

import pytest
import torch
from tiny_pipelines import load, run

import accel
from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

STACK = Stack(SamplerPlan("euler", 8), CachePlan("fora", {"interval": 2}), guidance=GuidancePlan(2.0))


def _summary_numbers(pipe) -> list[tuple]:
    return [(b.branch, b.steps_computed, b.steps_cached, b.units_skipped, b.flops_full, b.flops_computed)
            for b in accel.summary(pipe).branches]


@pytest.fixture
def float_reference(tmp_path):
    """(uncached output, cached output, summary numbers) of the float pipeline."""
    pipe, kwargs = load("flux", tmp_path / "float")
    plain = run(pipe, kwargs, 8)
    accel.apply(pipe, STACK)
    cached = run(pipe, kwargs, 8)
    numbers = _summary_numbers(pipe)
    accel.remove(pipe)
    return plain, cached, numbers


def _check(pipe, kwargs, float_numbers) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies, runs and removes the stack; returns (output before apply, cached output)."""
    before = run(pipe, kwargs, 8)
    accel.apply(pipe, STACK)
    cached = run(pipe, kwargs, 8)
    assert _summary_numbers(pipe) == float_numbers
    accel.remove(pipe)
    assert torch.equal(run(pipe, kwargs, 8), before)
    assert not torch.equal(cached, before)
    return before, cached


def test_dynamic_int8_transformer_caches_counts_and_restores(tmp_path, float_reference):
    pipe, kwargs = load("flux", tmp_path / "int8")
    pipe.transformer = torch.ao.quantization.quantize_dynamic(pipe.transformer, {torch.nn.Linear}, dtype=torch.qint8)
    before, cached = _check(pipe, kwargs, float_reference[2])
    assert torch.isfinite(cached).all() and not torch.equal(before, float_reference[0])  # int8 is not float


def test_torchao_int8_weight_only_transformer_caches_counts_and_restores(tmp_path, float_reference):
    quantization = pytest.importorskip("torchao.quantization")
    pipe, kwargs = load("flux", tmp_path / "ao")
    quantization.quantize_(pipe.transformer, quantization.Int8WeightOnlyConfig())
    _check(pipe, kwargs, float_reference[2])


@pytest.mark.parametrize("offload", ["model", "group-block", "group-leaf"])
def test_offloaded_pipeline_caches_counts_and_restores_exactly(tmp_path, float_reference, offload):
    pipe, kwargs = load("flux", tmp_path / offload)
    cpu = torch.device("cpu")
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        level = offload.split("-")[1]
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=f"{level}_level",
                                              **({"num_blocks_per_group": 1} if level == "block" else {}))
    hooks_before = _diffusers_hooks(pipe.transformer)
    before, cached = _check(pipe, kwargs, float_reference[2])
    assert torch.equal(before, float_reference[0]) and torch.equal(cached, float_reference[1])
    assert _diffusers_hooks(pipe.transformer) == hooks_before  # the offloading hooks stay, ours are gone


def _diffusers_hooks(model: torch.nn.Module) -> dict[str, list[str]]:
    return {name: list(module._diffusers_hook.hooks) for name, module in model.named_modules()
            if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks}
