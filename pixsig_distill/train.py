"""`python -m pixsig_distill.train distill=dmd t_bar=400`: distil the teacher into a student.

A thin Hydra wrapper around `run(cfg)`, which tests call directly with a composed config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from .config import build, check_int  # importing config also registers its resolvers

from .errors import UserError, exit_on_user_error
from .loop import LoopConfig, train

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Reject bad values before anything is loaded, with the fix in the message."""
    check_int(cfg, "t_bar", 1, 999, "use an integer in 1..999 (the PixArt-Σ DMD recipe uses 400)")
    check_int(cfg, "seed", 0)
    for key in ("train.max_steps", "train.batch_size", "train.grad_accum", "train.log_every",
                "train.sample_every", "train.ckpt_every"):
        check_int(cfg, key, 1)
    if cfg.train.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"train.mixed_precision={cfg.train.mixed_precision!r}; use no, fp16 or bf16")


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    out_dir = Path(cfg.out_dir)
    set_seed(cfg.seed)
    teacher = build(cfg.model)
    dataset = build(cfg.data)
    if teacher.pipe.text_encoder is None and hasattr(dataset, "null_embedding"):
        embeds, mask = dataset.null_embedding()
        teacher.set_null_embedding(embeds[None].to(teacher.device, teacher.dtype), mask[None].to(teacher.device))
    method = build(cfg.distill, teacher=teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log_to(out_dir / "train.log")
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loop_cfg = LoopConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    summary = train(method, dataset, teacher, loop_cfg, out_dir, seed=cfg.seed, resume=cfg.resume)
    if summary.get("export"):
        print(f"student exported to {summary['export']}")
        if cfg.eval.get("_target_"):
            summary["eval"] = evaluate(cfg, teacher, summary["export"], out_dir)
    return summary


def _log_to(path: Path) -> None:
    """Everything a run writes goes under out_dir, the log included (Hydra logs to its own run folder,
    which is out_dir only by default)."""
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)


def evaluate(cfg: DictConfig, teacher, export: str, out_dir: Path) -> dict:
    """Score the exported student right away so every run folder holds its own figures."""
    report = build(cfg.eval)(export=export, teacher=teacher, out_dir=out_dir)
    for name, figures in report.items():
        if isinstance(figures, dict) and "fid" in figures:
            ratios = (f"  (FID {figures['fid_ratio_to_teacher']:.2f}× teacher, CLIP {figures['clip_ratio_to_teacher']:.3f}×)"
                      if "fid_ratio_to_teacher" in figures else "")
            msg = (f"{name}: FID {figures['fid']:.2f}  CLIP {figures['clip_score']:.4f}  "
                   f"caption acc {figures['caption_accuracy']:.3f}{ratios}")
            log.info(msg)
            print(msg)
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
