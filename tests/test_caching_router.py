"""Learned cache router (Learning-to-Cache): hard and soft gates, gradients, statistics, router files."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from caching import (CacheConfig, RouterScope, RouterTrigger, apply_cache, apply_router, get_cache, get_preset,
                     load_router, remove_cache, router_block_names, save_router)
from caching.testing import ToyTransformer, drive, run_steps, tiny_model
from step_context import StepContext, guidance_branch, new_generation, publish_step

META = {"accel.solver": "euler", "model_class": "FluxTransformer2DModel"}


@pytest.fixture(scope="module")
def flux():
    return tiny_model("FluxTransformer2DModel")


def random_mask(num_steps, num_blocks, seed=1):
    mask = torch.rand(num_steps, num_blocks, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask[0] = True
    return mask


def routed(tiny, gates, mode, num_steps, **kwargs):
    handle = apply_router(tiny.model, gates, mode)
    try:
        outputs = run_steps(tiny, num_steps, **kwargs)
    finally:
        remove_cache(tiny.model)
    return handle.stats.last_run(), outputs


def rollout(tiny, num_steps, size=4, seed=0):
    """A toy Euler trajectory with autograd on (run_steps runs under no_grad)."""
    kwargs = tiny.inputs(1, size, seed)
    generation, outputs = new_generation(), []
    for index in range(num_steps):
        sigma = 1.0 - index / num_steps
        with publish_step(StepContext(index, num_steps, sigma, sigma * 1000, generation=generation)):
            out = tiny.model(**kwargs, return_dict=False)[0]
        outputs.append(out)
        kwargs["hidden_states"] = kwargs["hidden_states"] - out / num_steps
    return outputs


def test_block_names_follow_the_layout_registry(flux):
    assert router_block_names(flux.model) == ["transformer_blocks.0", "transformer_blocks.1",
                                              "single_transformer_blocks.0", "single_transformer_blocks.1"]


def test_all_open_gates_equal_full_compute_bitwise(flux):
    reference = run_steps(flux, 5, branches=("cond", "uncond"))
    runs = {}
    for mode, gates in (("hard", torch.ones(5, 4, dtype=torch.bool)), ("soft", torch.ones(5, 4))):
        runs[mode], outputs = routed(flux, gates, mode, 5, branches=("cond", "uncond"))
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference)), mode
    assert runs["hard"].flops_speedup == 1.0 and runs["hard"].steps_computed("uncond") == [0, 1, 2, 3, 4]
    assert runs["soft"].steps_computed("uncond") == [0]  # soft steps after the first mix by their gates


@pytest.mark.parametrize("name", ["SD3Transformer2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
                                  "WanTransformer3DModel"])
def test_each_transformer_class_runs_a_router(name):
    tiny = tiny_model(name)
    reference = run_steps(tiny, 4)
    num_blocks = len(router_block_names(tiny.model))
    _, outputs = routed(tiny, torch.ones(4, num_blocks), "hard", 4)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference))
    mask = torch.ones(4, num_blocks, dtype=torch.bool)
    mask[1:, 1:] = False
    run, hard = routed(tiny, mask, "hard", 4)
    _, soft = routed(tiny, mask.float(), "soft", 4)
    assert run.flops_speedup > 1.05 and all(torch.isfinite(o).all() for o in hard)
    assert all(torch.equal(a, b) for a, b in zip(hard, soft))
    assert all(torch.equal(a, b) for a, b in zip(run_steps(tiny, 4), reference))


def test_closed_gates_reuse_the_residual_of_the_first_step():
    model = ToyTransformer(dim=4, num_blocks=2, kind="square").eval()
    x0, x1, x2 = (torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(s)) for s in range(3))
    inputs = [dict(hidden_states=x, temb=torch.zeros(1)) for x in (x0, x1, x2)]
    apply_router(model, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]), "hard")
    outputs = drive(model, inputs)
    remove_cache(model)
    r0, r1 = x0 ** 2 - x0, (x0 ** 2) ** 2 - x0 ** 2  # each block's residual at step 0
    assert torch.equal(outputs[0], (x0 ** 2) ** 2)
    assert torch.equal(outputs[1], (x1 + r0) + r1)
    assert torch.equal(outputs[2], (x2 + r0) + r1)


def test_closed_flux_block_returns_input_plus_both_stored_residuals(flux):
    block = flux.model.transformer_blocks[0]
    seen = []
    hook = block.register_forward_hook(lambda m, a, kw, out: seen.append((kw["hidden_states"],
                                                                         kw["encoder_hidden_states"], out)),
                                       with_kwargs=True)
    gates = torch.zeros(3, 4)
    gates[0] = 1.0
    try:
        routed(flux, gates, "hard", 3)
    finally:
        hook.remove()
    (hidden0, encoder0, (encoder_out0, hidden_out0)), (hidden1, encoder1, (encoder_out1, hidden_out1)) = seen[:2]
    assert torch.equal(hidden_out1, hidden1 + (hidden_out0 - hidden0))
    assert torch.equal(encoder_out1, encoder1 + (encoder_out0 - encoder0))
    assert not torch.equal(hidden1, hidden0)


def test_hard_mask_equals_soft_zero_one_gates(flux):
    mask = random_mask(6, 4)
    run, hard = routed(flux, mask, "hard", 6, branches=("cond", "uncond"))
    _, soft = routed(flux, mask.float(), "soft", 6, branches=("cond", "uncond"))
    assert all(torch.equal(a, b) for a, b in zip(hard, soft))
    assert run.steps_cached("cond") == [i for i in range(6) if not mask[i].all()]


@pytest.mark.parametrize("detach_cache", [True, False])
def test_soft_gates_receive_finite_gradients(flux, detach_cache):
    logits = torch.nn.Parameter(torch.full((4, 4), 2.0))
    optimizer = torch.optim.SGD([logits], lr=0.1)
    flux.model.requires_grad_(False)  # frozen base weights, as in training
    handle = apply_router(flux.model, lambda: torch.sigmoid(logits), "soft", detach_cache=detach_cache)
    try:
        for _ in range(2):  # two training steps: each call sees the current parameter
            optimizer.zero_grad()
            outputs = rollout(flux, 4)
            loss = sum(o.square().mean() for o in outputs)
            loss.backward()
            assert torch.isfinite(logits.grad).all()
            assert torch.equal(logits.grad[0], torch.zeros(4))  # the first step always computes
            assert (logits.grad[1:] != 0).all()
            optimizer.step()
    finally:
        remove_cache(flux.model)
        flux.model.requires_grad_(True)
    assert handle.stats.last_run().steps_computed() == [0] and len(handle.stats.runs) == 2


def test_soft_gates_train_block_weights_too(flux):
    flux.model.requires_grad_(False)
    weight = flux.model.single_transformer_blocks[1].proj_out.weight.requires_grad_(True)  # a LoRA stand-in
    gates = torch.full((3, 4), 0.5, requires_grad=True)
    apply_router(flux.model, gates, "soft")
    try:
        rollout(flux, 3)[-1].square().mean().backward()
        weight_grad = weight.grad
    finally:
        remove_cache(flux.model)
        flux.model.requires_grad_(True)
        weight.grad = None
    assert (gates.grad[1:] != 0).all() and torch.isfinite(weight_grad).all() and weight_grad.abs().sum() > 0


def test_counted_flops_match_the_flop_counter(flux):
    mask = random_mask(6, 4, seed=3)
    with FlopCounterMode(display=False) as full:
        run_steps(flux, 6)
    handle = apply_router(flux.model, mask, "hard")
    with FlopCounterMode(display=False) as counter:
        run_steps(flux, 6)
    remove_cache(flux.model)
    run = handle.stats.last_run()
    assert run.flops_full == full.get_total_flops()
    assert run.flops_computed == counter.get_total_flops()
    names = router_block_names(flux.model)
    for step in range(6):
        assert run.units_skipped(step) == tuple(n for n, on in zip(names, mask[step].tolist()) if not on)
    assert run.flops_speedup > 1.1


def test_router_file_round_trip_and_preset(flux, tmp_path):
    gates = torch.rand(5, 4, generator=torch.Generator().manual_seed(2))
    gates[0] = 0.1  # forced to compute anyway
    path = save_router(tmp_path / "router.safetensors", gates, {**META, "note": "trained"})
    spec = load_router(path)
    assert torch.equal(spec.gates, gates) and spec.gates.dtype == torch.float32
    assert spec.metadata == {**META, "note": "trained", "accel.steps": "5", "num_blocks": "4",
                             "accel.cache": "router", "threshold": "0.5"}
    assert spec.num_steps == 5 and spec.num_blocks == 4 and spec.solver == "euler"
    mask = spec.mask(0.5)
    assert mask[0].all() and torch.equal(mask[1:], gates[1:] >= 0.5)
    assert spec.mask(0.0).all()
    _, direct = routed(flux, mask, "hard", 5)
    handle = apply_cache(flux.model, get_preset("router", path=str(path)))
    from_file = run_steps(flux, 5)
    json.dumps(handle.describe())
    remove_cache(flux.model)
    assert all(torch.equal(a, b) for a, b in zip(direct, from_file))
    config = get_preset("router", path=str(path), threshold=0.0)
    assert config.trigger.threshold == 0.0 and all(all(row) for row in config.trigger.mask)


def test_errors_name_the_numbers_and_the_fix(flux, tmp_path):
    apply_router(flux.model, torch.ones(6, 4), "hard")
    with pytest.raises(ValueError, match=r"6 steps but this run has 5 steps.*run with 6 steps"):
        run_steps(flux, 5)
    remove_cache(flux.model)
    with pytest.raises(ValueError, match=r"gates for 3 blocks but FluxTransformer2DModel has 4 \(2 "
                                         r"transformer_blocks \+ 2 single_transformer_blocks\)"):
        apply_router(flux.model, torch.ones(6, 3), "hard")
    assert get_cache(flux.model) is None
    with pytest.raises(ValueError, match="needs path="):
        get_preset("router")
    with pytest.raises(ValueError, match="not found"):
        get_preset("router", path=str(tmp_path / "missing.safetensors"))
    save_file({"lora.weight": torch.ones(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'gates'"):
        load_router(tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="lacks model_class"):
        save_router(tmp_path / "r.safetensors", torch.ones(2, 4), {"accel.solver": "euler"})
    with pytest.raises(ValueError, match="accel.steps='3' disagrees"):
        save_router(tmp_path / "r.safetensors", torch.ones(2, 4), {**META, "accel.steps": 3})
    with pytest.raises(ValueError, match="probabilities in"):
        apply_router(flux.model, torch.full((2, 4), 3.0), "soft")
    with pytest.raises(ValueError, match="mode='fast'"):
        apply_router(flux.model, torch.ones(2, 4), "fast")
    with pytest.raises(ValueError, match="threshold=1.5"):
        apply_router(flux.model, torch.ones(2, 4), "hard", threshold=1.5)
    soft_taylor = CacheConfig(RouterTrigger(torch.ones(2, 4), mode="soft"), RouterScope(),
                              update=get_preset("taylorseer").update)
    with pytest.raises(ValueError, match="update='reuse'"):
        apply_cache(flux.model, soft_taylor)
    with pytest.raises(ValueError, match="trained for SD3Transformer2DModel"):
        apply_cache(flux.model, CacheConfig(RouterTrigger(torch.ones(2, 4), model_class="SD3Transformer2DModel"),
                                            RouterScope()))
    with pytest.raises(ValueError, match="gates transformer blocks"):
        router_block_names(tiny_model("UNet2DModel").model)
    assert get_cache(flux.model) is None


def test_branch_states_are_separate(flux):
    mask = random_mask(4, 4, seed=5)
    cond_inputs = [flux.inputs(1, 4, seed) for seed in range(4)]
    uncond_inputs = [flux.inputs(1, 4, seed + 10) for seed in range(4)]

    def run(branches):
        apply_router(flux.model, mask, "hard")
        generation, outputs = new_generation(), {b: [] for b in branches}
        with torch.no_grad():
            for index in range(4):
                for branch in branches:
                    kwargs = (cond_inputs if branch == "cond" else uncond_inputs)[index]
                    with publish_step(StepContext(index, 4, 1.0, 1000.0, generation=generation)), \
                            guidance_branch(branch):
                        outputs[branch].append(flux.model(**kwargs, return_dict=False)[0])
        remove_cache(flux.model)
        return outputs

    both = run(("cond", "uncond"))
    assert all(torch.equal(a, b) for a, b in zip(both["cond"], run(("cond",))["cond"]))
    assert all(torch.equal(a, b) for a, b in zip(both["uncond"], run(("uncond",))["uncond"]))


def test_state_resets_between_generations(flux):
    mask = random_mask(5, 4, seed=7)
    handle = apply_router(flux.model, mask, "hard")
    run_steps(flux, 5, seed=1)
    second = run_steps(flux, 5, seed=2, size=3)
    handle.reset()
    third = run_steps(flux, 5, seed=2, size=3)
    remove_cache(flux.model)
    _, fresh = routed(flux, mask, "hard", 5, seed=2, size=3)
    assert all(torch.equal(a, b) for a, b in zip(second, fresh))
    assert all(torch.equal(a, b) for a, b in zip(third, fresh))
    assert len(handle.stats.runs) == 3


def test_later_stages_follow_their_step_and_do_not_refresh():
    model = ToyTransformer(dim=4, num_blocks=2, kind="square").eval()
    inputs = [dict(hidden_states=torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(s)),
                   temb=torch.zeros(1)) for s in range(4)]
    mask = torch.tensor([[True, True], [False, True], [True, False], [False, False]])
    apply_router(model, mask, "hard")
    single = drive(model, inputs)
    twice = drive(model, inputs, stages=2)
    run = get_cache(model).stats.last_run()
    remove_cache(model)
    assert all(torch.equal(a, b) for a, b in zip(single, twice[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(twice[0::2], twice[1::2]))
    assert [c.skipped for c in run.calls if c.step == 3] == [(("blocks.0", 1.0), ("blocks.1", 1.0))] * 2


def test_removal_restores_the_model_exactly(flux):
    before_attributes = {name: set(vars(m)) for name, m in flux.model.named_modules()}
    before = run_steps(flux, 4)
    for mode, gates in (("hard", random_mask(4, 4)), ("soft", torch.full((4, 4), 0.3))):
        apply_router(flux.model, gates, mode)
        cached = run_steps(flux, 4)
        remove_cache(flux.model)
        assert not all(torch.equal(a, b) for a, b in zip(before, cached)), mode
    assert {name: set(vars(m)) for name, m in flux.model.named_modules()} == before_attributes
    assert all(torch.equal(a, b) for a, b in zip(run_steps(flux, 4), before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_router_does_not_sync():
    model = ToyTransformer(dim=4, num_blocks=3, kind="mlp").cuda().eval()
    inputs = [dict(hidden_states=torch.randn(2, 5, 4, device="cuda"), temb=torch.zeros(2, device="cuda"))
              for _ in range(5)]
    logits = torch.nn.Parameter(torch.zeros(5, 3, device="cuda"))
    for mode, gates in (("hard", random_mask(5, 3).cuda()), ("soft", lambda: torch.sigmoid(logits))):
        handle = apply_router(model, gates, mode, count_flops=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            generation, outputs = new_generation(), []
            for index, kwargs in enumerate(inputs):
                with publish_step(StepContext(index, 5, 1.0, 1000.0, generation=generation)):
                    outputs.append(model(**kwargs)[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
            remove_cache(model)
        assert outputs[-1].is_cuda and handle.stats.last_run().steps_computed()[0] == 0, mode
    sum(o.square().sum() for o in outputs).backward()
    assert logits.grad.is_cuda and torch.isfinite(logits.grad).all() and (logits.grad[1:] != 0).all()
