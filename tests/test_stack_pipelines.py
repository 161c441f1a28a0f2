"""accel.apply / accel.remove on tiny random-weight diffusers pipelines, saved and loaded offline."""

import logging
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, PixArtAlphaPipeline,
                       PNDMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline, WanPipeline)
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

import accel
from accel.pipeline import applied
from accel.recipe.schema import Recipe
from accel.stack import AdapterPlan, CachePlan, GuidancePlan, SamplerPlan, Stack, StackError
from caching import get_cache
from caching.testing import tiny_model


def _embeds(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Tiny:
    """A tiny pipeline and the keyword arguments of one call (latents out, no text encoders)."""

    pipe: Any
    kwargs: dict

    def __call__(self, steps: int = 8) -> torch.Tensor:
        out = self.pipe(**self.kwargs, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images


def _flux():
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=tiny_model("FluxTransformer2DModel").model)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), pooled_prompt_embeds=_embeds(1, 16), height=32, width=32)


def _sd3():
    pipe = StableDiffusion3Pipeline(transformer=tiny_model("SD3Transformer2DModel").model,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), pooled_prompt_embeds=_embeds(1, 16),
                      negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      negative_pooled_prompt_embeds=_embeds(1, 16, seed=1), height=32, width=32, guidance_scale=2.0)


def _pixart():
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=DDIMScheduler(),
                               transformer=tiny_model("PixArtTransformer2DModel").model)
    return pipe, dict(prompt=None, negative_prompt=None, prompt_embeds=_embeds(1, 3, 16),
                      prompt_attention_mask=torch.ones(1, 3), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      negative_prompt_attention_mask=torch.ones(1, 3), height=32, width=32, guidance_scale=2.0,
                      use_resolution_binning=False)


def _wan():
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_model("WanTransformer3DModel").model)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      height=32, width=32, num_frames=5, guidance_scale=2.0)


def _sd():
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None,
                                   unet=tiny_model("UNet2DConditionModel").model,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe, dict(prompt_embeds=_embeds(1, 3, 16), negative_prompt_embeds=_embeds(1, 3, 16, seed=1),
                      height=32, width=32, guidance_scale=2.0)


BUILDERS: dict[str, Callable] = {"flux": _flux, "sd3": _sd3, "pixart": _pixart, "wan": _wan, "sd": _sd}


def _load(kind: str, folder) -> Tiny:
    """Builds the tiny pipeline, saves it with save_pretrained and loads it back with from_pretrained."""
    pipe, kwargs = BUILDERS[kind]()
    pipe.save_pretrained(folder)
    absent = {name: None for name, component in pipe.components.items() if component is None}
    pipe = type(pipe).from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return Tiny(pipe, kwargs)


def _flops(tiny: Tiny, steps: int = 8) -> tuple[torch.Tensor, int]:
    with FlopCounterMode(display=False) as counter:
        out = tiny(steps)
    return out, counter.get_total_flops()


def _state(tiny: Tiny) -> tuple:
    """What apply may change and remove must restore: scheduler, config, attribute names, hooks."""
    denoiser = getattr(tiny.pipe, "transformer", None) or tiny.pipe.unet
    params = {name: p.clone() for name, p in denoiser.named_parameters()}
    modules = tuple(type(m).__name__ for m in denoiser.modules())
    return (tiny.pipe.scheduler, dict(tiny.pipe.config), set(vars(tiny.pipe)), set(vars(denoiser)), modules), params


# kind: (solver, cache preset and params, guidance scale, cache branches, a decision apply must make)
CASES = {
    "flux": ("heun", "fora", {"interval": 2}, 1.0, {"cond"}, "prediction: flow (flow) fits heun"),
    "sd3": ("euler", "taylorseer", {"interval": 2, "warmup": 0.0}, 2.0, {"batched"}, "step-reuse:"),
    "pixart": ("ddim", "deltadit", {}, 2.0, {"batched"}, "guidance-branches: cond and uncond in one batched call"),
    "wan": ("dpmpp_3m", "fora", {"interval": 2}, 2.0, {"cond", "uncond"}, "guidance-branches: cond and uncond are sep"),
    "sd": ("unipc_bh2", "deepcache", {"interval": 2}, 2.0, {"batched"}, "multistep-forecast: unipc_bh2"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_apply_caches_with_fewer_flops_and_remove_restores_bitwise(kind, tmp_path):
    solver, preset, params, scale, branches, decision = CASES[kind]
    tiny = _load(kind, tmp_path)
    before = tiny()
    state, params_before = _state(tiny)

    accel.apply(tiny.pipe, Stack(SamplerPlan(solver, 6), None, guidance=GuidancePlan(scale)))
    _, flops_full = _flops(tiny, 6)
    accel.remove(tiny.pipe)

    resolved = accel.apply(tiny.pipe, Stack(SamplerPlan(solver, 6), CachePlan(preset, params),
                                            guidance=GuidancePlan(scale)))
    assert any(line.startswith(decision) for line in resolved.decisions), resolved.decisions
    assert type(tiny.pipe.scheduler).__name__ == "AccelScheduler" and tiny.pipe.scheduler is not state[0]
    cached, flops_cached = _flops(tiny, 6)
    run = applied(tiny.pipe).cache.stats.last_run()
    assert {call.branch for call in run.calls} == branches and run.steps_cached()
    assert flops_cached < flops_full
    assert torch.equal(tiny(6), cached)  # the cache starts afresh on every pipeline call
    accel.remove(tiny.pipe)

    after_state, params_after = _state(tiny)
    assert after_state == state and all(torch.equal(params_before[k], v) for k, v in params_after.items())
    denoiser = getattr(tiny.pipe, "transformer", None) or tiny.pipe.unet
    assert get_cache(denoiser) is None
    assert not hasattr(denoiser, "_diffusers_hook") or not denoiser._diffusers_hook.hooks
    assert torch.equal(tiny(), before)


def _lora(folder, **metadata) -> str:
    """A random LoRA on a second tiny FLUX transformer, saved in diffusers format (optionally with metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_model("FluxTransformer2DModel", seed=1).model
    source.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                  init_lora_weights=False))
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(source))
    path = folder / "pytorch_lora_weights.safetensors"
    if metadata:
        save_file(load_file(path), path, metadata={f"accel.{k}": str(v) for k, v in metadata.items()})
    return str(path)


@pytest.mark.parametrize("fuse", [True, False])
def test_lora_loads_fuses_before_calibration_and_unloads_bitwise(fuse, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    tiny = _load("flux", tmp_path / "pipe")
    path = _lora(tmp_path)
    before = tiny()
    state, params_before = _state(tiny)
    stack = Stack(SamplerPlan("euler", 12), CachePlan("teacache", {"threshold": 0.3}),
                  (AdapterPlan(path, scale=0.5, fuse=fuse),))
    resolved = accel.apply(tiny.pipe, stack)
    action = "fuse" if fuse else "activate"
    assert (f"adapter-order: load pytorch_lora_weights.safetensors -> {action} -> install teacache; teacache "
            f"calibrates on the first generation, with the adapters {action}d") in resolved.decisions
    layers = {name: m for name, m in tiny.pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    assert layers and all(bool(layer.merged) == fuse for layer in layers.values())
    name, layer = next(iter(layers.items()))
    assert layer.active_adapters == ["accel_0"] and layer.scaling["accel_0"] == 0.5
    assert torch.equal(layer.get_base_layer().weight, params_before[f"{name}.weight"]) != fuse
    handle = applied(tiny.pipe).cache
    assert handle.runtime.calibrator is not None
    tiny(12)  # runs in full and calibrates TeaCache on the adapted model
    tiny(12)
    assert handle.runtime.calibrator is None and handle.config.trigger.coefficients is not None
    accel.remove(tiny.pipe)
    after_state, params_after = _state(tiny)
    assert after_state == state and all(torch.equal(params_before[k], v) for k, v in params_after.items())
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny.pipe.transformer.modules())
    assert torch.equal(tiny(), before)


def test_adapter_trained_for_another_stack_leaves_the_pipeline_untouched(tmp_path):
    tiny = _load("flux", tmp_path / "pipe")
    scheduler = tiny.pipe.scheduler
    path = _lora(tmp_path, solver="dpmpp_2m", steps=4)
    with pytest.raises(StackError, match="was trained for solver=dpmpp_2m, steps=4"):
        accel.apply(tiny.pipe, Stack(SamplerPlan("dpmpp_2m", 8), adapters=(AdapterPlan(path),)))
    assert tiny.pipe.scheduler is scheduler and applied(tiny.pipe) is None
    assert getattr(tiny.pipe.transformer, "peft_config", None) is None
    resolved = accel.apply(tiny.pipe, Stack(SamplerPlan("dpmpp_2m", 4), adapters=(AdapterPlan(path),)))
    assert any(line.endswith("-> matches") for line in resolved.decisions)
    accel.remove(tiny.pipe)


def test_uncond_reuse_skips_uncond_calls_where_the_pipeline_calls_branches_separately(tmp_path):
    tiny = _load("wan", tmp_path)
    before = tiny()
    calls = []  # computed transformer calls, seen by the first block
    handle = tiny.pipe.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 6), guidance=GuidancePlan(2.0, uncond_interval=2)))
    reused, flops_reused = _flops(tiny, 6)
    hook = applied(tiny.pipe).branch_hook
    assert len(calls) == 6 + 3 and hook.reused_calls == 3 and torch.isfinite(reused).all()
    accel.remove(tiny.pipe)
    calls.clear()
    accel.apply(tiny.pipe, Stack(SamplerPlan("euler", 6), guidance=GuidancePlan(2.0)))
    full, flops_full = _flops(tiny, 6)
    assert len(calls) == 12 and flops_reused < flops_full and not torch.equal(full, reused)
    accel.remove(tiny.pipe)
    handle.remove()
    assert torch.equal(tiny(), before)


def test_uncond_reuse_and_lora_are_refused_where_the_pipeline_cannot_do_them(tmp_path):
    tiny = _load("pixart", tmp_path / "pipe")
    with pytest.raises(StackError, match="PixArtAlphaPipeline: it evaluates cond and uncond in one batched call"):
        accel.apply(tiny.pipe, Stack(SamplerPlan("ddim", 8), guidance=GuidancePlan(2.0, uncond_interval=2)))
    with pytest.raises(StackError, match="PixArtAlphaPipeline: this pipeline cannot load LoRA"):
        accel.apply(tiny.pipe, Stack(SamplerPlan("ddim", 8), adapters=(AdapterPlan(_lora(tmp_path)),)))
    with pytest.raises(StackError, match="schedule 'flow' is for flow models"):
        accel.apply(tiny.pipe, Stack(SamplerPlan("ddim", 8, schedule="flow")))
    assert type(tiny.pipe.scheduler).__name__ == "DDIMScheduler" and applied(tiny.pipe) is None


def test_apply_takes_a_recipe_once_and_remove_without_apply_warns(tmp_path, caplog):
    tiny = _load("sd3", tmp_path)
    recipe = OmegaConf.structured(Recipe())
    recipe.sampler.solver, recipe.sampler.steps, recipe.sampler.schedule = "dpmpp_2m", 6, "sd3"
    recipe.cache.preset, recipe.guidance.scale = "fora", 2.0
    resolved = accel.apply(tiny.pipe, recipe)
    assert resolved.stack.sampler == SamplerPlan("dpmpp_2m", 6, "sd3") and tiny.pipe.scheduler.schedule_name == "sd3"
    assert resolved.stack.cache == CachePlan("fora", {"update": "taylor", "order": 1})
    with pytest.raises(StackError, match="already has a stack applied"):
        accel.apply(tiny.pipe, recipe)
    accel.remove(tiny.pipe)
    with caplog.at_level(logging.WARNING, logger="accel"):
        accel.remove(tiny.pipe)
    assert "has no stack applied" in caplog.text
