"""`accel train`: training recipes run through the one loop of distill.training.

`OBJECTIVES` maps a recipe's `objective.name` to a builder `(params, seed, model) -> Objective`,
where `params` is the recipe's `objective.params` mapping, `seed` is `train.seed` and `model` the
recipe's `model` section. Registering a new method is one entry here; its builder checks its own
params (`accel.training.params.objective_params` turns a params dataclass into one-line errors).
The distillation objectives work on any diffusers pipeline (`accel.training.objectives`: the model
section names an embedded model, a local pipeline folder or a cached hub id); the pretraining
objectives build the embedded digit models (`accel.training.pretrain`). distill/ imports neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from accel.io import claim_folder, write_text
from accel.lab.fingerprint import differing_keys
from accel.training.params import checked, objective_params, plain_params
from accel.training.pretrain import (BETA_SCHEDULES, DDPMParams, EmbeddedParams, FlowMatchingParams, build_ddpm,
                                     build_flow_matching, embedded_script_parser, run_embedded_script)
from distill.objective import Objective
from distill.training import TrainingError, TrainResult

Builder = Callable[[Any, int, Any], Objective]

__all__ = ["OBJECTIVES", "TEACHER_OBJECTIVES", "run_train_recipe", "quick_overrides", "objective_identity",
           "is_main_launch_process", "objective_params", "checked", "BETA_SCHEDULES", "DDPMParams",
           "EmbeddedParams", "FlowMatchingParams", "embedded_script_parser", "run_embedded_script"]


def build_step_distill(params: Any, seed: int, model: Any) -> Objective:
    """Step-distillation LoRA (single-phase TRACT, rollout loss) for the model section's pipeline."""
    from accel.training.objectives import lora_objective_from_params

    return lora_objective_from_params("step-distill", plain_params(params), seed, model)


def build_cache_aware(params: Any, seed: int, model: Any) -> Objective:
    """Cache-aware LoRA: step distillation with the inference cache on during the rollout."""
    from accel.training.objectives import lora_objective_from_params

    return lora_objective_from_params("cache-aware", plain_params(params), seed, model)


def build_router(params: Any, seed: int, model: Any) -> Objective:
    """Learned cache router (Learning-to-Cache) for the teacher's own sampler."""
    from accel.training.objectives import router_objective_from_params

    return router_objective_from_params(plain_params(params), seed, model)


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


QUICK_SIDE = 256  # --quick: the longest image side of a pipeline's teacher
QUICK_TEACHER_STEPS = 8  # --quick: at most this many teacher steps


def quick_overrides(recipe: DictConfig) -> list[str]:
    """`accel train --quick`: a smoke run of any recipe (3 steps, a 16-trajectory teacher of its
    own, files under runs/train-quick/) that checks the wiring end to end in minutes on CPU: a
    pipeline's teacher also runs at most `QUICK_TEACHER_STEPS` steps at a longest side of
    `QUICK_SIDE` pixels (the template's 1024x1024 and 28 steps would take hours on a CPU). The
    teacher folder is the recipe's own (`teacher-<name>`), so smoke runs of recipes with different
    teachers do not collide."""
    quick = ["train.steps=3", "train.warmup_steps=0", "train.checkpoint_every=2", "train.log_every=1",
             "output.dir=runs/train-quick"]
    if recipe.objective.name not in TEACHER_OBJECTIVES:
        return quick
    params = recipe.objective.get("params") or {}
    folder = f"runs/train-quick/teacher-{recipe.name}" if recipe.get("name") else "runs/train-quick/teacher"
    quick += ["objective.params.teacher_count=16", f"objective.params.trajectories={folder}"]
    teacher_steps = params.get("teacher_steps")
    if isinstance(teacher_steps, int) and teacher_steps > QUICK_TEACHER_STEPS:
        quick.append(f"objective.params.teacher_steps={QUICK_TEACHER_STEPS}")
    resolution = params.get("resolution")
    sides = [resolution] if isinstance(resolution, int) else list(resolution or [])
    if sides and max(sides) > QUICK_SIDE:
        scale = QUICK_SIDE / max(sides)
        small = [max(16, int(side * scale) // 16 * 16) for side in sides]
        quick.append(f"objective.params.resolution={small[0] if isinstance(resolution, int) else small}")
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
    objective = OBJECTIVES[recipe.objective.name](recipe.objective.params, config.seed, recipe.model)
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
    paths, threads or intervals), the objective with every parameter, the model (its section, and
    the weights hash of the pipeline folder a distillation objective trains on, or of the folder a
    pretraining objective starts from) and code versions."""
    from distill.training.config import NOT_HASHED
    from accel.lab.fingerprint import code_versions
    from accel.lab.models import EMBEDDED_PIPELINES, embedded_folder, weights_hash

    objective = OmegaConf.to_container(recipe.objective, resolve=True)
    params = objective.get("params") or {}
    names = {"init": params.get("init")}
    model = {}
    if recipe.objective.name in TEACHER_OBJECTIVES:
        model = {k: v for k, v in OmegaConf.to_container(recipe.model, resolve=True).items() if k != "device"}
        names["model"] = recipe.model.name
    models = {}
    for key, name in names.items():
        if isinstance(name, str) and name:
            folder = embedded_folder(name) if name in EMBEDDED_PIPELINES else Path(name)
            models[key] = weights_hash(folder) if folder.is_dir() else name
    train = {k: v for k, v in config.to_dict().items() if k not in NOT_HASHED}
    return {"train": train, "objective": objective, "model": model, "models": models, "versions": code_versions()}


