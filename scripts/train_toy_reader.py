"""Train the toy world's learned attribute reader (the leaderboard's second reader, pixsig_distill/toy/reader.py).

The defaults reproduce the shipped weights in pixsig_distill/toy/weights/reader:

    python scripts/train_toy_reader.py

then report its accuracy on real held-out renders (compositions it never saw), which must be >= 99 % all-correct,
and the rule-based reader's on the same images.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pixsig_distill.toy.attributes import attribute_hits
from pixsig_distill.toy.reader import WEIGHTS_DIR, reader_hits, save_reader, train_reader
from pixsig_distill.toy.world import ToyWorldDataset


def heldout_real(n: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    data = ToyWorldDataset("heldout", n, seed)
    items = [data[i] for i in range(n)]
    images = np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                       for it in items])
    return images, [it["caption"] for it in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train_reader(steps=args.steps, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    images, captions = heldout_real(args.eval_images)
    learned = reader_hits(images, captions, model)
    rules = attribute_hits(images, captions)
    facts = {"steps": args.steps, "seed": args.seed, "train_minutes": round(minutes, 1),
             "heldout_images": args.eval_images, "heldout_all_correct": float(learned.all(axis=1).mean()),
             "heldout_per_attribute": {n: float(v) for n, v in zip(("background", "colour", "shape", "size",
                                                                    "position"), learned.mean(axis=0))},
             "rule_based_reader_all_correct": float(rules.all(axis=1).mean()),
             "agreement_with_rule_based_reader": float((learned.all(axis=1) == rules.all(axis=1)).mean())}
    from pathlib import Path

    save_reader(model, Path(args.out), facts)
    print(f"trained {args.steps} steps in {minutes:.1f} min -> {args.out}")
    for key, value in facts.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
