"""The distillation objectives on a tiny embedded digit pipeline (FluxDigitsPipeline saved to a folder,
trained through the same pipeline path as any user's): the teacher is the guided Euler reference,
a step-distillation LoRA, a cache-aware LoRA, a CFG-reuse student and a router, trained a few steps
through the one loop, exported, and loaded back by the stack."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import caching
from accel.embedded import build_flux_digits
from accel.resolve import read_trained_for
from accel.training.objectives import lora_objective_from_params, router_objective_from_params
from distill.training import TrainConfig, train

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
PROMPTS = [f"digit {d}" for d in range(10)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits") / "tiny-digits"
    build_flux_digits(seed=0, **TINY).save_pretrained(folder)
    return OmegaConf.create({"name": str(folder), "dtype": None, "device": None, "pipeline_kwargs": {}})


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("trajectories")


def _params(folder, **overrides):
    return {"prompts": PROMPTS, "teacher_count": 8, "teacher_steps": 8, "teacher_batch": 4, "trajectories": str(folder),
            "rank": 4, "batch_size": 4, "steps": 2, **overrides}


def test_teacher_is_the_guided_euler_reference_and_step_distill_exports_a_loadable_adapter(model, teacher_folder,
                                                                                           tmp_path):
    import samplers
    from accel.embedded.model import load_flux_digits, pack_latents, unpack_latents
    from accel.generate import flux_digits_denoiser

    objective = lora_objective_from_params("step-distill", _params(teacher_folder), 0, model)
    teacher = objective._teacher
    reference = load_flux_digits(model.name)
    noise = unpack_latents(teacher.states[:4, 0], 16, 16)
    final = samplers.sample(flux_digits_denoiser(reference, 4.0), noise, solver="euler", steps=8, schedule="flow",
                            cond={"labels": torch.arange(4)})
    torch.testing.assert_close(teacher.states[:4, -1], pack_latents(final), rtol=1e-5, atol=1e-5)
    assert teacher.meta["solver"] == "euler" and teacher.meta["guidance"] == "4"

    result = train(objective, TrainConfig(steps=3, out_dir=tmp_path / "run", lr=1e-2, checkpoint_every=3))
    assert result.exported.name == "pytorch_lora_weights.safetensors"
    assert read_trained_for(result.exported) == {"solver": "euler", "steps": "2", "cache": "none"}
    fresh = load_flux_digits(model.name)
    fresh.transformer.load_lora_adapter(str(result.exported), prefix="transformer", adapter_name="a")
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5]), torch.tensor([1, 2])
    trained = load_flux_digits(model.name)
    trained.transformer = objective.module()
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, labels), trained.velocity(x, t, labels), rtol=1e-5, atol=1e-5)


def test_cache_aware_objective_trains_through_the_cache(model, tmp_path):
    params = _params(tmp_path, steps=10, batch_size=2, cache="fora", cache_params={"interval": 2},
                     teacher_steps=10)
    objective = lora_objective_from_params("cache-aware", params, 0, model)
    objective.loss(0, 0).backward()
    grads = [p.grad for n, p in objective.module().named_parameters() if "lora_B" in n]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="calibrates on the model"):
        lora_objective_from_params("cache-aware", {**params, "cache": "teacache", "cache_params": {}}, 0, model)


def test_uncond_reuse_student_skips_the_uncond_branch_and_records_it(model, teacher_folder, tmp_path):
    params = _params(teacher_folder, steps=4, batch_size=2, student_guidance=4.0, student_uncond_interval=2)
    objective = lora_objective_from_params("step-distill", params, 0, model)
    calls = []
    objective.module().register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    objective.loss(0, 0).backward()
    assert len(calls) == 4 + 2  # cond on every step, uncond on steps 0 and 2
    path = objective.export(tmp_path)
    assert read_trained_for(path) == {"solver": "euler", "steps": "4", "cache": "none", "uncond_interval": "2"}
    with pytest.raises(ValueError, match="needs CFG in the student"):
        lora_objective_from_params("step-distill", {**params, "student_guidance": 1.0}, 0, model)


def test_router_moves_gates_exports_a_router_and_is_held_to_its_solver_and_steps(model, teacher_folder, tmp_path):
    from accel.resolve import RunInfo, StackError, resolve
    from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

    params = {k: v for k, v in _params(teacher_folder, batch_size=2, penalty=0.5).items() if k not in ("rank", "steps")}
    objective = router_objective_from_params(params, 0, model)
    objective.loss(0, 0).backward()
    grad = objective.module().logits.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    path = objective.export(tmp_path)
    spec = caching.load_router(path)
    assert spec.num_steps == 8 and spec.num_blocks == 3 and bool(spec.mask()[0].all())

    def stack(solver: str, steps: int) -> Stack:
        return Stack(SamplerPlan(solver, steps), CachePlan("router", {"path": str(path)}), (), GuidancePlan(4.0))

    def run_info_for(steps: int) -> RunInfo:  # the tiny digit transformer: 3 blocks
        return RunInfo(model_class="FluxTransformer2DModel", model_kind="transformer", prediction_type="flow",
                       num_steps=steps, guidance="separate", num_blocks=3)

    resolved = resolve(stack("euler", 8), run_info_for(8))
    assert any(line.startswith("router-trained-for") for line in resolved.decisions)
    for solver, steps in (("euler", 6), ("dpmpp_2m", 8)):
        with pytest.raises(StackError, match="was trained for solver=euler, steps=8"):
            resolve(stack(solver, steps), run_info_for(steps))
