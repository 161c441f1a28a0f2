"""The distillation objectives wired to a tiny FLUX-architecture digit model: teacher trajectories,
a step-distillation LoRA, a cache-aware LoRA and a router, trained a few steps through the one
loop, exported, and loaded back by the stack."""

from __future__ import annotations

import pytest
import torch

import caching
from accel.distill_embedded import (build_router_objective, build_trajectory_objective,
                                    teacher_trajectories)
from accel.embedded import build_flux_digits
from accel.embedded.model import weights_fingerprint
from accel.resolve import read_trained_for
from distill.objectives.router import RouterConfig
from distill.objectives.trajectory import TrajectoryConfig
from distill.training import TrainConfig, train

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))


def tiny_model():
    return build_flux_digits(seed=0, **TINY).eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trajectories")
    return teacher_trajectories(tiny_model(), folder, count=8, steps=8, batch_size=4)


def test_teacher_trajectories_are_the_guided_euler_reference(teacher):
    import samplers
    from accel.generate import flux_digits_denoiser, sample_noise

    model = tiny_model()
    noise = sample_noise(1000, range(4), (1, 16, 16))
    final = samplers.sample(flux_digits_denoiser(model, 4.0), noise, solver="euler", steps=8, schedule="flow",
                            cond={"labels": torch.arange(4)})
    torch.testing.assert_close(teacher.states[:4, -1], final, rtol=1e-5, atol=1e-5)
    assert teacher.meta["model"] == weights_fingerprint(model)


def test_step_distill_trains_and_exports_a_loadable_adapter(teacher, tmp_path):
    model = tiny_model()
    config = TrajectoryConfig(steps=2, batch_size=4, loss="rollout")
    objective = build_trajectory_objective("step-distill", model, teacher, rank=4, config=config)
    before = float(objective.loss(0, 0).detach())
    result = train(objective, TrainConfig(steps=3, out_dir=tmp_path / "run", lr=1e-2, checkpoint_every=3))
    assert result.exported.name == "pytorch_lora_weights.safetensors"
    assert read_trained_for(result.exported) == {"solver": "euler", "steps": "2", "cache": "none"}
    assert before > 0
    fresh = tiny_model()
    fresh.transformer.load_lora_adapter(str(result.exported), prefix="transformer", adapter_name="a")
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, labels), model.velocity(x, t, labels), rtol=1e-5, atol=1e-5)


def test_cache_aware_objective_trains_through_the_cache(teacher):
    model = tiny_model()
    config = TrajectoryConfig(steps=6, batch_size=2, loss="rollout")
    objective = build_trajectory_objective("cache-aware", model, teacher, rank=4, config=config,
                                           cache="fora", cache_params={"interval": 2})
    loss = objective.loss(0, 0)
    loss.backward()
    grads = [p.grad for n, p in model.transformer.named_parameters() if "lora_B" in n]
    assert any(float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="calibrates on the model"):
        build_trajectory_objective("cache-aware", tiny_model(), teacher, rank=4, config=config, cache="teacache")


def test_uncond_reuse_student_skips_the_uncond_branch_and_records_it(teacher, tmp_path):
    model = tiny_model()
    calls = []
    model.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    config = TrajectoryConfig(steps=4, batch_size=2, loss="rollout")
    objective = build_trajectory_objective("step-distill", model, teacher, rank=4, config=config, guidance=4.0,
                                           uncond_interval=2)
    objective.loss(0, 0).backward()
    assert len(calls) == 4 + 2  # cond on every step, uncond on steps 0 and 2
    path = objective.export(tmp_path)
    assert read_trained_for(path) == {"solver": "euler", "steps": "4", "cache": "none", "uncond_interval": "2"}
    with pytest.raises(ValueError, match="needs CFG in the student"):
        build_trajectory_objective("step-distill", tiny_model(), teacher, rank=4, config=config, uncond_interval=2)


def test_router_objective_moves_gates_and_exports_a_router(teacher, tmp_path):
    model = tiny_model()
    objective = build_router_objective(model, teacher, config=RouterConfig(batch_size=2, penalty=0.5))
    loss = objective.loss(0, 0)
    loss.backward()
    grad = objective.module().logits.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    path = objective.export(tmp_path)
    spec = caching.load_router(path)
    assert spec.num_steps == 8 and spec.num_blocks == 3
    assert bool(spec.mask()[0].all())


def test_resolver_holds_a_router_to_its_solver_and_steps(teacher, tmp_path):
    from accel.native import run_info_for
    from accel.resolve import StackError, resolve
    from accel.stack import CachePlan, GuidancePlan, SamplerPlan, Stack

    model = tiny_model()
    path = build_router_objective(model, teacher, config=RouterConfig(batch_size=2)).export(tmp_path)

    def stack(solver: str, steps: int) -> Stack:
        return Stack(SamplerPlan(solver, steps), CachePlan("router", {"path": str(path)}), (), GuidancePlan(4.0))

    resolved = resolve(stack("euler", 8), run_info_for(model, stack("euler", 8)))
    assert any(line.startswith("router-trained-for") for line in resolved.decisions)
    assert resolved.stack.cache.params.get("update") is None
    for solver, steps in (("euler", 6), ("dpmpp_2m", 8)):
        with pytest.raises(StackError, match="was trained for solver=euler, steps=8"):
            resolve(stack(solver, steps), run_info_for(model, stack(solver, steps)))
