"""Plot training scalars of one or more runs from their TensorBoard logs (e.g. DMD2's discriminator accuracy).

    python scripts/plot_scalars.py --runs RUN_A RUN_B --labels "per-token, t ≤ 999" "projection, t ≤ 300" \\
        --keys d_real_acc d_fake_acc loss_gan_d --out docs/results/toy/dmd2_d_acc.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(run: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the run's tensorboard/ folder (every event file under it)."""
    steps, values = [], []
    for folder in sorted({p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if key in events.Tags()["scalars"]:
            for event in events.Scalars(key):
                steps.append(event.step)
                values.append(event.value)
    order = sorted(range(len(steps)), key=steps.__getitem__)
    return [steps[i] for i in order], [values[i] for i in order]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--keys", nargs="+", default=["d_real_acc", "d_fake_acc", "loss_gan_d"])
    parser.add_argument("--chance", nargs="*", default=["d_real_acc:0.5", "d_fake_acc:0.5", "loss_gan_d:1.386"],
                        help="KEY:VALUE lines to draw (chance levels)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    chance = dict(item.split(":") for item in args.chance)
    fig, axes = plt.subplots(1, len(args.keys), figsize=(4.2 * len(args.keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for run, label in zip(args.runs, labels):
            steps, values = scalars(run, key)
            if steps:
                ax.plot(steps, values, label=label)
        if key in chance:
            ax.axhline(float(chance[key]), ls="--", color="gray", lw=1, label="chance")
        ax.set_xlabel("generator step")
        ax.set_title(key)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
