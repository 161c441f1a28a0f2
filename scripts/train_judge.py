"""Trains the independent judge (digit classifier) on real data only, and reports held-out accuracy.

    python scripts/train_judge.py --out /tmp/judge                  # about 5 minutes on 2 CPU cores
    python scripts/train_judge.py --out accel/embedded/weights/judge  # regenerate the shipped judge
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.embedded.data import load_glyph_bank, real_reference_set, sample_batch  # noqa: E402
from accel.embedded.judge import JUDGE_DIR, DigitJudge  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help=f"folder for the judge (the shipped one: {JUDGE_DIR})")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    judge = DigitJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    bank = load_glyph_bank("train")
    for step in (progress := tqdm(range(args.steps), desc="judge")):
        generator = torch.Generator().manual_seed(10_000_019 * (args.seed + 1) + step)
        images, labels = sample_batch(bank, args.batch_size, args.resolution, generator)
        loss = F.cross_entropy(judge((images + 1) / 2), labels, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    judge.eval()
    images, labels = real_reference_set(4000, args.resolution, seed=777, split="test")
    with torch.no_grad():
        accuracy = (judge((images + 1) / 2).argmax(1) == labels).float().mean().item()
    print(f"held-out accuracy on {len(labels)} real test images: {accuracy:.4f}")
    judge.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps({**vars(args), "out": str(args.out),
                                                        "held_out_accuracy": accuracy}, indent=2))


if __name__ == "__main__":
    main()
