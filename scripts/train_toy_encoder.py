"""Train the toy world's independent image encoder (FID and CMMD features no training objective reads;
pixsig_distill/toy/encoder.py) and measure how well its FID resolves what FID should see.

The defaults reproduce the shipped weights in pixsig_distill/toy/weights/encoder:

    python scripts/train_toy_encoder.py

Then, for the encoder and for the toy CLIP side by side, FID(real, X) / FID(real, another draw of real): how far
above the sampling noise floor each distortion X lands, with `--eval-images` held-out images per set. The figures go
into the weights' config.json. `--measure-only` measures the shipped weights without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from pixsig_distill.toy.encoder import WEIGHTS_DIR, ToyEncoderFeatures, save_encoder, train_encoder
from pixsig_distill.toy.features import ToyFIDFeatures, fid_from_features
from pixsig_distill.toy.world import ToyWorldDataset, split_scenes


def real_images(split: str, n: int, seed: int) -> np.ndarray:
    data = ToyWorldDataset(split, n, seed)
    return np.stack([((data[i]["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                     for i in range(n)])


def distortions(reference: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """Image sets an FID should tell from real held-out images, each of n images."""
    rng = np.random.default_rng(seed)
    blur = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.7))) for im in reference])
    noise = np.clip(reference + rng.normal(0, 8, reference.shape), 0, 255).round().astype(np.uint8)
    red = reference.astype(np.float64)
    red[..., 0] = np.clip(red[..., 0] + 0.05 * 255, 0, 255)
    few = split_scenes("heldout")[:30]
    return {"blur (sigma 0.7)": blur, "Gaussian noise (8/255)": noise, "red channel +0.05": red.round().astype(np.uint8),
            "training-split compositions": real_images("train", n, seed + 3),
            "only 30 distinct scenes": np.stack([few[i % 30].render(32, rng) for i in range(n)])}


def resolution(features, real: np.ndarray, other_real: np.ndarray, distorted: dict[str, np.ndarray]) -> dict:
    """FID(real, X) / FID(real, other real) per distortion X, and the floor itself."""
    network = features.torchmetrics("cpu")

    def feats(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return torch.cat([network(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()

    base = feats(real)
    floor = fid_from_features(base, feats(other_real))
    return {"floor": floor, **{name: fid_from_features(base, feats(images)) / floor for name, images in distorted.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--measure-only", action="store_true", help="measure the weights in --out, do not train")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.measure_only:
        facts = {k: v for k, v in json.loads((out / "config.json").read_text()).items()
                 if k not in ("width", "dim", "projection")}
    else:
        start = time.perf_counter()
        model = train_encoder(steps=args.steps, seed=args.seed)
        facts = {"steps": args.steps, "seed": args.seed, "objective": "SimCLR NT-Xent on training-split renders",
                 "train_minutes": round((time.perf_counter() - start) / 60, 1)}
        save_encoder(model, out, facts)
        print(f"trained {args.steps} steps in {facts['train_minutes']} min -> {out}")
    n = args.eval_images
    real, other = real_images("heldout", n, 1), real_images("heldout", n, 2)
    distorted = distortions(real, n, 5)
    table = {"toy encoder": resolution(ToyEncoderFeatures(str(out)), real, other, distorted),
             "toy-CLIP": resolution(ToyFIDFeatures(), real, other, distorted)}
    print(f"FID(real, X) / FID(real, another real draw), {n} held-out images per set:")
    print(f"  {'X':32s} {'toy encoder':>12s} {'toy-CLIP':>10s}")
    for name in table["toy encoder"]:
        fmt = (lambda v: f"{v:.3f}") if name == "floor" else (lambda v: f"{v:.1f}x")
        print(f"  {name:32s} {fmt(table['toy encoder'][name]):>12s} {fmt(table['toy-CLIP'][name]):>10s}")
    config = json.loads((out / "config.json").read_text())
    save = {**config, **facts, "fid_resolution": {"images_per_set": n, **table}}
    (out / "config.json").write_text(json.dumps(save, indent=1) + "\n")


if __name__ == "__main__":
    main()
