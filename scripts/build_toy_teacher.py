"""Reproduce the shipped toy teacher from a seed: train the VAE, then the PixArt transformer.

    python scripts/build_toy_teacher.py --out pixsig_distill/toy/weights/teacher

About 55 minutes on 2 otherwise idle CPU cores with the defaults. The stages can also run apart
(`--stage vae --vae-dir D`, then `--stage teacher --vae-dir D`). The result is a diffusers pipeline
folder that `PixArtSigmaPipeline.from_pretrained` loads.
"""

import argparse
import logging
import tempfile
import time

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import FrozenDict

from pixsig_distill.toy.train import train_teacher, train_vae


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="pixsig_distill/toy/weights/teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads; never more than idle cores")
    parser.add_argument("--stage", choices=["all", "vae", "teacher"], default="all")
    parser.add_argument("--vae-dir", help="where --stage vae writes the VAE and --stage teacher reads it")
    args = parser.parse_args()
    if min(args.vae_steps, args.teacher_steps, args.batch_size) <= 0:
        parser.error("--vae-steps, --teacher-steps and --batch-size must be positive")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny gradients late in training otherwise slow the CPU down
    start = time.time()
    if args.stage != "all" and not args.vae_dir:
        parser.error("--stage vae/teacher needs --vae-dir")
    if args.stage == "vae":
        train_vae(args.vae_dir, steps=args.vae_steps, seed=args.seed)
        return
    if args.stage == "teacher":
        vae = AutoencoderKL.from_pretrained(args.vae_dir)
        # from_pretrained records the folder in the config, and the shipped config must not name this machine's path
        vae._internal_dict = FrozenDict({k: v for k, v in vae.config.items() if k != "_name_or_path"})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            vae = train_vae(tmp, steps=args.vae_steps, seed=args.seed)
    train_teacher(args.out, vae, steps=args.teacher_steps, batch_size=args.batch_size, seed=args.seed)
    print(f"toy teacher written to {args.out} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
