"""`python -m pixsig_distill.train distill=dmd t_bar=400`: distil the teacher into a student.

A thin Hydra wrapper around `run(cfg)`, which tests call directly with a composed config.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import build, run_fingerprint, validate_train_config  # importing config also registers its resolvers
from .distributed import device_name, make_accelerator

from .loop import LoopConfig, RunLock, train
from .model_card import write_model_card
from .console import entry_point

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    validate_train_config(cfg)
    out_dir = Path(cfg.out_dir)
    # Lock the run folder before anything is written to it: a second run on it stops at once, and its
    # config.yaml never replaces the running one's.
    # The process's device and rank first (docs/scaling.md): under `accelerate launch` every process builds
    # its teacher on its own device, and only the main one locks and writes the run folder.
    accelerator = make_accelerator(cfg.device, cfg.train.mixed_precision, cfg.train.grad_accum, cfg.train.batch_size,
                                   cfg.train.log_with, out_dir)
    with RunLock(out_dir) if accelerator.is_main_process else contextlib.nullcontext():
        return _run(cfg, out_dir, accelerator)


def _run(cfg: DictConfig, out_dir: Path, accelerator) -> dict:
    set_seed(cfg.seed)
    teacher = build(cfg.model, device=str(accelerator.device))
    dataset = build(cfg.data)
    if isinstance(dataset, functools.partial):  # a dataset the teacher encodes (data=images: VAE latents, T5)
        dataset = dataset(teacher=teacher)
    if hasattr(dataset, "check_teacher"):  # cached embeddings: of this teacher's text encoder?
        dataset.check_teacher(teacher)
    if teacher.pipe.text_encoder is None and hasattr(dataset, "null_embedding"):
        embeds, mask = dataset.null_embedding()
        teacher.set_null_embedding(embeds[None].to(teacher.device, teacher.dtype), mask[None].to(teacher.device))
    method = build(cfg.distill, teacher=teacher)
    label = str(cfg.distill.get("name") or cfg.distill._target_.rsplit(".", 1)[-1]).upper()
    accelerator.print(f"pixsig-distill train: {label} on {cfg.model.pretrained} "
                      f"({teacher.resolution} px) → {out_dir}; {accelerator.num_processes} process(es) on "
                      f"{accelerator.device}, {cfg.train.max_steps} steps of {cfg.train.batch_size} × "
                      f"{cfg.train.grad_accum}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _logging_to(out_dir / "train.log"):
        if accelerator.is_main_process:
            (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        loop_cfg = LoopConfig(**OmegaConf.to_container(cfg.train, resolve=True))
        if teacher.pipe.text_encoder is None and hasattr(dataset, "preview_rows") and loop_cfg.preview_prompts:
            # No T5 to encode the preview prompts: preview cached prompts instead (those of them in the cache).
            items = [dataset[row] for row in dataset.preview_rows(list(loop_cfg.preview_prompts))]
            loop_cfg.preview_prompts = [item["prompt"] for item in items]
            teacher.add_prompt_embeddings(loop_cfg.preview_prompts, torch.stack([item["embeds"] for item in items]),
                                          torch.stack([item["mask"] for item in items]))
        summary = train(method, dataset, teacher, loop_cfg, out_dir, seed=cfg.seed, resume=cfg.resume,
                        accelerator=accelerator, fresh_method=lambda: build(cfg.distill, teacher=teacher),
                        tracker_config=OmegaConf.to_container(cfg, resolve=True), fingerprint=run_fingerprint(cfg))
        if summary.get("export"):
            print(f"student exported to {summary['export']}")
            facts = training_facts(cfg, summary, accelerator)
            previews = sorted((out_dir / "samples").glob("step-*.png"))
            write_model_card(summary["export"], facts, samples=previews[-1] if previews else None)
            if cfg.eval.get("metrics"):
                summary["eval"] = evaluate(cfg, teacher, summary["export"], out_dir)
                write_model_card(summary["export"], facts, summary["eval"], samples=out_dir / "eval_grid.png")
        return summary


def training_facts(cfg: DictConfig, summary: dict, accelerator) -> dict:
    """What the model card says about how the student was trained."""

    from .config_checks import random_weight_parts

    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    keys = {k: v for k, v in distill.items() if not isinstance(v, (dict, list)) and not k.startswith("_")}
    return {"command": "python -m pixsig_distill.train " + " ".join(HydraConfig.get().overrides.task)
            if HydraConfig.initialized() else None,
            "method": distill.get("_target_"), "teacher": cfg.model.pretrained,
            "steps": summary["step"], "batch size": f"{cfg.train.batch_size} × {cfg.train.grad_accum} accumulation "
            f"× {accelerator.num_processes} processes", "wall time": f"{summary['minutes']:.1f} min",
            "hardware": f"{accelerator.num_processes} × {device_name(accelerator.device)}",
            "mixed precision": cfg.train.mixed_precision, "seed": cfg.seed,
            "method settings": ", ".join(f"{k}={v}" for k, v in keys.items()),
            **({"sizing run": "yes: it measured the recipe's memory and speed with random-weight stand-ins ("
                + ", ".join(f"{path}: {name}" for path, name in random_weight_parts(cfg)) + "); its samples mean "
                "nothing"} if cfg.get("sizing_run") else {})}


@contextlib.contextmanager
def _logging_to(path: Path):
    """Everything a run writes goes under out_dir, the log included (Hydra logs to its own run folder, which is
    out_dir only by default). The handler leaves with the run: a later run in the same process (a sweep, a
    notebook) must not write into this one's log."""
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = root.level
    root.addHandler(handler)
    if level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)


def evaluate(cfg: DictConfig, teacher, export: str, out_dir: Path) -> dict:
    """Score the exported student right away, with the eval preset's engine (`eval.engine`: the leaderboard's), so
    every run folder holds its own figures (eval.md / .json / .csv, eval_grid.png)."""
    result = build(cfg.eval.engine)(cfg.eval, cfg.model, teacher, export, out_dir)
    print((out_dir / "eval.md").read_text().split("\n## ")[0])
    log.info("evaluation written to %s", out_dir / "eval.md")
    return result


main = entry_point("train", run, validate=functools.partial(validate_train_config, check_resume=False))


if __name__ == "__main__":
    main()
