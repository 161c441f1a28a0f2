"""The one training loop: any `distill.objective.Objective` on accelerate.

Per optimizer step `s`: the learning rate is set from `TrainConfig.learning_rate(s)`; each process
runs `grad_accumulation` micro-batches `objective.loss(s, k)` with the global micro-batch index
`k = process_index * grad_accumulation + j`, so a run on P processes with A micro-batches sees
exactly the micro-batches of a one-process run with P * A; the gradient is their mean, clipped,
and AdamW steps on the trainable parameters only; the EMA follows. Losses stay on the device and
are synced once per `log_every` steps and before every checkpoint, which is also when a NaN or
inf loss is caught (`TrainingError`), so no checkpoint is ever written after a bad loss.

The objective's loss runs inside the forward of a small wrapper module that holds
`objective.module()`, so accelerate's autocast, DDP's gradient hooks and DeepSpeed's engine all
see an ordinary forward and backward. Under DeepSpeed (an accelerate config with
`distributed_type: DEEPSPEED`, see accel/recipes/launch/deepspeed-zero2.yaml) the loop sets the
engine's clipping and accumulation from `TrainConfig`, and DeepSpeed runs the optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill.objective import Objective
from distill.training.backend import is_deepspeed, load_optimizer, make_accelerator, optimizer_files, save_optimizer
from distill.training.checkpoint import (
    EMA,
    WEIGHTS,
    Checkpoint,
    TrainingError,
    checkpoints_root,
    clean_staging,
    latest_valid,
    publish,
    save_tensors,
    staging_dir,
)
from distill.training.config import TrainConfig
from distill.training.loss_log import LossLog, plot_loss_log


@dataclass(frozen=True)
class TrainResult:
    """What `train` did.

    Attributes:
        steps_done: optimizer steps completed in total (config.steps after a finished run).
        resumed_from: the checkpoint step this call continued from, or None for a fresh start.
        seconds: training seconds over all calls (resumed runs add to the checkpoint's count).
        loss_log: the loss CSV (step,loss,lr,seconds).
        loss_plot: the loss plot PNG.
        exported: what `objective.export` returned (on every process).
    """

    steps_done: int
    resumed_from: Optional[int]
    seconds: float
    loss_log: Path
    loss_plot: Path
    exported: Path


class _LossModule(nn.Module):
    """Holds the objective's module; its forward is the objective's loss."""

    def __init__(self, objective: Objective, module: nn.Module) -> None:
        super().__init__()
        self.inner = module
        object.__setattr__(self, "_objective", objective)  # not a submodule

    def forward(self, step: int, micro_batch: int) -> torch.Tensor:
        return self._objective.loss(step, micro_batch)


@dataclass
class _Run:
    """The state of one `train` call."""

    accelerator: object
    objective: Objective
    config: TrainConfig
    wrapped: nn.Module
    optimizer: object
    params: dict[str, nn.Parameter]
    ema: Optional[dict[str, torch.Tensor]]
    fingerprint: str
    identity: dict = field(default_factory=dict)
    start: int = 0
    base_seconds: float = 0.0
    started: float = 0.0
    last_checkpoint: Optional[Path] = None

    def seconds(self) -> float:
        return self.base_seconds + time.time() - self.started


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with requires_grad, by name (the names checkpoints use)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _setup(objective: Objective, config: TrainConfig, identity: dict) -> _Run:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    accelerator = make_accelerator(config)
    module = objective.module()
    params = trainable_parameters(module)
    if not params:
        raise ValueError(f"objective {objective.name!r}: module() has no parameter with requires_grad=True")
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, betas=config.betas,
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    wrapped, optimizer = accelerator.prepare(_LossModule(objective, module), optimizer)
    # prepare() moves the module in place (same parameter objects); accelerator.unwrap_model is
    # avoided because it imports DeepSpeed whenever DeepSpeed is installed (seconds per process).
    params = trainable_parameters(module)
    ema = {k: p.detach().float().clone() for k, p in params.items()} if config.ema_decay is not None else None
    key = (f"{config.fingerprint()}|{objective.name}|processes={accelerator.num_processes}|"
           f"{json.dumps(identity, sort_keys=True, default=str)}")
    return _Run(accelerator=accelerator, objective=objective, config=config, wrapped=wrapped,
                optimizer=optimizer, params=params, ema=ema, identity=identity,
                fingerprint=hashlib.sha256(key.encode()).hexdigest())


def _copy_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: Path) -> None:
    missing = sorted(set(targets) - set(tensors))
    wrong = [k for k in targets if k in tensors and tensors[k].shape != targets[k].shape]
    if missing or wrong:
        raise TrainingError(f"checkpoint {what} does not fit the objective's trainable parameters "
                            f"(missing {missing[:3]}, shape changed {wrong[:3]}); use another out_dir")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])


def _resume(run: _Run) -> Optional[Checkpoint]:
    accelerator, config = run.accelerator, run.config
    root = checkpoints_root(config.out_dir)
    if accelerator.is_main_process:
        clean_staging(root)
    accelerator.wait_for_everyone()
    required = [WEIGHTS] + ([EMA] if run.ema is not None else []) + optimizer_files(accelerator)
    checkpoint = latest_valid(root, run.fingerprint, required, log=accelerator.print)
    if checkpoint is None:
        return None
    _copy_into(run.params, checkpoint.tensors(WEIGHTS), checkpoint.path)
    if run.ema is not None:
        _copy_into(run.ema, checkpoint.tensors(EMA), checkpoint.path)
    load_optimizer(accelerator, run.optimizer, checkpoint)
    scaler = checkpoint.manifest.get("scaler")
    if scaler and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(scaler)
    run.start, run.base_seconds = checkpoint.step, float(checkpoint.manifest.get("seconds", 0.0))
    run.last_checkpoint = checkpoint.path
    accelerator.print(f"resuming from {checkpoint.path} (step {checkpoint.step})")
    return checkpoint


def _optimizer_step(run: _Run, step: int, lr: float) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns their mean loss (on device)."""
    accelerator, config = run.accelerator, run.config
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=accelerator.device)
    first = accelerator.process_index * config.grad_accumulation
    for j in range(config.grad_accumulation):
        with accelerator.accumulate(run.wrapped):
            loss = run.wrapped(step, first + j)
            if loss.ndim != 0:
                raise TrainingError(f"objective {run.objective.name!r}: loss must be a scalar, "
                                    f"got shape {tuple(loss.shape)}")
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm is not None and not is_deepspeed(accelerator):
                accelerator.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float() / config.grad_accumulation
    return total


def _update_ema(run: _Run, step: int) -> None:
    weight = 1.0 - run.config.ema_decay_at(step)
    with torch.no_grad():
        for name, param in run.params.items():
            run.ema[name].lerp_(param.detach().float(), weight)


def _flush(run: _Run, pending: list[tuple[int, float, float, torch.Tensor]], log: Optional[LossLog],
           progress) -> None:
    """Syncs the pending (step, lr, seconds, loss) entries (one host transfer), checks and logs them."""
    if not pending:
        return
    losses = run.accelerator.reduce(torch.stack([entry[3] for entry in pending]), reduction="mean")
    values = losses.cpu().tolist()
    rows = []
    for (step, lr, seconds, _), value in zip(pending, values):
        if not math.isfinite(value):
            if log is not None:
                log.append(rows)
            kept = (f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint
                    else "no checkpoint was written")
            raise TrainingError(f"objective {run.objective.name!r}: loss is {value} at step {step}; "
                                f"training stopped, {kept}")
        rows.append((step, value, lr, seconds))
    if log is not None:
        log.append(rows)
    progress.set_postfix(loss=f"{values[-1]:.4g}")


def _steps(run: _Run, log: Optional[LossLog], progress) -> None:
    """The optimizer steps from run.start to config.steps, with log flushes and checkpoints."""
    config = run.config
    pending: list[tuple[int, float, float, torch.Tensor]] = []
    for step in range(run.start, config.steps):
        lr = config.learning_rate(step)
        loss = _optimizer_step(run, step, lr)
        if run.ema is not None:
            _update_ema(run, step)
        pending.append((step, lr, run.seconds(), loss))
        progress.update(1)
        save = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
        if save or len(pending) >= config.log_every:
            _flush(run, pending, log, progress)
            pending = []
        if save:
            _save_checkpoint(run, step + 1)


def _save_checkpoint(run: _Run, step: int) -> None:
    """Writes the checkpoint after `step` optimizer steps (weights checked finite first)."""
    accelerator, config = run.accelerator, run.config
    bad = [name for name, p in run.params.items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"objective {run.objective.name!r}: non-finite weights after step {step - 1} "
                            f"({bad[0]}); training stopped, the last good checkpoint is {run.last_checkpoint}")
    root = checkpoints_root(config.out_dir)
    staged = staging_dir(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_tensors(staged / WEIGHTS, dict(run.params))
        if run.ema is not None:
            save_tensors(staged / EMA, run.ema)
    save_optimizer(accelerator, run.optimizer, staged)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) is not None else None
        info = {"seconds": run.seconds(), "objective": run.objective.name, "identity": run.identity, "scaler": scaler,
                "num_processes": accelerator.num_processes, "config": config.to_dict()}
        publish(root, step, run.fingerprint, info, config.keep_checkpoints)
    accelerator.wait_for_everyone()
    run.last_checkpoint = root / f"step-{step:07d}"


def _export(run: _Run) -> Path:
    """Calls objective.export with the EMA weights swapped in (main process), then swaps them back."""
    accelerator = run.accelerator
    export_dir = run.config.export_dir
    backup = None
    if run.ema is not None:
        backup = {k: p.detach().clone() for k, p in run.params.items()}
        _copy_into(run.params, run.ema, Path("<ema>"))
    try:
        exported = run.objective.export(export_dir) if accelerator.is_main_process else None
    finally:
        if backup is not None:
            _copy_into(run.params, backup, Path("<backup>"))
        accelerator.wait_for_everyone()
    return Path(exported) if exported is not None else export_dir


def train(objective: Objective, config: TrainConfig, identity: dict | None = None) -> TrainResult:
    """Trains `objective` as `config` says, resuming from the newest valid checkpoint.

    Args:
        objective: what to train (see distill.objective.Objective).
        config: the loop's settings; files go under config.out_dir.
        identity: what else determines the trained weights (the objective's parameters, the base
            model's weights hash, code versions), JSON-ready; part of the checkpoints' fingerprint,
            so a checkpoint of other settings is refused, and stored in their manifests.

    Returns:
        A TrainResult naming the loss log, the loss plot and the export.

    Raises:
        TrainingError: a NaN/inf loss or non-finite weights (the last good checkpoint is kept),
            or checkpoints in out_dir that belong to another run.
        ValueError: an objective without trainable parameters.
    """
    run = _setup(objective, config, dict(identity or {}))
    checkpoint = _resume(run)
    main = run.accelerator.is_main_process
    log = LossLog(config.out_dir / "loss.csv", run.start) if main else None
    run.accelerator.wait_for_everyone()
    from tqdm.auto import tqdm

    progress = tqdm(total=config.steps, initial=run.start, desc=objective.name, disable=not main,
                    dynamic_ncols=True)
    run.started = time.time()
    try:
        _steps(run, log, progress)
    finally:
        progress.close()
    exported = _export(run)
    plot = config.out_dir / "loss.png"
    if main:
        plot_loss_log(config.out_dir / "loss.csv", plot, title=f"{objective.name} loss")
    run.accelerator.wait_for_everyone()
    return TrainResult(steps_done=config.steps, resumed_from=checkpoint.step if checkpoint else None,
                       seconds=run.seconds(), loss_log=config.out_dir / "loss.csv", loss_plot=plot,
                       exported=exported)
