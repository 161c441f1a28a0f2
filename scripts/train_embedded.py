"""Trains the embedded FLUX-architecture digit model (rectified flow, class-conditional, CFG dropout).

    python scripts/train_embedded.py --out accel/embedded/weights/flux-digits   # regenerate the shipped model
                                                                     # (about 45-70 minutes on 2 CPU cores)
    python scripts/train_embedded.py --steps 50 --out /tmp/quick   # a smoke run

A thin wrapper on the one training loop (distill.training) and the flow-matching objective
(distill.objectives.flow_matching), wired to the embedded model and data by accel.train; the same
run as `accel train train/flow-digits`. Seeded and resumable: every batch, noise draw and time
draw is a pure function of (seed, step), and a checkpoint (safetensors + JSON with hashes, written
atomically) is kept every --checkpoint-every steps under <out>-checkpoint/checkpoints/; rerunning
the same command resumes from it. The final EMA weights are saved in a diffusers-loadable folder
(transformer/ and conditioner/) at --out, with training.json; the loss log and plot go to
<out>-checkpoint/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.model import FLUX_DIGITS_DIR  # noqa: E402
from accel.train import embedded_script_parser, run_embedded_script  # noqa: E402


def main() -> None:
    parser = embedded_script_parser(__doc__, out=FLUX_DIGITS_DIR, lr=1e-3, ema_decay=0.998)
    parser.add_argument("--time-shift", type=float, default=2.0,
                        help="FLUX/SD3-style shift applied to logit-normal time samples")
    args = parser.parse_args()
    run_embedded_script("flow-matching", args, time_shift=args.time_shift)


if __name__ == "__main__":
    main()
