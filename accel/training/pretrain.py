"""Pretraining the embedded digit models through the one loop: `flow-matching` (the FLUX-architecture
flow model) and `ddpm` (the UNet) on the embedded digit data, all weights or a LoRA, and the flags
and run of scripts/train_embedded*.py."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from accel.io import write_text
from accel.training.params import checked, objective_params
from distill.objective import Objective
from distill.training import TrainResult

BETA_SCHEDULES = ("scaled_linear", "squaredcos_cap_v2", "linear")


@dataclass
class EmbeddedParams:
    """Parameters shared by the embedded pretraining objectives (flow-matching, ddpm)."""

    init: Optional[str] = None  # a saved model folder to start from; null: random init (train.seed)
    model_config: dict[str, Any] = field(default_factory=dict)  # model config overrides for a random init
    batch_size: int = 96  # samples per micro-batch
    cfg_dropout: float = 0.1  # probability of the null class (classifier-free guidance training)
    resolution: int = 16  # image side
    lora_rank: Optional[int] = None  # train a LoRA of this rank (base frozen) instead of all weights
    lora_alpha: Optional[float] = None  # LoRA alpha (null: the rank)


@dataclass
class FlowMatchingParams(EmbeddedParams):
    """`flow-matching` on the embedded FLUX-architecture model."""

    time_shift: float = 2.0  # shift of the logit-normal time samples


@dataclass
class DDPMParams(EmbeddedParams):
    """`ddpm` (epsilon) on the embedded UNet."""

    beta_schedule: str = "scaled_linear"  # scaled_linear | squaredcos_cap_v2 | linear


def _digits_sampler(resolution: int):
    from accel.embedded.data import load_glyph_bank, sample_batch

    bank = load_glyph_bank("train")
    return lambda generator, batch_size: sample_batch(bank, batch_size, resolution, generator)


def _trainable(modules: dict[str, nn.Module], adapted: nn.Module, params: EmbeddedParams,
               component: str, save_full: Callable[[Path], None], method: str):
    """The module to train and the export function: all weights, or a LoRA on `adapted`."""
    from distill.lora import add_lora, save_lora

    holder = nn.ModuleDict(modules)
    if params.lora_rank is None:
        def export(folder: Path) -> Path:
            save_full(folder)
            return folder
        return holder, export
    holder.requires_grad_(False)
    add_lora(adapted, params.lora_rank, params.lora_alpha)

    def export_lora(folder: Path) -> Path:
        return save_lora(adapted, folder, component=component, metadata={"accel.method": method})
    return holder, export_lora


MAX_RESOLUTION = 256


def _check_resolution(resolution: int, multiple: int, why: str) -> None:
    """The image side must be a positive multiple of what the model divides it by."""
    from accel.recipe.load import RecipeError

    if not (multiple <= resolution <= MAX_RESOLUTION and resolution % multiple == 0):
        raise RecipeError(f"objective.params.resolution: {resolution} must be a multiple of {multiple} ({why}) "
                          f"between {multiple} and {MAX_RESOLUTION}")


def build_flow_matching(params: Any, seed: int, model: Any = None) -> Objective:
    """Rectified-flow training of the embedded flow model on the digit data (`model`, the recipe's
    model section, is not used: the model is `init` or a random one)."""
    from accel.embedded.model import NULL_CLASS, build_flux_digits, load_flux_digits
    from distill.objectives.flow_matching import FlowMatching, label_dropout

    p: FlowMatchingParams = objective_params(FlowMatchingParams, params, "flow-matching")
    _check_resolution(p.resolution, 2, "the model packs 2x2 patches")
    if p.init:
        model = load_flux_digits(p.init)
    else:
        model = checked(lambda: build_flux_digits(seed=seed, **p.model_config), "model_config")
    model.transformer.train()
    module, export = _trainable({"transformer": model.transformer, "conditioner": model.conditioner},
                                model.transformer, p, "transformer", model.save_pretrained, "flow-matching")
    return checked(lambda: FlowMatching(
        model=module, sample=_digits_sampler(p.resolution), batch_size=p.batch_size, seed=seed,
        cond_dropout=p.cfg_dropout, drop_condition=label_dropout(NULL_CLASS), save=export,
        velocity=model.velocity, time_shift=p.time_shift))


def build_ddpm(params: Any, seed: int, model: Any = None) -> Objective:
    """DDPM epsilon training of the embedded UNet on the digit data (`model` is not used)."""
    from accel.embedded.model import NULL_CLASS
    from accel.embedded.unet import build_unet_digits, load_unet_digits
    from distill.objectives.ddpm import DDPMEpsilon, label_dropout

    p: DDPMParams = objective_params(DDPMParams, params, "ddpm")
    if p.beta_schedule not in BETA_SCHEDULES:
        from accel.recipe.load import RecipeError

        raise RecipeError(f"objective.params.beta_schedule: {p.beta_schedule!r} is not allowed; "
                          f"choose one of: {', '.join(BETA_SCHEDULES)}")
    if p.init:
        model = load_unet_digits(p.init)
    else:
        model = checked(lambda: build_unet_digits(seed=seed, betas={"beta_schedule": p.beta_schedule},
                                                   **p.model_config), "model_config")
    levels = len(model.unet.config.block_out_channels) - 1
    _check_resolution(p.resolution, 2 ** levels, f"the UNet halves it {levels} times")
    model.unet.train()
    module, export = _trainable({"unet": model.unet}, model.unet, p, "unet", model.save_pretrained, "ddpm")
    return checked(lambda: DDPMEpsilon(
        model=module, sample=_digits_sampler(p.resolution), batch_size=p.batch_size, seed=seed,
        cond_dropout=p.cfg_dropout, drop_condition=label_dropout(NULL_CLASS), save=export,
        epsilon=lambda x, t, labels: model.unet(x, t, class_labels=labels).sample,
        alphas_cumprod=model.noise_schedule.alphas_cumprod))


def embedded_script_parser(description: str, *, out: Path, lr: float, ema_decay: float) -> argparse.ArgumentParser:
    """The flags shared by scripts/train_embedded*.py (each script adds its objective's own).

    `--out` is required: these developer tools write where they are told, and regenerate the shipped
    weights (`out`, inside the package) only when that folder is named explicitly.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder for the final weights (the shipped ones: {out})")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=ema_decay)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def run_embedded_script(objective: str, args: argparse.Namespace, **params: Any) -> TrainResult:
    """Trains an embedded model as scripts/train_embedded*.py do: the final EMA weights go to --out
    (with training.json), training state to <out>-checkpoint/ (checkpoints/, loss.csv, loss.png)."""
    from accel.train import OBJECTIVES, is_main_launch_process
    from distill.training import TrainConfig, train

    out = Path(args.out)
    config = TrainConfig(steps=args.steps, out_dir=out.parent / (out.name + "-checkpoint"), export_dir=out,
                         lr=args.lr, warmup_steps=args.warmup, min_lr_fraction=0.1, betas=(0.9, 0.99),
                         weight_decay=0.0, max_grad_norm=1.0, ema_decay=args.ema_decay,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads)
    torch.manual_seed(args.seed)
    built = OBJECTIVES[objective](dict(batch_size=args.batch_size, cfg_dropout=args.cfg_dropout,
                                       resolution=args.resolution, **params), args.seed, None)
    trainable = sum(p.numel() for p in built.module().parameters() if p.requires_grad)
    print(f"parameters: {trainable / 1e6:.2f}M", flush=True)
    result = train(built, config)
    if is_main_launch_process():
        write_text(out / "training.json", json.dumps(vars(args), default=str, indent=2))
        print(f"saved EMA weights to {out}; loss log {result.loss_log}", flush=True)
    return result
