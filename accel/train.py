"""`accel train`: training recipes run through the one loop of distill.training.

`OBJECTIVES` maps a recipe's `objective.name` to a builder `(params, seed) -> Objective`, where
`params` is the recipe's `objective.params` mapping and `seed` is `train.seed`. Registering a new
method is one entry here; its builder checks its own params (`objective_params` turns a params
dataclass into one-line errors) and wires distill/'s generic objective to the embedded models and
data, which distill/ does not import.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from accel.io import claim_folder, write_text
from distill.objective import Objective
from accel.lab.fingerprint import differing_keys
from distill.training import TrainingError, TrainResult

Builder = Callable[[Any, int], Objective]
BETA_SCHEDULES = ("scaled_linear", "squaredcos_cap_v2", "linear")


def objective_params(schema: type, params: Any, objective: str) -> Any:
    """Merges `params` onto the dataclass `schema`; returns a typed object.

    Raises:
        RecipeError: an unknown key or a wrong type, named as objective.params.<key>.
    """
    from accel.recipe.load import RecipeError

    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, params if params is not None else {})
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        if "not in struct" in str(error) or type(error).__name__ == "ConfigKeyError":
            raise RecipeError(f"unknown key 'objective.params.{key}' for objective {objective!r}; "
                              f"allowed keys here: {', '.join(base.keys())}") from None
        raise RecipeError(f"wrong type for 'objective.params.{key}': {str(error).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


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


def _checked(build: Callable[[], Any], key: str = "") -> Any:
    """Runs `build`; its ValueError / TypeError becomes a RecipeError naming objective.params."""
    from accel.recipe.load import RecipeError

    try:
        return build()
    except (ValueError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecipeError(f"objective.params.{key + ': ' if key else ''}{first}") from None


MAX_RESOLUTION = 256


def _check_resolution(resolution: int, multiple: int, why: str) -> None:
    """The image side must be a positive multiple of what the model divides it by."""
    from accel.recipe.load import RecipeError

    if not (multiple <= resolution <= MAX_RESOLUTION and resolution % multiple == 0):
        raise RecipeError(f"objective.params.resolution: {resolution} must be a multiple of {multiple} ({why}) "
                          f"between {multiple} and {MAX_RESOLUTION}")


def build_flow_matching(params: Any, seed: int) -> Objective:
    """Rectified-flow training of the embedded flow model on the digit data."""
    from accel.embedded.model import NULL_CLASS, build_flux_digits, load_flux_digits
    from distill.objectives.flow_matching import FlowMatching, label_dropout

    p: FlowMatchingParams = objective_params(FlowMatchingParams, params, "flow-matching")
    _check_resolution(p.resolution, 2, "the model packs 2x2 patches")
    if p.init:
        model = load_flux_digits(p.init)
    else:
        model = _checked(lambda: build_flux_digits(seed=seed, **p.model_config), "model_config")
    model.transformer.train()
    module, export = _trainable({"transformer": model.transformer, "conditioner": model.conditioner},
                                model.transformer, p, "transformer", model.save_pretrained, "flow-matching")
    return _checked(lambda: FlowMatching(
        model=module, sample=_digits_sampler(p.resolution), batch_size=p.batch_size, seed=seed,
        cond_dropout=p.cfg_dropout, drop_condition=label_dropout(NULL_CLASS), save=export,
        velocity=model.velocity, time_shift=p.time_shift))


def build_ddpm(params: Any, seed: int) -> Objective:
    """DDPM epsilon training of the embedded UNet on the digit data."""
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
        model = _checked(lambda: build_unet_digits(seed=seed, betas={"beta_schedule": p.beta_schedule},
                                                   **p.model_config), "model_config")
    levels = len(model.unet.config.block_out_channels) - 1
    _check_resolution(p.resolution, 2 ** levels, f"the UNet halves it {levels} times")
    model.unet.train()
    module, export = _trainable({"unet": model.unet}, model.unet, p, "unet", model.save_pretrained, "ddpm")
    return _checked(lambda: DDPMEpsilon(
        model=module, sample=_digits_sampler(p.resolution), batch_size=p.batch_size, seed=seed,
        cond_dropout=p.cfg_dropout, drop_condition=label_dropout(NULL_CLASS), save=export,
        epsilon=lambda x, t, labels: model.unet(x, t, class_labels=labels).sample,
        alphas_cumprod=model.noise_schedule.alphas_cumprod))


def _plain_params(params: Any) -> dict[str, Any]:
    return OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})


def build_step_distill(params: Any, seed: int) -> Objective:
    """Step-distillation LoRA (single-phase TRACT, rollout loss) for the embedded flow model."""
    from accel.distill_embedded import lora_objective_from_params

    return _checked(lambda: lora_objective_from_params("step-distill", _plain_params(params), seed))


def build_cache_aware(params: Any, seed: int) -> Objective:
    """Cache-aware LoRA: step distillation with the inference cache on during the rollout."""
    from accel.distill_embedded import lora_objective_from_params

    return _checked(lambda: lora_objective_from_params("cache-aware", _plain_params(params), seed))


def build_router(params: Any, seed: int) -> Objective:
    """Learned cache router (Learning-to-Cache) for the embedded model's reference sampler."""
    from accel.distill_embedded import router_objective_from_params

    return _checked(lambda: router_objective_from_params(_plain_params(params), seed))


OBJECTIVES: dict[str, Builder] = {
    "flow-matching": build_flow_matching,
    "ddpm": build_ddpm,
    "step-distill": build_step_distill,
    "cache-aware": build_cache_aware,
    "router": build_router,
}


def is_main_launch_process() -> bool:
    """True unless this is a non-main process of `accelerate launch` / torchrun (RANK > 0)."""
    return os.environ.get("RANK", "0") == "0"


TEACHER_OBJECTIVES = ("step-distill", "cache-aware", "router")


def quick_overrides(objective: str) -> list[str]:
    """`accel train --quick`: a smoke run of any recipe (3 steps, a 16-trajectory teacher of its
    own, files under runs/train-quick/) that checks the wiring end to end in minutes on CPU."""
    quick = ["train.steps=3", "train.warmup_steps=0", "train.checkpoint_every=2", "train.log_every=1",
             "output.dir=runs/train-quick"]
    if objective in TEACHER_OBJECTIVES:
        quick += ["objective.params.teacher_count=16", "objective.params.trajectories=runs/train-quick/teacher"]
    return quick


def run_train_recipe(recipe: DictConfig) -> TrainResult:
    """Builds the recipe's objective and trains it; files go to <output.dir>/<name>/.

    Returns:
        The loop's TrainResult (loss.csv, loss.png and the export under the run folder).
    """
    from accel.recipe.train_schema import train_config
    from distill.training import train

    config = train_config(recipe)
    claim_folder(config.out_dir, "accel train")  # before any work: refuses another command's or a read-only folder
    torch.manual_seed(config.seed)
    objective = OBJECTIVES[recipe.objective.name](recipe.objective.params, config.seed)
    identity = objective_identity(recipe, config)
    try:
        result = train(objective, config, identity)
    except TrainingError as error:
        if error.stored_identity is None:
            raise
        keys = differing_keys(error.stored_identity, identity)
        raise TrainingError(f"{config.out_dir} holds checkpoints of a run with other settings (differing in "
                            f"{', '.join(keys[:6]) or 'the training settings'}); use another name or output.dir, "
                            f"or delete {config.out_dir / 'checkpoints'}") from None
    if is_main_launch_process():  # the settings of the run that made the export (written once it exists)
        write_text(config.out_dir / "recipe.yaml", OmegaConf.to_yaml(recipe, resolve=True))
    return result


def objective_identity(recipe: DictConfig, config: Any) -> dict[str, Any]:
    """What determines a training run's weights: the loop's settings that do (TrainConfig without
    paths, threads or intervals), the objective with every parameter, the weights of the model it
    starts from (by name or folder) and code versions."""
    from distill.training.config import NOT_HASHED
    from accel.lab.fingerprint import code_versions
    from accel.lab.models import EMBEDDED_PIPELINES, embedded_folder, weights_hash

    objective = OmegaConf.to_container(recipe.objective, resolve=True)
    params = objective.get("params") or {}
    models = {}
    for key in ("model", "init"):
        name = params.get(key)
        if isinstance(name, str) and name:
            folder = embedded_folder(name) if name in EMBEDDED_PIPELINES else Path(name)
            models[key] = weights_hash(folder) if folder.is_dir() else name
    train = {k: v for k, v in config.to_dict().items() if k not in NOT_HASHED}
    return {"train": train, "objective": objective, "models": models, "versions": code_versions()}


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
    from distill.training import TrainConfig, train

    out = Path(args.out)
    config = TrainConfig(steps=args.steps, out_dir=out.parent / (out.name + "-checkpoint"), export_dir=out,
                         lr=args.lr, warmup_steps=args.warmup, min_lr_fraction=0.1, betas=(0.9, 0.99),
                         weight_decay=0.0, max_grad_norm=1.0, ema_decay=args.ema_decay,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads)
    torch.manual_seed(args.seed)
    built = OBJECTIVES[objective](dict(batch_size=args.batch_size, cfg_dropout=args.cfg_dropout,
                                       resolution=args.resolution, **params), args.seed)
    trainable = sum(p.numel() for p in built.module().parameters() if p.requires_grad)
    print(f"parameters: {trainable / 1e6:.2f}M", flush=True)
    result = train(built, config)
    if is_main_launch_process():
        write_text(out / "training.json", json.dumps(vars(args), default=str, indent=2))
        print(f"saved EMA weights to {out}; loss log {result.loss_log}", flush=True)
    return result
