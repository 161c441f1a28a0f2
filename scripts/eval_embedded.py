"""Checks the embedded flow model against its bars and writes the numbers for docs/embedded-model.md.

    python scripts/eval_embedded.py [--model DIR] [--guidance 4.0] [--per-class 20]

Reports: class accuracy (the judge) and FD of 50-step Euler samples; PSNR/SSIM of Euler at 4, 8,
16 and 25 steps against the 50-step reference of the same seeds; and the same for the real data
(FD of held-out real images, as the floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel import measure  # noqa: E402
from accel.embedded import FLUX_DIGITS_DIR, JudgeFeatures, load_flux_digits, load_judge  # noqa: E402
from accel.embedded.data import real_reference_set  # noqa: E402
from accel.generate import SamplingPlan, flux_digits_denoiser, generate, sample_noise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=FLUX_DIGITS_DIR)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 25])
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_flux_digits(args.model)
    judge = load_judge()
    real, _ = real_reference_set(2000, 16)
    fd = measure.FrechetDistance(JudgeFeatures(judge), measure.to_unit_range(real))
    held_out, _ = real_reference_set(2000, 16, seed=4321)
    results = {"real_fd": fd(measure.to_unit_range(held_out)), "guidance": {}}
    labels = torch.arange(10).repeat_interleave(args.per_class)
    noise = sample_noise(args.seed, range(len(labels)), (1, 16, 16))
    for scale in args.guidance:
        denoiser = flux_digits_denoiser(model, scale)
        reference = measure.to_unit_range(generate(denoiser, SamplingPlan("euler", 50, schedule_params={"shift": args.shift}),
                                                   noise, labels, 100, desc=f"reference g={scale}"))
        row = {"accuracy_50": measure.class_accuracy(judge, reference, labels), "fd_50": fd(reference),
               "steps": {}}
        for steps in args.steps:
            images = measure.to_unit_range(generate(denoiser, SamplingPlan("euler", steps, schedule_params={"shift": args.shift}),
                                                    noise, labels, 100))
            row["steps"][steps] = {"psnr": measure.psnr(images, reference), "ssim": measure.ssim(images, reference),
                                   "fd": fd(images), "accuracy": measure.class_accuracy(judge, images, labels)}
        results["guidance"][scale] = row
        print(json.dumps({scale: row}, indent=1), flush=True)
    print(f"FD of held-out real images: {results['real_fd']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
