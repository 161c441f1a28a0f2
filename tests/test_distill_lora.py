"""distill.lora: peft LoRA per model class, saved in diffusers format with our metadata."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors import safe_open

from accel.resolve import read_trained_for
from caching.testing import TINY_MODELS, tiny_model
from distill.lora import LORA_TARGETS, add_lora, lora_state_dict, save_lora


def _randomise_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def test_saved_lora_loads_into_a_flux_pipeline_and_reproduces_the_peft_model(tmp_path):
    tiny = tiny_model("FluxTransformer2DModel", seed=3)
    inputs = tiny.inputs(2, 4, 0)
    with torch.no_grad():
        base_out = tiny.model(**inputs, return_dict=False)[0]
    add_lora(tiny.model, rank=4, alpha=2.0)  # scale alpha / r = 0.5 must survive the round trip
    _randomise_lora(tiny.model)
    with torch.no_grad():
        adapted_out = tiny.model(**inputs, return_dict=False)[0]
    assert (adapted_out - base_out).abs().max() > 1e-3
    trained_for = {"accel.solver": "euler", "accel.steps": "4", "accel.cache": "none", "accel.method": "step-distill"}
    path = save_lora(tiny.model, tmp_path / "adapter" / "step4.safetensors", metadata=trained_for)

    with safe_open(str(path), framework="pt") as handle:
        keys, header = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert header["accel.method"] == "step-distill" and header["format"] == "pt"
    assert json.loads(header["lora_adapter_metadata"])["transformer.r"] == 4
    assert read_trained_for(path) == {"solver": "euler", "steps": "4", "cache": "none"}
    assert read_trained_for(path.parent) == {"solver": "euler", "steps": "4", "cache": "none"}

    fresh = tiny_model("FluxTransformer2DModel", seed=3).model  # the same base weights, no adapter
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=fresh)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    with torch.no_grad():
        loaded_out = pipe.transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(loaded_out, adapted_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LORA_TARGETS))
def test_every_known_class_gets_lora_on_its_attention_and_only_lora_trains(name):
    assert name in TINY_MODELS
    model = tiny_model(name).model
    add_lora(model, rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_A")[0] for n in trainable if ".lora_A" in n}
    assert any(n.endswith("to_q") for n in adapted) and any(n.endswith("to_v") for n in adapted)
    assert len(lora_state_dict(model)) == len(trainable)


def test_unknown_model_class_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA targets known for Linear \(no transformer blocks found\); "
                                         r"pass targets=.*FluxTransformer2DModel"):
        add_lora(torch.nn.Linear(2, 2), rank=2)
    model = tiny_model("FluxTransformer2DModel").model
    with pytest.raises(ValueError, match="LoRA rank: 0 must be an integer >= 1"):
        add_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"match no Linear module"):
        add_lora(model, rank=2, targets=["blocks.*.nothing"])
    add_lora(model, rank=2, targets=["attn.to_q"])
    with pytest.raises(ValueError, match="must map strings to strings"):
        save_lora(model, tmp_path, metadata={"accel.steps": 4})
