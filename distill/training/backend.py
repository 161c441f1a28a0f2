"""The accelerate backends: the Accelerator for a run, and optimizer state to and from safetensors
for plain/DDP accelerate and for DeepSpeed ZeRO-1/2.

Plain and DDP runs: every process holds the same AdamW state, so the main process writes it once
(`optimizer.safetensors`), tensors named "<param index>.<key>" in the optimizer's own order.

DeepSpeed ZeRO-1/2 partitions the optimizer: each process owns a flat fp32 master partition per
parameter group (`single_partition_of_fp32_groups`) and the AdamW moments of that partition, held
by the plain torch optimizer DeepSpeed wraps (`engine.optimizer.optimizer`). Each process writes
those tensors to `optimizer-rank<r>.safetensors` and reads its own file back, so a resume needs
the same number of processes. This reads two attributes of DeepSpeed's ZeRO-1/2 optimizer
(see `_zero_optimizer`); `accelerator.save_state` is not used because
DeepSpeed's own checkpoints pickle the weights. Under DeepSpeed fp16 the dynamic loss scale
restarts on resume; bf16 and fp32 resume exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from distill.training.checkpoint import (
    OPTIMIZER,
    Checkpoint,
    TrainingError,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_tensors,
)
from distill.training.config import TrainConfig


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _cpu_group() -> bool:
    """Without a GPU, launched processes join a gloo group on the CPU (cpu=True); a DeepSpeed launch
    must not pass cpu=True, or accelerate drops DeepSpeed (it then uses DeepSpeed's CPU backend)."""
    import os

    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return not torch.cuda.is_available() and not deepspeed_launch


def launch_state():
    """accelerate's PartialState, set up as `make_accelerator` will set it up (for work before the
    loop starts, e.g. `state.main_process_first()` around files every process then reads)."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_group())


def make_accelerator(config: TrainConfig):
    """The Accelerator for a run: mixed precision, accumulation, and DeepSpeed settings from `config`."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # find_unused_parameters: an objective may leave trainable weights out of some forwards (a
    # cache skipping the blocks that hold part of a LoRA); DDP would otherwise wait for their grads.
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accumulation,
                              cpu=_cpu_group(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (1, 2):
            raise TrainingError(f"DeepSpeed ZeRO stage {stage}: the training loop supports stages 1 and 2 "
                                "(stage 3 partitions the weights); use a ZeRO-2 config such as "
                                "`accel recipes path launch/deepspeed-zero2`")
        ds_config = plugin.deepspeed_config
        if plugin.is_auto("train_micro_batch_size_per_gpu") or "train_micro_batch_size_per_gpu" not in ds_config:
            ds_config["train_micro_batch_size_per_gpu"] = 1  # objectives draw their own batches
        ds_config["gradient_clipping"] = config.max_grad_norm or 0.0
        ds_config["gradient_accumulation_steps"] = config.grad_accumulation
        accelerator.gradient_accumulation_steps = config.grad_accumulation
        ds_config.pop("train_batch_size", None)
    return accelerator


def optimizer_files(accelerator) -> list[str]:
    """The optimizer files a checkpoint of this run must hold."""
    if is_deepspeed(accelerator):
        return [f"optimizer-rank{r}.safetensors" for r in range(accelerator.num_processes)]
    return [OPTIMIZER]


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer behind accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not hasattr(inner, "single_partition_of_fp32_groups"):
        raise RuntimeError(f"unsupported DeepSpeed optimizer {type(inner).__name__}: the loop needs ZeRO stage 1 or 2")
    return inner


def save_optimizer(accelerator, optimizer, folder: Path) -> None:
    """Writes this process's share of the optimizer state into the staging `folder`.

    Plain/DDP: only the main process writes. DeepSpeed: every process writes its partition.
    """
    if is_deepspeed(accelerator):
        zero = _zero_optimizer(optimizer)
        tensors, numbers = optimizer_to_tensors(zero.optimizer.state_dict())
        tensors = {f"state.{k}": v for k, v in tensors.items()}
        numbers = [f"state.{k}" for k in numbers]
        for index, partition in enumerate(zero.single_partition_of_fp32_groups):
            tensors[f"fp32.{index}"] = partition
        name = f"optimizer-rank{accelerator.process_index}.safetensors"
    elif accelerator.is_main_process:
        tensors, numbers = optimizer_to_tensors(optimizer.state_dict())
        name = OPTIMIZER
    else:
        return
    save_tensors(folder / name, tensors)
    (folder / (name + ".numbers.json")).write_text(json.dumps(numbers))


def _read(checkpoint: Checkpoint, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    numbers = json.loads((checkpoint.path / (name + ".numbers.json")).read_text())
    with safe_open(str(checkpoint.path / name), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, numbers


def load_optimizer(accelerator, optimizer, checkpoint: Checkpoint) -> None:
    """Restores the optimizer state written by `save_optimizer` (same number of processes)."""
    if is_deepspeed(accelerator):
        zero = _zero_optimizer(optimizer)
        tensors, numbers = _read(checkpoint, f"optimizer-rank{accelerator.process_index}.safetensors")
        with torch.no_grad():
            for index, partition in enumerate(zero.single_partition_of_fp32_groups):
                partition.copy_(tensors[f"fp32.{index}"])
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        numbers = [k[len("state."):] for k in numbers]
        inner = zero.optimizer
        inner.load_state_dict(optimizer_from_tensors(state, numbers, inner.state_dict()["param_groups"]))
        return
    tensors, numbers = _read(checkpoint, OPTIMIZER)
    optimizer.load_state_dict(optimizer_from_tensors(tensors, numbers, optimizer.state_dict()["param_groups"]))
