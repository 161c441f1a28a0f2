"""Trains the embedded epsilon-prediction digit UNet (DDPM objective, class-conditional, CFG dropout).

    python scripts/train_embedded_unet.py --out accel/embedded/weights/unet-digits   # regenerate the shipped UNet
                                                                           # (estimated ~25 min on 2 free cores)
    python scripts/train_embedded_unet.py --steps 20 --out /tmp/unet  # a smoke run

Same data as the flow model (accel.embedded.data, 16x16). The objective is DDPM's
(distill.objectives.ddpm): t uniform in 0..999, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and
the UNet predicts eps (SD's scaled-linear betas by default). A thin wrapper on the one training
loop (distill.training), wired to the embedded UNet by accel.train. Seeded and resumable: every
batch, noise and timestep draw is a pure function of (seed, step), and a checkpoint (safetensors +
JSON with hashes, written atomically) is kept every --checkpoint-every steps under
<out>-checkpoint/checkpoints/; rerunning the same command resumes from it. The final EMA weights
are saved with save_pretrained: unet/ and scheduler/ (the betas) under --out, with training.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.unet import DEFAULT_BETAS, UNET_DIGITS_DIR  # noqa: E402
from accel.train import BETA_SCHEDULES, embedded_script_parser, run_embedded_script  # noqa: E402


def main() -> None:
    parser = embedded_script_parser(__doc__, out=UNET_DIGITS_DIR, lr=5e-4, ema_decay=0.999)
    parser.add_argument("--beta-schedule", default=DEFAULT_BETAS["beta_schedule"], choices=list(BETA_SCHEDULES))
    args = parser.parse_args()
    run_embedded_script("ddpm", args, beta_schedule=args.beta_schedule)


if __name__ == "__main__":
    main()
