"""accel.apply per pipeline call: re-resolution, calibrations per run, what remove leaves, summary, placement."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from test_stack_pipelines import Tiny, _embeds, _load, _lora

import accel
from accel.pipeline import applied
from accel.stack import AdapterPlan, CachePlan, GuidancePlan, SamplerPlan, Stack, StackError
from caching import get_cache
from caching.testing import tiny_model


def test_a_call_with_another_step_count_is_resolved_again_and_refused_the_same_way(tmp_path):
    tiny = _load("sd3", tmp_path)
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 12), CachePlan("taylorseer", {"interval": 2, "warmup": 0.0}),
                                 guidance=GuidancePlan(2.0)))
    first = tiny(12)
    record = applied(tiny.pipe)
    assert record.resolved.run.num_steps == 12 and record.resolved.stack.cache.scope is None
    tiny(8)
    assert record.resolved.run.num_steps == 8 and record.resolved.stack.cache.scope == {"kind": "blocks", "first": 1,
                                                                                           "last": 1}
    assert record.resolved.decisions[0] == "call-steps: this call runs 8 steps, the stack names 12 -> resolved for 8"
    assert any(line.startswith("step-reuse:") for line in record.resolved.decisions)
    summary = accel.summary(tiny.pipe)
    assert summary.num_steps == 8 and summary.branches[0].branch == "batched" and summary.branches[0].steps_cached
    with pytest.raises(StackError, match=r"num_inference_steps=3 .*below 4 steps no cache pays off"):
        tiny(3)
    assert record.key == (8, "batched")
    assert torch.equal(tiny(12), first)  # back to the 12-step resolution, bitwise
    accel.remove(tiny.pipe)


def test_a_self_calibrated_cache_is_kept_per_step_count(tmp_path):
    tiny = _load("flux", tmp_path)
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 12), CachePlan("magcache", {"threshold": 0.5})))
    tiny(12)  # calibrates on the first 12-step call
    tiny(16)  # another step count: a calibration of its own
    record = applied(tiny.pipe)
    ratios_12 = record.calibrated[(12, "none")]["transformer"].trigger.ratios
    assert len(ratios_12) == 12 and record.cache.runtime.calibrator is not None
    tiny(16)
    assert len(record.cache.config.trigger.ratios) == 16
    tiny(12)
    handle = applied(tiny.pipe).cache
    assert handle.config.trigger.ratios == ratios_12 and accel.summary(tiny.pipe).branches[0].steps_cached
    accel.remove(tiny.pipe)


def test_remove_leaves_the_scheduler_and_lora_the_user_added_after_apply(tmp_path):
    tiny = _load("flux", tmp_path / "pipe")
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 6), CachePlan("fora", {"interval": 2})))
    mine = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    tiny.pipe.scheduler = mine
    path = _lora(tmp_path)
    tiny.pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="mine")
    accel.remove(tiny.pipe)
    assert tiny.pipe.scheduler is mine and list(tiny.pipe.transformer.peft_config) == ["mine"]
    tiny.pipe.set_adapters(["mine"], adapter_weights=[0.5])  # still a working adapter
    assert path.endswith(".safetensors") and torch.isfinite(tiny(4)).all()


def test_remove_refuses_while_the_stacks_fused_adapters_sit_under_the_users(tmp_path):
    tiny = _load("flux", tmp_path / "pipe")
    before = tiny()
    stack_lora, user_lora = tmp_path / "stack", tmp_path / "user"
    stack_lora.mkdir()
    user_lora.mkdir()
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 8), adapters=(AdapterPlan(_lora(stack_lora), fuse=True),)))
    _lora(user_lora)
    tiny.pipe.load_lora_weights(str(user_lora), weight_name="pytorch_lora_weights.safetensors", adapter_name="mine")
    with pytest.raises(StackError, match=r"delete them first \(pipe.delete_adapters\(\['mine'\]\)\)"):
        accel.remove(tiny.pipe)
    assert applied(tiny.pipe) is not None
    tiny.pipe.delete_adapters(["mine"])
    accel.remove(tiny.pipe)
    assert torch.equal(tiny(), before)


def test_true_cfg_on_a_guidance_distilled_stack_is_resolved_as_it_runs(tmp_path):
    tiny = _load("flux", tmp_path)
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 6), CachePlan("fora", {"interval": 2}),
                                 guidance=GuidancePlan(1.0, distilled=True)))
    tiny(6)
    assert accel.summary(tiny.pipe).guidance == "none"
    negative = dict(negative_prompt_embeds=_embeds(1, 3, 16, seed=1), negative_pooled_prompt_embeds=_embeds(1, 16, seed=1))
    out = tiny.pipe(**tiny.kwargs, **negative, true_cfg_scale=2.0, num_inference_steps=6, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    summary = accel.summary(tiny.pipe)
    assert torch.isfinite(out).all() and summary.guidance == "separate"
    assert [b.branch for b in summary.branches] == ["cond", "uncond"]
    assert all(b.calls == 6 and b.steps_cached for b in summary.branches)
    assert "this call runs classifier-free guidance as well" in summary.stack
    accel.remove(tiny.pipe)


def test_apply_takes_a_recipe_name_or_path_and_checks_its_dtype(tmp_path):
    tiny = _load("flux", tmp_path / "pipe")
    with pytest.raises(StackError, match="model.dtype=bfloat16 but FluxPipeline's denoiser is float32"):
        accel.apply(tiny.pipe, "templates/flux-dev")
    assert applied(tiny.pipe) is None
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nmodel: {dtype: float32, device: cpu}\nsampler: {solver: euler, steps: 6, "
                      "schedule: flux}\ncache: {preset: fora, params: {interval: 2}}\nguidance: {scale: 1.0}\n")
    resolved = accel.apply(tiny.pipe, str(recipe))
    assert resolved.stack.sampler.steps == 6 and resolved.stack.cache.preset == "fora"
    accel.remove(tiny.pipe)


def test_summary_counts_flops_of_a_dynamically_quantized_transformer(tmp_path):
    tiny = _load("flux", tmp_path)
    stack = Stack(SamplerPlan("euler", 6), CachePlan("fora", {"interval": 2}))
    accel.apply(tiny.pipe, stack)
    tiny(6)
    float_summary = accel.summary(tiny.pipe)
    accel.remove(tiny.pipe)
    tiny.pipe.transformer = torch.ao.quantization.quantize_dynamic(tiny.pipe.transformer, {torch.nn.Linear},
                                                                  dtype=torch.qint8)
    before = tiny(6)
    accel.apply(tiny.pipe, stack)
    tiny(6)
    quantized = accel.summary(tiny.pipe)
    assert quantized.flops_full == float_summary.flops_full > 0
    assert quantized.flops_speedup == float_summary.flops_speedup > 1.2
    accel.remove(tiny.pipe)
    assert torch.equal(tiny(6), before)


def test_both_transformers_of_a_two_stage_wan_pipeline_are_cached(tmp_path):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_model("WanTransformer3DModel", seed=0).model,
                       transformer_2=tiny_model("WanTransformer3DModel", seed=1).model, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    tiny = Tiny(pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                           height=32, width=32, num_frames=5, guidance_scale=2.0))
    before = tiny(12)
    accel.apply(pipe, Stack(SamplerPlan("euler", 12), CachePlan("fora", {"interval": 2}), guidance=GuidancePlan(2.0)))
    cached = tiny(12)
    summary = accel.summary(pipe)
    assert summary.cached_models == ("transformer", "transformer_2") and torch.isfinite(cached).all()
    for model in (pipe.transformer, pipe.transformer_2):
        run = get_cache(model).stats.last_run()
        assert run.steps_cached("cond") and run.steps_computed("cond")
    assert {b.branch: b.calls for b in summary.branches} == {"cond": 12, "uncond": 12}
    accel.remove(pipe)
    assert get_cache(pipe.transformer) is None and get_cache(pipe.transformer_2) is None
    assert torch.equal(tiny(12), before)


def test_the_resolved_stack_states_the_schedule_it_derived_from_the_pipeline(tmp_path):
    tiny = _load("sd3", tmp_path)
    resolved = accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 6), guidance=GuidancePlan(2.0)))
    assert "schedule: auto -> flow, shift 3.0 (from the pipeline's FlowMatchEulerDiscreteScheduler)" in resolved.decisions
    assert "guidance: cond and uncond in one batched call" in resolved.describe()
    accel.remove(tiny.pipe)


def test_branch_mode_is_read_from_the_pipelines_call():
    import diffusers

    from accel.branch_hook import branch_mode

    modes = {name: branch_mode(getattr(diffusers, name)) for name in (
        "FluxPipeline", "WanPipeline", "StableDiffusion3Pipeline", "StableDiffusionXLPipeline", "ChromaPipeline",
        "Lumina2Pipeline")}
    assert modes == {"FluxPipeline": "named", "WanPipeline": "named", "StableDiffusion3Pipeline": "batched",
                     "StableDiffusionXLPipeline": "batched", "ChromaPipeline": "ordered", "Lumina2Pipeline": "ordered"}
