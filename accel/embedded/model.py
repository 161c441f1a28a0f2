"""The embedded FLUX-architecture digit model: a real `FluxTransformer2DModel` plus a class conditioner.

A 16x16 one-channel image is packed FLUX-style into 2x2 patches, giving 64 image tokens of 4
channels. A class label (0-9, or the null class 10 for the unconditional branch of
classifier-free guidance) maps to text-like conditioning tokens and a pooled vector, exactly the
two inputs a FLUX transformer takes from its text encoders. The objective is rectified flow:
x_t = (1 - t) x_0 + t noise, and the transformer predicts the velocity noise - x_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from accel.data_files import EMBEDDED_WEIGHTS_DIR

NULL_CLASS = 10
WEIGHTS_DIR = EMBEDDED_WEIGHTS_DIR  # inside the installed package: read-only
FLUX_DIGITS_DIR = WEIGHTS_DIR / "flux-digits"

DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


class ClassConditioner(ModelMixin, ConfigMixin):
    """Maps class labels to FLUX conditioning: text-like tokens and a pooled vector.

    Args:
        num_classes: number of real classes; index `num_classes` is the null (uncond) class.
        num_tokens: conditioning tokens per label (the "prompt length").
        token_dim: width of each token (the transformer's joint_attention_dim).
        pooled_dim: width of the pooled vector (the transformer's pooled_projection_dim).
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, num_tokens: int = 4, token_dim: int = 64,
                 pooled_dim: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(num_classes + 1, num_tokens * token_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) -> (encoder_hidden_states (B, T, D), pooled_projections (B, P))."""
        batch = labels.shape[0]
        tokens = self.tokens(labels).view(batch, self.config.num_tokens, self.config.token_dim)
        return tokens, self.pooled(labels)


def pack_latents(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch packing."""
    batch, channels, height, width = images.shape
    x = images.view(batch, channels, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of `pack_latents`."""
    batch, _, packed = tokens.shape
    channels = packed // 4
    x = tokens.view(batch, height // 2, width // 2, channels, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX positional ids (H/2 * W/2, 3) for the packed image tokens: (0, row, col)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(grid.shape[0], 1, device=device, dtype=dtype), grid], dim=1)


@dataclass
class FluxDigits:
    """The embedded flow model: transformer, conditioner and the image geometry.

    Call `velocity(x, t, labels)` with x (B, 1, H, W) and t (B,) in [0, 1].
    """

    transformer: FluxTransformer2DModel
    conditioner: ClassConditioner
    resolution: int = 16
    prediction_type: str = "flow"

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted flow velocity (B, 1, H, W) for images x (B, 1, H, W) at times t (B,)."""
        tokens, pooled = self.conditioner(labels)
        height, width = x.shape[-2:]
        img_ids = image_ids(height, width, device=x.device, dtype=x.dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t.to(x.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def to(self, device=None, dtype=None) -> "FluxDigits":
        self.transformer.to(device=device, dtype=dtype)
        self.conditioner.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "FluxDigits":
        self.transformer.eval()
        self.conditioner.eval()
        return self

    def as_pipeline(self):
        """The model as a `FluxDigitsPipeline` (sharing these modules) with its shipped scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from accel.embedded.pipeline import FluxDigitsPipeline

        return FluxDigitsPipeline(self.transformer, self.conditioner, FlowMatchEulerDiscreteScheduler(shift=1.0))

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes a pipeline folder: `model_index.json`, `transformer/`, `conditioner/` (safetensors +
        config) and `scheduler/`, loadable with `FluxDigitsPipeline.from_pretrained` or as `model.name`."""
        self.as_pipeline().save_pretrained(Path(folder))


def weights_fingerprint(model: FluxDigits, algorithm: str = "sha256") -> str:
    """A short hash of the transformer's and conditioner's weights (names and bytes)."""
    import hashlib

    digest = hashlib.new(algorithm)
    for module in (model.transformer, model.conditioner):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def build_flux_digits(seed: int = 0, **overrides) -> FluxDigits:
    """A freshly initialised (random-weight) embedded model."""
    torch.manual_seed(seed)
    config = {**DEFAULT_TRANSFORMER_CONFIG, **overrides}
    transformer = FluxTransformer2DModel(**config)
    conditioner = ClassConditioner(token_dim=config["joint_attention_dim"],
                                   pooled_dim=config["pooled_projection_dim"])
    return FluxDigits(transformer=transformer, conditioner=conditioner)


def load_flux_digits(folder: str | Path = FLUX_DIGITS_DIR, device: str = "cpu") -> FluxDigits:
    """Loads the embedded model with diffusers' `from_pretrained` (safetensors only)."""
    folder = Path(folder)
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded model at {folder}: train it with `python scripts/train_embedded.py`")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", use_safetensors=True)
    conditioner = ClassConditioner.from_pretrained(folder / "conditioner", use_safetensors=True)
    return FluxDigits(transformer=transformer, conditioner=conditioner).to(device).eval()
