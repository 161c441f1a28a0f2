"""Exports the EMA weights of a training checkpoint as a loadable model folder (for early checks).

    python scripts/export_checkpoint.py accel/embedded/weights/flux-digits-checkpoint /tmp/flux-mid
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.model import build_flux_digits  # noqa: E402


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    tensors = load_file(checkpoint / "state.safetensors")
    model = build_flux_digits()
    with torch.no_grad():
        for prefix, module in (("transformer", model.transformer), ("conditioner", model.conditioner)):
            for name, param in module.named_parameters():
                param.copy_(tensors[f"ema.{prefix}.{name}"])
    model.save_pretrained(out)
    print(f"exported {checkpoint} -> {out}")


if __name__ == "__main__":
    main()
