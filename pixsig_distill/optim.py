"""Optimizers a config can name besides torch's own (`_target_: pixsig_distill.optim.adamw_8bit`)."""

from __future__ import annotations

from .errors import UserError


def adamw_8bit(params, lr: float = 1e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
    """bitsandbytes' 8-bit AdamW: both moments in 8 bits with a scale per block, ~1/4 of AdamW's state memory
    (2 bytes per parameter instead of 8). Needs a CUDA GPU and `pip install "pixsig-distill[8bit]"`."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("adamw_8bit (bitsandbytes) runs on CUDA GPUs only and this machine has none; use "
                        "torch.optim.AdamW here (python -m pixsig_distill.plan predicts the 8-bit run's memory)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError('adamw_8bit needs bitsandbytes: pip install "pixsig-distill[8bit]"') from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _plan_with_state_sized_adam(node):
    """The planner cannot run bitsandbytes (CUDA): it plans an optimizer with 8-bit AdamW's state sizes."""
    return {**node, "_target_": "pixsig_distill.fake_step.adamw_8bit_stand_in"}


adamw_8bit.plan_stand_in = _plan_with_state_sized_adam
