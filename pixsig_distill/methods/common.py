"""Pieces every method shares: trainable copies of the teacher, EMA, optimizer steps, export."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from .. import deepspeed_engines
from ..distributed import clip_grad_norm, copy_full_into, full_tensor, resharded
from ..lora import DEFAULT_TARGETS, add_lora, save_lora
from ..model_card import STUDENT_CARD, write_model_card
from ..teacher import pipeline_class, source_folder
from .base import EXPORT_CARD_KEYS, check_card

log = logging.getLogger(__name__)



def trainable_copy(module: torch.nn.Module, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A float32 trainable copy of a frozen network (students and fake scores start from the teacher)."""
    clone = copy.deepcopy(module).float().train().requires_grad_(True)
    if gradient_checkpointing:
        clone.enable_gradient_checkpointing()
    return clone


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `module` whose parameters and buffers ARE the original's (no memory): adapters can be
    injected into the copy while the original stays exactly as it was."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def lora_network(base: torch.nn.Module, rank: int, alpha: float | None, target_modules,
                 gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Trainable LoRA adapters (float32, peft) on a frozen `base`, which stays in its own (training) dtype."""
    base.requires_grad_(False)
    if gradient_checkpointing:
        base.enable_gradient_checkpointing()
    return add_lora(base, rank, alpha, target_modules).train()


def trained_network(teacher_transformer: torch.nn.Module, lora_rank: int = 0, lora_alpha: float | None = None,
                    target_modules=DEFAULT_TARGETS, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A network initialised from the teacher: a full float32 copy (`lora_rank=0`), or LoRA adapters on a
    frozen copy kept in the teacher's dtype (a bf16 base costs a quarter of a float32 network with its grads)."""
    if not lora_rank:
        return trainable_copy(teacher_transformer, gradient_checkpointing)
    return lora_network(copy.deepcopy(teacher_transformer), lora_rank, lora_alpha, target_modules,
                        gradient_checkpointing)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 plain transformer with the LoRA adapters merged in (what stock diffusers loads)."""
    return copy.deepcopy(model).float().merge_and_unload()


def trained_parameters(model: torch.nn.Module):
    """(name, parameter) of the tensors an optimizer trains, named as in the bare network (no wrapper prefixes)."""
    return [(name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""), p)
            for name, p in model.named_parameters() if p.requires_grad]


class TrainableParameters(torch.nn.Module):
    """The trainable tensors of a model, shared (not copied): checkpoints of a LoRA network hold the adapters only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        for name, param in trained_parameters(model):
            self.register_parameter(name.replace(".", "__"), param)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """`module`'s trained tensors get no gradient for the duration: a network another one's loss reads (DMD's fake
    score while the generator learns) neither collects gradients nor, checkpointed, recomputes its forward in the
    backward under another requires_grad state than it ran with.
    Under FSDP2 the flag is set on the sharded parameters, which pass it on when they are next gathered; a forward
    without backward leaves the gathered ones registered (and the flag with them), so both ends reshard first."""
    params = [p for _, p in trained_parameters(resharded(module))]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        resharded(module)
        for p in params:
            p.requires_grad_(True)


def _float32_copy(p: torch.Tensor, device) -> torch.Tensor:
    if p.device.type == "meta":  # a network without weights (the planner) gets an EMA without weights
        return torch.empty(p.shape, dtype=torch.float32, device="meta")
    return p.detach().to(device or p.device, torch.float32, copy=True)


class EMA(torch.nn.Module):
    """θ_ema ← decay·θ_ema + (1 − decay)·θ over a network's trained tensors, in float32 on `device`.

    Only the trained tensors are averaged (a LoRA generator's EMA is its adapters'), and `device="cpu"` keeps it
    off the accelerator. Its state dict uses the network's own names, so a full generator's EMA checkpoint is a
    transformer state dict."""

    def __init__(self, model: torch.nn.Module, decay: float, device: str | torch.device | None = None):
        super().__init__()
        self.decay = decay
        self.on_cpu = device is not None and torch.device(device).type == "cpu"
        self.shadow = {name: _float32_copy(p, device) for name, p in trained_parameters(model)}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Every process calls it: a sharded (FSDP2) parameter is gathered first, a collective."""
        for name, p in trained_parameters(model):
            shadow = self.shadow[name]
            shadow.lerp_(full_tensor(p.detach()).to(shadow.device, torch.float32), 1 - self.decay)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = sorted(set(self.shadow) - set(state_dict))
        if missing:
            raise KeyError(f"EMA checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state_dict[name])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, p in trained_parameters(model):
            copy_full_into(p, self.shadow[name])
        return model

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """`model` with the EMA weights in place for the duration (previews); its own weights come back after.
        A sharded (FSDP2) model is resharded at both ends: a forward without backward leaves its gathered
        parameters registered, which the sharded backup could not be copied into. ZeRO-3 parameters are gathered
        for the swap and re-partitioned with the written values."""
        with deepspeed_engines.written_back(model):  # ZeRO-3: full while here, re-partitioned on leaving
            backup = {name: p.detach().to("cpu", copy=True) for name, p in trained_parameters(resharded(model))}
            self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad(), deepspeed_engines.written_back(model):
                for name, p in trained_parameters(resharded(model)):
                    p.copy_(backup[name].to(p.device))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ; a sharded θ is gathered first (every process calls this)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(full_tensor(p.detach()).to(p_ema.dtype), 1 - decay)


def accumulated_step(accelerator, model, optimizer, micro_losses, grad_clip: float | None) -> tuple[float, float]:
    """One optimizer update of `model` from one or more micro-batches (gradient accumulation).

    `micro_losses` are callables, one per micro-batch; each returns that micro-batch's share of the batch loss
    (the shares add up to the loss of the whole batch), so n micro-batches of b samples give exactly the gradient
    of one batch of n·b. backward of every share (DDP all-reduces once, on the last) → clip → step → free the
    gradients.
    Returns (batch loss, gradient norm before clipping) as tensors: the loop reads them (no sync per micro-batch,
    and the planner runs this on fake tensors, which have no values).

    Accumulation is done here rather than by `accelerator.accumulate()`: accelerate counts every call of that
    context, so a method that updates two networks per step (DMD: generator, then fake score) would land one of
    them on a non-sync micro-step forever and never update it.
    """
    if deepspeed_engines.is_deepspeed(accelerator):  # one micro-batch (grad_accum=1): the engine steps itself
        (micro_loss,) = micro_losses
        loss = micro_loss()
        return loss.detach().float(), deepspeed_engines.step(model, loss)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, micro_loss in enumerate(micro_losses):
        last = i == len(micro_losses) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = micro_loss()
            accelerator.backward(loss)
        total = total + loss.detach().float()
    norm = clip_grad_norm(accelerator, model, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next network's update needs the memory
    return total, norm if norm is not None else torch.tensor(float("nan"))


def micro_slices(batch_size: int, micro_batches: int) -> list[slice]:
    """The rows of each of `micro_batches` equal micro-batches of a batch (the loop makes it divisible)."""
    if micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(f"a batch of {batch_size} does not split into {micro_batches} equal micro-batches")
    size = batch_size // micro_batches
    return [slice(i * size, (i + 1) * size) for i in range(micro_batches)]


def export_network(teacher, network: torch.nn.Module, scheduler, out_dir: Path, card: dict, full_pipeline: bool,
                   lora: bool = False) -> Path:
    """`export_pipeline` for a trained network; a LoRA network is merged into a full transformer and its adapter
    is written beside it in peft format (export/lora), with the card and the teacher it was trained on."""
    if not lora:
        return export_pipeline(teacher, network, scheduler, out_dir, card, full_pipeline)
    lora_card = {**{k: v for k, v in card.items() if k != "lora"}, "base": getattr(teacher.pipe, "name_or_path", None)}
    return export_pipeline(teacher, merged_copy(network), scheduler, out_dir, card, full_pipeline,
                           extra=lambda folder: save_lora(network, folder / "lora", lora_card, scheduler))


def export_pipeline(teacher, transformer: torch.nn.Module, scheduler, out_dir: Path, card: dict,
                    full_pipeline: bool, extra=None) -> Path:
    """Write a student so that stock diffusers loads it (`PixArtSigmaPipeline`, or `PixArtAlphaPipeline` for
    PixArt-α 1024).

    `full_pipeline=True` writes every component; the ones distillation did not change (tokenizer, T5, VAE) are
    copied from the teacher's own folder when it is on disk, so they keep their original files and dtype. A teacher
    loaded without T5 (cached embeddings) cannot give a full pipeline: then, as with `full_pipeline=False`, only
    transformer/ and scheduler/ are written and the card names the teacher, and
    `PixArtSigmaPipeline.from_pretrained(teacher_id, transformer=..., scheduler=...)` assembles the pipeline
    (docs/export.md). The card also records the teacher and the resolution.

    The folder is written as `<out_dir>.tmp` and renamed, so an export that exists is complete. The card is checked
    first (methods/base.py: CARD_KEYS): what samples, evaluates and describes the student reads it.
    """
    check_card(card)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if full_pipeline and teacher.pipe.text_encoder is None:
        log.warning("the teacher was loaded without its text encoder (model.load_text_encoder=false): exporting "
                    "transformer/ + scheduler/ only, to be loaded on top of the teacher '%s' (docs/export.md)",
                    _teacher_id(teacher))
        full_pipeline = False
    if full_pipeline:
        pipe = pipeline_class(transformer)(tokenizer=teacher.pipe.tokenizer, text_encoder=teacher.pipe.text_encoder,
                                           vae=teacher.vae, transformer=transformer, scheduler=scheduler)
        pipe.save_pretrained(tmp, safe_serialization=True)
        source = source_folder(teacher.pipe)
        for name in ("tokenizer", "text_encoder", "vae"):  # unchanged: the teacher's own files, in their own dtype
            if source is not None and (source / name).is_dir():
                shutil.rmtree(tmp / name)
                shutil.copytree(source / name, tmp / name)
    else:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
    if extra is not None:  # more files of the export (e.g. the LoRA adapter), inside the same atomic rename
        extra(tmp)
    written = (full_pipeline, _teacher_id(teacher), teacher.resolution, pipeline_class(transformer).__name__)
    card = {**card, **dict(zip(EXPORT_CARD_KEYS, written))}
    (tmp / STUDENT_CARD).write_text(json.dumps(card, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    write_model_card(out_dir)  # README.md; the training run adds its facts and figures later
    return out_dir


def _teacher_id(teacher) -> str | None:
    return str(getattr(teacher.pipe, "name_or_path", None) or "") or None
