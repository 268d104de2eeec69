"""Write a folder of toy-world images plus captions.txt (e.g. FID reference sets).

    python -m pixsig_distill.toy.make_images --split heldout --n 2000 --seed 0 --out DIR
    python -m pixsig_distill.toy.make_images --extension purple --n 1500 --out DIR   # the fine-tuning set:
        1500 purple images (toy/extension.py) + 1500 images of the known world (docs/finetune.md)
"""

from __future__ import annotations

import argparse

from pixsig_distill.toy.world import SPLITS, write_image_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pixsig_distill.toy.make_images",
        description="Render toy-world images as 00000.png, ... with one caption per line in captions.txt.",
    )
    parser.add_argument("--split", choices=SPLITS, default="heldout", help="caption split (default: heldout)")
    parser.add_argument("--n", type=int, required=True, help="number of images to write")
    parser.add_argument("--seed", type=int, default=0, help="seed for scene order and jitter (default: 0)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--extension", choices=("purple",), default=None,
                        help="write the fine-tuning set of the world's extension instead: --n new images + --n known")
    args = parser.parse_args(argv)

    # parser.error prints usage plus one line to stderr and exits with code 2.
    if args.n <= 0:
        parser.error(f"--n must be a positive number of images, got {args.n}")
    if args.resolution < 8:
        parser.error(f"--resolution must be at least 8 pixels, got {args.resolution}")

    try:
        if args.extension:
            from pixsig_distill.toy.extension import write_finetune_folder

            out = write_finetune_folder(args.out, n_new=args.n, n_old=args.n, seed=args.seed)
            print(f"wrote {args.n} {args.extension} and {args.n} known-world images and captions.txt to {out}")
            return
        out = write_image_folder(args.out, args.split, args.n, args.seed, args.resolution, progress=True)
    except OSError as err:
        parser.exit(1, f"error: cannot write to {args.out}: {err.strerror or err}\n")
    print(f"wrote {args.n} {args.split} images and captions.txt to {out}")


if __name__ == "__main__":
    main()
