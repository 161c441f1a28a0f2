"""The tiny text-to-image / text-to-video pipelines of tests/tiny_text_pipelines.py, as a user loads them."""

import hashlib
import json

import pytest
import torch
from diffusers import DiffusionPipeline

from tiny_text_pipelines import (BUILDERS, LORA_TARGETS, TINY_CALL, TINY_GUIDANCE, WORDS, build_tiny_pipeline,
                                 save_tiny_lora, save_tiny_pipeline)

FAMILIES = sorted(BUILDERS)
PROMPTS = ["a red cube", "two dogs"]
PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline",
                  "sdxl": "StableDiffusionXLPipeline"}
OUTPUT_SHAPE = {"flux": (2, 3, 32, 32), "sd3": (2, 3, 32, 32), "sdxl": (2, 3, 32, 32), "wan": (2, 5, 3, 32, 32)}
GUIDANCE_OFF = {"flux": dict(true_cfg_scale=1.0, negative_prompt=None), "sd3": dict(guidance_scale=1.0),
                "wan": dict(guidance_scale=1.0), "sdxl": dict(guidance_scale=1.0)}


def _load(family, folder):
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline(family, folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, family, prompts=PROMPTS, steps=3, **overrides) -> torch.Tensor:
    """Images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1], guided unless `overrides` turn it off."""
    generator = [torch.Generator().manual_seed(index) for index in range(len(prompts))]
    kwargs = {**TINY_CALL[family], **TINY_GUIDANCE[family], **overrides}
    out = pipe(prompt=list(prompts), num_inference_steps=steps, generator=generator, output_type="pt", **kwargs)
    return out.frames if family == "wan" else out.images


def _digests(folder) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_holds_safetensors_only_and_reloads_every_component_bitwise(family, tmp_path):
    pipe = _load(family, tmp_path / "a")
    folder = tmp_path / "a"
    suffixes = {path.suffix for path in folder.rglob("*") if path.is_file()}
    assert suffixes == {".json", ".safetensors"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__ == PIPELINE_CLASS[family]
    built = build_tiny_pipeline(family)
    modules = {name: c for name, c in built.components.items() if isinstance(c, torch.nn.Module)}
    assert set(modules) >= {"vae", "text_encoder"} and ("unet" in modules) != ("transformer" in modules)
    for name, module in modules.items():
        assert list((folder / name).glob("*.safetensors")), name
        loaded = getattr(pipe, name).state_dict()
        assert module.state_dict().keys() == loaded.keys(), name
        assert all(torch.equal(tensor, loaded[key]) for key, tensor in module.state_dict().items()), name
    assert _digests(save_tiny_pipeline(family, tmp_path / "b")) == _digests(folder)
    assert _digests(save_tiny_pipeline(family, tmp_path / "c", seed=1)) != _digests(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_tokenizers_give_one_token_per_word_and_the_built_ids(family, tmp_path):
    pipe = _load(family, tmp_path)
    built = build_tiny_pipeline(family)
    texts = [" ".join(WORDS), "Two DOGS, running at night!", "zebra über 123", ""]
    names = [name for name in pipe.components if name.startswith("tokenizer") and pipe.components[name]]
    assert len(names) == {"flux": 2, "sd3": 3, "sdxl": 2, "wan": 1}[family]
    for name in names:
        tokenizer, reference = pipe.components[name], built.components[name]
        ids = tokenizer(texts, padding="max_length", max_length=64, truncation=True).input_ids
        assert ids == reference(texts, padding="max_length", max_length=64, truncation=True).input_ids, name
        specials = len(tokenizer(" ".join(WORDS)).input_ids) - len(WORDS)
        assert specials == (2 if type(tokenizer).__name__ == "CLIPTokenizer" else 1), name
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_condition_finite_reproducible_images(family, tmp_path):
    pipe = _load(family, tmp_path)
    images = _generate(pipe, family)
    assert images.shape == OUTPUT_SHAPE[family]
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert torch.equal(_generate(pipe, family), images)
    other = _generate(pipe, family, prompts=["a blue sphere", PROMPTS[1]])
    assert (other[0] - images[0]).abs().max() > 1e-2  # the text encoders condition the denoiser
    assert torch.equal(other[1], images[1])  # one generator and one prompt per image


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_runs_an_unconditional_branch_for_every_image_and_step(family, tmp_path):
    pipe = _load(family, tmp_path)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    rows = []

    def count(_module, args, kwargs):
        latent = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        rows.append(latent.shape[0])

    handle = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        guided = _generate(pipe, family, steps=3)
        assert sum(rows) == 3 * 2 * len(PROMPTS)
        rows.clear()
        unguided = _generate(pipe, family, steps=3, **GUIDANCE_OFF[family])
        assert sum(rows) == 3 * len(PROMPTS)
    finally:
        handle.remove()
    assert (guided - unguided).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(LORA_TARGETS))
def test_lora_loads_on_every_documented_target_and_unloads_bitwise(family, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = _load(family, tmp_path / "pipe")
    linear_names = [name for name, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in LORA_TARGETS[family]:
        assert any(name == target or name.endswith("." + target) for name in linear_names), target
    before = _generate(pipe, family)
    folder = save_tiny_lora(pipe, tmp_path / "lora")
    assert [path.name for path in folder.iterdir()] == ["pytorch_lora_weights.safetensors"]
    pipe.load_lora_weights(folder)
    adapted = {name for name, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    for target in LORA_TARGETS[family]:
        assert any(name == target or name.endswith("." + target) for name in adapted), target
    assert (_generate(pipe, family) - before).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert torch.equal(_generate(pipe, family), before)


def test_an_unknown_family_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown family 'pixart'; choose one of \['flux', 'sd3', 'sdxl', 'wan'\]"):
        save_tiny_pipeline("pixart", tmp_path)
