"""The embedded epsilon-prediction digit model: a diffusers `UNet2DModel` trained with the DDPM objective.

It sees the same data as the flow model (16x16 one-channel digits in [-1, 1]) and is
class-conditional through `num_class_embeds` (0-9, and the null class 10 for the unconditional
branch of classifier-free guidance). The noise schedule is SD's 1000-step scaled-linear betas, so
the model is a miniature of the epsilon/VP family (SD 1.x, SDXL) for epsilon-family solvers and
UNet caches (DeepCache). Train it with `python scripts/train_embedded_unet.py`.

Its weights folder is a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`), which
loads as a `UNetDigitsPipeline` (`accel/embedded/unet_pipeline.py`) with its shipped scheduler,
DDIM on trailing timesteps (`SHIPPED_SCHEDULER`), or as a `UNetDigits` with `load_unet_digits`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

import samplers
from accel.embedded.model import NULL_CLASS, WEIGHTS_DIR
from samplers.denoiser import VPSchedule

UNET_DIGITS_DIR = WEIGHTS_DIR / "unet-digits"

DEFAULT_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=16,
    num_class_embeds=NULL_CLASS + 1,
)
DEFAULT_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# The pipeline's own scheduler: deterministic DDIM from t = 999 (trailing timesteps, as diffusers
# recommends for few steps), no clipping, SD's final alpha.
SHIPPED_SCHEDULER = dict(prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=0,
                         timestep_spacing="trailing")


@dataclass
class UNetDigits:
    """The embedded epsilon model: the UNet, its DDPM betas (hence VP noise schedule) and geometry.

    Call `epsilon(x, sigma, labels)` with x (B, 1, H, W) in VP space, x = alpha x0 + s eps, and the
    VE noise level sigma (B,); `denoiser()` wraps it as a samplers.Denoiser.
    """

    unet: UNet2DModel
    betas: dict = field(default_factory=lambda: dict(DEFAULT_BETAS))
    resolution: int = 16
    prediction_type: str = "epsilon"
    noise_schedule: VPSchedule = field(init=False)

    def __post_init__(self) -> None:
        self.noise_schedule = samplers.vp_schedule_from_betas(**self.betas)

    def epsilon(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, 1, H, W) for VP-space x (B, 1, H, W) at VE sigma (B,).

        x already is the UNet's input (alpha-scaled, as in DDPM training), so only the noise level
        is converted: to the continuous DDPM timestep by log-sigma interpolation.
        """
        timestep = self.noise_schedule.sigma_to_timestep(sigma.to(torch.float32))
        return self.unet(x, timestep.to(x.dtype), class_labels=labels).sample

    def denoiser(self, guidance_scale: float = 1.0) -> samplers.Denoiser:
        """A Denoiser(prediction_type="epsilon") with classifier-free guidance on the class label."""
        def model_fn(x, sigma, labels):
            return self.epsilon(x, sigma, labels)

        guided = samplers.cfg_model_fn(model_fn, guidance_scale, cond_key="labels",
                                       uncond_value=lambda labels: torch.full_like(labels, NULL_CLASS))
        return samplers.Denoiser(guided, prediction_type="epsilon", schedule=self.noise_schedule)

    def to(self, device=None, dtype=None) -> "UNetDigits":
        self.unet.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "UNetDigits":
        self.unet.eval()
        return self

    def as_pipeline(self):
        """The model as a `UNetDigitsPipeline` (sharing the UNet) with its shipped DDIM scheduler."""
        from accel.embedded.unet_pipeline import UNetDigitsPipeline

        return UNetDigitsPipeline(self.unet, DDIMScheduler(**self.betas, **SHIPPED_SCHEDULER))

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes a pipeline folder: `model_index.json`, `unet/` (safetensors + config) and `scheduler/`
        (DDIM on the model's betas), loadable with `UNetDigitsPipeline.from_pretrained` or as `model.name`."""
        self.as_pipeline().save_pretrained(Path(folder))


def build_unet_digits(seed: int = 0, betas: dict | None = None, **overrides) -> UNetDigits:
    """A freshly initialised (random-weight) embedded UNet."""
    torch.manual_seed(seed)
    return UNetDigits(unet=UNet2DModel(**{**DEFAULT_UNET_CONFIG, **overrides}),
                      betas={**DEFAULT_BETAS, **(betas or {})})


def load_unet_digits(folder: str | Path = UNET_DIGITS_DIR, device: str = "cpu") -> UNetDigits:
    """Loads the embedded UNet and its betas with diffusers' `from_pretrained` (safetensors only)."""
    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded UNet at {folder}: train it with `python scripts/train_embedded_unet.py`")
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return UNetDigits(unet=unet, betas={key: config[key] for key in DEFAULT_BETAS}).to(device).eval()
