"""Exports the EMA weights of the newest valid training checkpoint as a loadable model folder.

    python scripts/export_checkpoint.py accel/embedded/weights/flux-digits-checkpoint /tmp/flux-mid
    python scripts/export_checkpoint.py accel/embedded/weights/unet-digits-checkpoint /tmp/unet-mid --unet

The first argument is a training folder of scripts/train_embedded*.py or `accel train` (the one
holding checkpoints/); checkpoints are verified against their hashes, and only safetensors are read.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.model import build_flux_digits  # noqa: E402
from accel.embedded.unet import build_unet_digits  # noqa: E402
from distill.training.checkpoint import EMA, WEIGHTS, checkpoints_root, latest_valid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("training_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--unet", action="store_true", help="the checkpoint is of the embedded UNet")
    args = parser.parse_args()
    checkpoint = latest_valid(checkpoints_root(args.training_dir), None, [WEIGHTS])
    if checkpoint is None:
        sys.exit(f"no valid checkpoint under {checkpoints_root(args.training_dir)}")
    tensors = checkpoint.tensors(EMA if checkpoint.has(EMA) else WEIGHTS)
    model = build_unet_digits() if args.unet else build_flux_digits()
    modules = {"unet": model.unet} if args.unet else {"transformer": model.transformer,
                                                      "conditioner": model.conditioner}
    holder = torch.nn.ModuleDict(modules)
    absent = [name for name, _ in holder.named_parameters() if name not in tensors]
    if absent:
        sys.exit(f"{checkpoint.path} does not hold every weight of the model (missing {absent[:3]})")
    holder.load_state_dict(tensors, strict=False)
    model.save_pretrained(args.out)
    print(f"exported {checkpoint.path} -> {args.out}")


if __name__ == "__main__":
    main()
