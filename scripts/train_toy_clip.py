"""Train the toy-world CLIP (the evaluator for CLIP scores and toy FID features).

The defaults reproduce the shipped weights in pixsig_distill/toy/weights/clip:

    PYTHONPATH=. python scripts/train_toy_clip.py

and then report the held-out caption accuracy the shipped model must reach (>= 90 %
with 10 random held-out candidates) plus the harder one-attribute-off figure.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time

import torch

from pixsig_distill.toy.clip import WEIGHTS_DIR, caption_accuracy, heldout_images, load_toy_clip, train_toy_clip

DEFAULTS = {name: p.default for name, p in inspect.signature(train_toy_clip).parameters.items() if p.default is not p.empty}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: the shipped weights)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--hard-fraction", type=float, default=DEFAULTS["hard_fraction"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it slightly)")
    parser.add_argument("--eval-images", type=int, default=2000, help="held-out images to score afterwards (0: skip)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixsig_distill").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    out = train_toy_clip(
        args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr, hard_fraction=args.hard_fraction
    )
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f}s -> {out}")

    if args.eval_images:
        model, _, tokenizer = load_toy_clip(weights_dir=out)
        images, captions = heldout_images(args.eval_images, seed=1)
        for kind in ("random", "one_attribute"):
            acc = caption_accuracy(model, tokenizer, images, captions, distractors=kind)
            print(f"held-out caption accuracy, 10 candidates ({kind} distractors): {acc:.4f}")


if __name__ == "__main__":
    main()
