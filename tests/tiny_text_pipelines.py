"""Tiny, complete text-to-image / text-to-video diffusers pipelines with random weights, built offline.

`save_tiny_pipeline(family, folder)` builds every component of a FLUX, SD3, Wan or SDXL pipeline from
configs (text encoders, tokenizers, VAE, denoiser, the scheduler the real model ships), saves it with
`save_pretrained` (safetensors only) and returns the folder, which loads with
`DiffusionPipeline.from_pretrained(folder, use_safetensors=True)` like a user's own download.
`TINY_CALL[family]` holds call arguments that work (small sizes); `TINY_GUIDANCE[family]` turns
classifier-free guidance on (FLUX needs a negative prompt and `true_cfg_scale` for that).

Tokenizers are built offline over the fixed lower-case word list `WORDS`; other text falls back to
pieces (bytes for CLIP, characters or <unk> for T5), so any prompt tokenizes:

- CLIP (`CLIPTokenizer`, CLIP's own normalizer / pre-tokenizer: lower case, end-of-word `</w>`):
  byte-level BPE whose vocabulary is <|startoftext|> 0, <|endoftext|> 1 (which also pads, as in
  FLUX / SD3), the 256 byte-level characters, each again with `</w>`, then the merged pieces; the
  merges join each word's pieces left to right, so every word of `WORDS` is one token.
- T5 / UMT5 (`T5Tokenizer`, the tokenizers-backed class of transformers 5, which the pipelines'
  `T5TokenizerFast` / `AutoTokenizer` names resolve to): a Unigram model over <pad> 0, </s> 1,
  <unk> 2, `▁`, `▁word` for every word and single ASCII characters (low scores), no sentinels.
  No sentencepiece model is involved; `save_pretrained` writes `tokenizer.json`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Callable

import torch
from tokenizers.pre_tokenizers import ByteLevel

WORDS = ("a", "an", "the", "of", "on", "in", "with", "and", "at", "two", "three", "red", "green", "blue",
         "yellow", "white", "black", "cube", "sphere", "dog", "dogs", "cat", "cats", "bird", "tree", "house",
         "car", "city", "lake", "mountain", "sunset", "night", "photo", "painting", "portrait", "small",
         "large", "running", "sitting", "table")

CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

TINY_CALL: dict[str, dict] = {
    "flux": dict(height=32, width=32, max_sequence_length=16),
    "sd3": dict(height=32, width=32, max_sequence_length=16),
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16),
    "sdxl": dict(height=32, width=32),
}
"""Per family: call arguments that work and keep a call small (32x32 pixels, 5 frames for Wan)."""

TINY_GUIDANCE: dict[str, dict] = {
    "flux": dict(true_cfg_scale=2.0, negative_prompt="", guidance_scale=3.5),
    "sd3": dict(guidance_scale=2.0),
    "wan": dict(guidance_scale=2.0),
    "sdxl": dict(guidance_scale=2.0),
}
"""Per family: arguments that run classifier-free guidance (an unconditional / negative branch)."""

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "flux": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "proj_mlp", "proj_out"),
    "wan": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}
"""Per family: Linear module names (peft suffixes) of the transformer that `save_tiny_lora` targets.

FLUX: `transformer_blocks.N.attn.{to_q,to_k,to_v,to_out.0}` (image stream), `...attn.{add_q_proj,
add_k_proj,add_v_proj,to_add_out}` (text stream), `single_transformer_blocks.N.attn.{to_q,to_k,to_v}`,
`single_transformer_blocks.N.{proj_mlp,proj_out}` and the final `proj_out`. Wan: `blocks.N.attn1.*`
(self-attention) and `blocks.N.attn2.*` (text cross-attention) `{to_q,to_k,to_v,to_out.0}`, and
`blocks.N.ffn.net.{0.proj,2}`. Other Linear layers (not targeted): FLUX `ff.net.*`, `ff_context.net.*`,
`norm*.linear`, `x_embedder`, `context_embedder`, `time_text_embed.*`; Wan `condition_embedder.*`, `proj_out`.
"""


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level pieces (each also ending a word, `</w>`) and merges that make every word one token.

    Word by word, the BPE model of the merges so far splits the word; merges joining its pieces left
    to right are appended. Earlier words keep their single token: later merges rank below all theirs.
    """
    from tokenizers.models import BPE

    alphabet = sorted(ByteLevel.alphabet())
    pieces = [BOS, EOS] + alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
        split = [token.value for token in BPE(vocab, merges, end_of_word_suffix="</w>").tokenize(word)]
        while len(split) > 1:
            merges.append((split[0], split[1]))
            pieces.append(split[0] + split[1])
            split = [split[0] + split[1]] + split[2:]
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A byte-level BPE `CLIPTokenizer` over `WORDS` (see the module docstring), max length 77.

    Ids: <|startoftext|> 0, <|endoftext|> 1; `pad_token` pads ("!" for the second SDXL tokenizer).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A Unigram `T5Tokenizer` over `WORDS` (see the module docstring): pad 0, eos 1, unk 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -3.0) for word in WORDS]
    vocab += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_encoder(tokenizer, *, hidden: int, projection: int | None = None):
    """A 2-layer CLIP text encoder for `tokenizer`; with `projection`, a CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=projection or hidden, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(config).eval()


def _t5_encoder(tokenizer, *, d_model: int, umt5: bool = False):
    """A 2-layer T5 (or UMT5) encoder for `tokenizer` with width `d_model`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model,
                          num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                          relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          decoder_start_token_id=tokenizer.pad_token_id)
    return model_class(config).eval()


def _image_vae(*, latent_channels: int, shift_factor: float | None, scaling_factor: float):
    """A tiny AutoencoderKL with spatial factor 2: (B, 3, H, W) <-> (B, latent_channels, H / 2, W / 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         shift_factor=shift_factor, scaling_factor=scaling_factor,
                         use_quant_conv=shift_factor is None, use_post_quant_conv=shift_factor is None).eval()


def _flux():
    """FLUX.1-dev layout: CLIP-L (pooled) + T5 (sequence), guidance-embedding transformer, 2x2 packing."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=16)
    text_encoder_2 = _t5_encoder(tokenizer_2, d_model=32)
    vae = _image_vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer.eval())


def _sd3():
    """SD3 layout: two CLIPs with projection (pooled + penultimate states) and T5, MMDiT transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=16, projection=16)
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=16, projection=16)
    text_encoder_3 = _t5_encoder(tokenizer_3, d_model=32)
    vae = _image_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5305)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _wan():
    """Wan 2.1 T2V layout: UMT5 encoder, causal 3D VAE (x8 spatial, x4 temporal), WanTransformer3DModel."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32, umt5=True)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 1.0, 2.0, 0.8]).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2",
                                        predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer.eval())


def _sdxl():
    """SDXL layout: CLIP-L + CLIP-G with projection ("!" pads the second), text_time UNet, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_encoder = _clip_encoder(tokenizer, hidden=16)
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=16, projection=16)
    vae = _image_vae(latent_channels=4, shift_factor=None, scaling_factor=0.13025)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32,
                                norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
                                     scheduler=scheduler)


BUILDERS: dict[str, Callable] = {"flux": _flux, "sd3": _sd3, "wan": _wan, "sdxl": _sdxl}


def build_tiny_pipeline(family: str, seed: int = 0):
    """The tiny pipeline of `family` (a key of BUILDERS), in memory; same weights for the same seed."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family]()


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Builds the tiny `family` pipeline and saves it (safetensors weights) to `folder`; returns `folder`."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_lora(pipe, folder: Path, seed: int = 1, rank: int = 2) -> Path:
    """A random LoRA (all of LORA_TARGETS) for `pipe`'s transformer, saved by the pipeline class.

    Args:
        pipe: a loaded FLUX or Wan pipeline of this module.
        folder: where `pytorch_lora_weights.safetensors` is written.

    Returns:
        The folder, ready for `pipe.load_lora_weights(folder)`.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = {"FluxPipeline": "flux", "WanPipeline": "wan"}[type(pipe).__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        source = type(pipe.transformer).from_config(pipe.transformer.config)
        source.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS[family]),
                                      init_lora_weights=False))
    folder = Path(folder)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(source))
    return folder
