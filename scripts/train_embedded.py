"""Trains the embedded FLUX-architecture digit model (rectified flow, class-conditional, CFG dropout).

    python scripts/train_embedded.py                    # full run (about 45-70 minutes on 2 CPU cores)
    python scripts/train_embedded.py --steps 50 --out /tmp/quick   # a smoke run

Seeded and resumable: every batch, noise draw and time draw is a pure function of (seed, step),
and a checkpoint (safetensors + JSON, written atomically) is kept every --checkpoint-every steps
under <out>/checkpoint; rerunning the same command resumes from it. The final EMA weights are saved
in a diffusers-loadable folder (transformer/ and conditioner/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.data import load_glyph_bank, sample_batch  # noqa: E402
from accel.embedded.model import FLUX_DIGITS_DIR, NULL_CLASS, build_flux_digits  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FLUX_DIGITS_DIR)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--time-shift", type=float, default=2.0,
                        help="FLUX/SD3-style shift applied to logit-normal time samples")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def shifted_logit_normal(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """t = shift * s / (1 + (shift - 1) s) with s = sigmoid(N(0, 1)) (SD3 / FLUX time sampling)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * s / (1 + (shift - 1) * s)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _state_tensors(model, ema: dict[str, torch.Tensor], optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in _named_params(model).items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def _named_params(model) -> dict[str, torch.Tensor]:
    params = {f"transformer.{k}": v for k, v in model.transformer.named_parameters()}
    params.update({f"conditioner.{k}": v for k, v in model.conditioner.named_parameters()})
    return params


def save_checkpoint(folder: Path, step: int, model, ema, optimizer) -> None:
    """Writes the checkpoint into a temporary folder, then renames it over the old one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_tensors(model, ema, optimizer), tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, ema, optimizer) -> int:
    """Restores model, EMA and optimizer; returns the step to continue from (0 if none)."""
    if not (folder / "state.json").is_file():
        return 0
    tensors = load_file(folder / "state.safetensors")
    params = _named_params(model)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"model.{name}"])
            ema[name].copy_(tensors[f"ema.{name}"])
    for param in params.values():  # materialise the optimizer state layout (lr is 0 here)
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for index, state in optimizer.state_dict()["state"].items():
        for key in list(state):
            state[key].copy_(tensors[f"optim.{index}.{key}"])
    return json.loads((folder / "state.json").read_text())["step"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build_flux_digits(seed=args.seed)
    params = _named_params(model)
    print(f"parameters: {sum(p.numel() for p in params.values()) / 1e6:.2f}M", flush=True)
    ema = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.0, betas=(0.9, 0.99), weight_decay=0.0)
    checkpoint_dir = args.out.parent / (args.out.name + "-checkpoint")
    start = load_checkpoint(checkpoint_dir, model, ema, optimizer)
    if start:
        print(f"resuming from step {start}", flush=True)
    bank = load_glyph_bank("train")
    log_path = args.out.parent / (args.out.name + "-loss.csv")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        if start == 0:
            log.write("step,loss,lr,seconds\n")
        progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
        t0 = time.time()
        for step in progress:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            x0, labels = sample_batch(bank, args.batch_size, args.resolution, generator)
            drop = torch.rand(args.batch_size, generator=generator) < args.cfg_dropout
            labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
            noise = torch.randn(x0.shape, generator=generator)
            t = shifted_logit_normal(args.batch_size, args.time_shift, generator)
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            loss = torch.nn.functional.mse_loss(model.velocity(xt, t, labels), noise - x0)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, param in params.items():
                    ema[name].lerp_(param.detach(), 1 - decay)
            loss_value = loss.item()
            progress.set_postfix(loss=f"{loss_value:.4f}")
            log.write(f"{step},{loss_value:.6f},{group['lr']:.6g},{time.time() - t0:.1f}\n")
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                log.flush()
                save_checkpoint(checkpoint_dir, step + 1, model, ema, optimizer)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(ema[name])
    model.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(vars(args), default=str, indent=2))
    print(f"saved EMA weights to {args.out}", flush=True)


if __name__ == "__main__":
    main()
