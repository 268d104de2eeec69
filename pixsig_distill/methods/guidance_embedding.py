"""The LCM paper's guidance-scale (w) embedding, grafted onto a PixArt transformer.

LCM (Luo et al. 2023, §4.2) feeds the guidance scale w to the student so that one model serves a
range of w: in diffusers' UNet this is `time_cond_proj`, a projection of a sinusoidal embedding of
w added to the sinusoidal timestep features before the timestep MLP. `PixArtTransformer2DModel` has
no such input, so we add the same thing from outside: a small MLP (zero-initialised last layer, so
the student starts equal to the teacher) registered as the submodule `guidance_embedding`, whose
output a forward pre-hook adds to the input of `adaln_single.emb.timestep_embedder`.

Stock diffusers cannot run the hook, but for one fixed w the added vector c(w) is a constant, and
linear_1(u + c) = linear_1(u) + W₁·c: `bake_guidance` folds it into linear_1's bias exactly, giving a
plain `PixArtTransformer2DModel` that stock pipelines load (sampling at that w only).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from diffusers.models.embeddings import get_timestep_embedding

NAME = "guidance_embedding"


def _timestep_embedder(transformer):
    return transformer.adaln_single.emb.timestep_embedder


class GuidanceEmbedding(torch.nn.Module):
    """sinusoid(1000·w) → Linear → SiLU → Linear (zero init) → added to the timestep features."""

    def __init__(self, out_dim: int, freq_dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = torch.nn.Sequential(torch.nn.Linear(freq_dim, hidden_dim), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden_dim, out_dim))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)
        self.w: torch.Tensor | None = None  # set for the duration of a forward by `guidance()`

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # The same sinusoid as LCM's guidance embedding: w scaled by 1000, log-spaced frequencies.
        freqs = get_timestep_embedding(w.float() * 1000, self.freq_dim, flip_sin_to_cos=False, downscale_freq_shift=1)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))

    def add_to_input(self, module, args):
        """Forward pre-hook on the timestep MLP: its input u becomes u + c(w)."""
        if self.w is None:
            raise RuntimeError("a transformer with a guidance embedding was called outside `guidance(model, w)`")
        features = args[0]
        return (features + self(self.w.to(features.device)).to(features.dtype), *args[1:])


def add_guidance_embedding(transformer, hidden_dim: int = 256) -> GuidanceEmbedding:
    """Graft a fresh w-embedding onto `transformer` (in place) and hook it in."""
    embedder = _timestep_embedder(transformer)
    module = GuidanceEmbedding(embedder.linear_1.in_features, hidden_dim=hidden_dim).to(embedder.linear_1.weight)
    transformer.add_module(NAME, module)
    # A bound method: deep copies of the transformer (the EMA target) hook their own copy of it.
    embedder.register_forward_pre_hook(module.add_to_input)
    return module


def has_guidance_embedding(transformer) -> bool:
    return hasattr(transformer, NAME)


@contextmanager
def guidance(transformer, w: torch.Tensor | None):
    """Run `transformer` at guidance scales w (B,); a no-op for transformers without the embedding."""
    if not has_guidance_embedding(transformer):
        yield
        return
    module = getattr(transformer, NAME)
    module.w = w
    try:
        yield
    finally:
        module.w = None


@torch.no_grad()
def bake_guidance(transformer, plain, w: float):
    """A copy of `plain` (a stock transformer of the same config) holding `transformer`'s weights with
    the w-embedding at scale `w` folded into timestep_embedder.linear_1's bias (exact)."""
    baked = copy.deepcopy(plain).to(next(transformer.parameters()))
    weights = {k: v for k, v in transformer.state_dict().items() if not k.startswith(NAME + ".")}
    baked.load_state_dict(weights)
    shift = getattr(transformer, NAME)(torch.tensor([float(w)], device=baked.device))[0]
    linear = _timestep_embedder(baked).linear_1
    linear.bias += linear.weight @ shift.to(linear.weight.dtype)
    return baked
