"""Pieces every method shares: trainable copies of the teacher, EMA, optimizer steps, export."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from diffusers import PixArtSigmaPipeline

STUDENT_CARD = "pixsig_student.json"


def trainable_copy(module: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A float32 trainable copy of a frozen network (students and fake scores start from the teacher)."""
    clone = copy.deepcopy(module).float().train().requires_grad_(True)
    if gradient_checkpointing:
        clone.enable_gradient_checkpointing()
    return clone


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


def optimizer_step(accelerator, model, optimizer, loss: torch.Tensor, grad_clip: float | None) -> float:
    """backward → clip → step → zero_grad; returns the gradient norm before clipping (nan if not synced)."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = float("nan")
    if accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
        grad_norm = float(norm) if norm is not None else float("nan")
    optimizer.step()
    return grad_norm


def export_pipeline(teacher, transformer: torch.nn.Module, scheduler, out_dir: Path, card: dict,
                    full_pipeline: bool, extra=None) -> Path:
    """Write a student so that stock `PixArtSigmaPipeline.from_pretrained` loads it.

    `full_pipeline=True` writes every component (the toy: a few MB). For the real model the 4.7B T5
    and the VAE are the teacher's, unchanged: only transformer/ and scheduler/ are written, with the
    teacher's id in the card, and `PixArtSigmaPipeline.from_pretrained(teacher_id, transformer=...,
    scheduler=...)` assembles the pipeline (see docs/export.md).

    The folder is written as `<out_dir>.tmp` and renamed, so an export that exists is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if full_pipeline:
        pipe = PixArtSigmaPipeline(tokenizer=teacher.pipe.tokenizer, text_encoder=teacher.pipe.text_encoder,
                                   vae=teacher.vae, transformer=transformer, scheduler=scheduler)
        pipe.save_pretrained(tmp, safe_serialization=True)
    else:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
    if extra is not None:  # more files of the export (e.g. the LoRA adapter), inside the same atomic rename
        extra(tmp)
    (tmp / STUDENT_CARD).write_text(json.dumps({**card, "full_pipeline": full_pipeline}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir
