"""A world whose answer is known exactly, for tests that a method learns in the right direction.

Data: per caption, x0 ~ N(μ(text), s² I), with μ a per-channel mean read off the caption. The teacher is no
trained approximation of it: its network computes the exact ε of that Gaussian at every t,

    ε*(x_t, t) = √(1−ᾱ_t)·(x_t − √ᾱ_t·μ) / (ᾱ_t·s² + 1 − ᾱ_t),

so every distribution a method should reach has a closed form:
- the teacher's (guided) distribution is N(μ_g, s²) with μ_g = μ_u + w·(μ_c − μ_u) (CFG of two Gaussians that
  share s is the Gaussian with the guided mean): what DMD's generator must match;
- its probability-flow ODE from x_T is linear, x0 = μ_g + s·(x_T − √ᾱ_T μ_g)/√(ᾱ_T s² + 1 − ᾱ_T): what LCM must
  reproduce from the same noise;
- a fine-tune on data N(μ', s'²) must move μ(text) and s toward them.

The network is a stand-in for PixArtTransformer2DModel with its call signature, a `transformer_blocks` list (the
DMD2 head hooks one) and linear layers LoRA can adapt. Its parameters (the caption → μ map and a log s per
timestep) can represent every answer above exactly, so a method that follows its gradient the right way gets there,
and one with a flipped sign runs away. It costs microseconds per call: a few dozen steps run in seconds.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from pixsig_distill.teacher import Teacher
from pixsig_distill.schedule import PIXART_SCHEDULER
from pixsig_distill.testing import tiny_pipeline

TARGETS = ["caption_proj", "log_std", "proj"]  # the linears LoRA adapts here (distill.*.lora_target_modules)


class FeatureBlock(torch.nn.Module):
    """Per-pixel tokens (x_t values, projected caption) → (B, H·W, width): what a GAN head on the trunk reads."""

    def __init__(self, channels: int, caption_dim: int, width: int):
        super().__init__()
        self.caption = torch.nn.Linear(caption_dim, width - channels)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x_t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_t.shape
        pixels = x_t.flatten(2).transpose(1, 2)                               # (B, HW, C)
        text = self.caption(pooled)[:, None].expand(b, h * w, -1)              # (B, HW, width − C)
        return self.proj(torch.cat([pixels, text], dim=-1))


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact ε of N(μ(text), s(t)² I), called like PixArtTransformer2DModel (ε channels + learned-σ channels)."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, caption_channels: int = 32, std: float = 0.2,
                 num_attention_heads: int = 1, attention_head_dim: int = 16):
        super().__init__()
        self.caption_proj = torch.nn.Linear(caption_channels, in_channels)   # μ(text) from the mean-pooled caption
        self.log_std = torch.nn.Linear(1000, 1, bias=False)  # log s(t), one per timestep (read with a one-hot t)
        torch.nn.init.constant_(self.log_std.weight, math.log(std))
        self.transformer_blocks = torch.nn.ModuleList(
            [FeatureBlock(in_channels, caption_channels, num_attention_heads * attention_head_dim)])
        self.use_additional_conditions = False
        schedule = DDPMScheduler(**{k: PIXART_SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                     "beta_schedule")})
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)

    def mean(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        mask = encoder_attention_mask.to(encoder_hidden_states.dtype)[..., None]
        pooled = (encoder_hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled, self.caption_proj(pooled)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                added_cond_kwargs=None, return_dict=False):
        x_t = hidden_states
        pooled, mu = self.mean(encoder_hidden_states, encoder_attention_mask)
        for block in self.transformer_blocks:  # features for a GAN head (hooked); the exact ε does not read them
            block(x_t, pooled)
        t = timestep.long().clamp(0, 999)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        var = torch.exp(2 * self.log_std(F.one_hot(t, 1000).to(x_t.dtype))).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu[..., None, None]) / (a * var + 1 - a)
        return (torch.cat([eps, torch.zeros_like(eps)], dim=1),)


class ConsistencyGaussian(GaussianDenoiser):
    """The same world in continuous time, for continuous-time consistency (sCM, rCM): a network whose output can be
    the teacher's exact ε and also the exact consistency velocity that a TrigFlow student must reach.

    With x_t̂ = cos t̂·x0 + sin t̂·z and x0 ~ N(μ, s²), σ² = cos² t̂·s² + sin² t̂:
    - the teacher's ε*(x_t̂) = sin t̂·(x_t̂ − cos t̂·μ)/σ², exact at every real t (ᾱ log-linear between integers, as in
      pixsig_distill/denoiser.py, so t̂ ↔ t is the denoiser's own map, and the time tangent reaches ᾱ);
    - the ODE keeps (x − cos t̂·μ)/σ constant, so the consistency function is f*(x_t̂) = μ + s·(x_t̂ − cos t̂·μ)/σ and
      its TrigFlow velocity (f = cos t̂·x − sin t̂·F) is F* = ((cos t̂ − s/σ)·x − (1 − s·cos t̂/σ)·μ)/sin t̂.
    The output is (1 − λ)·ε*(μ, s) + λ·F*(μ, s_F), with λ, log s, log s_F and the caption → μ map trained: λ = 0 is
    the teacher, λ = 1, s_F = s and μ the guided mean are the answer of distilling its guided ODE."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, caption_channels: int = 32, std: float = 0.2,
                 num_attention_heads: int = 1, attention_head_dim: int = 16):
        super().__init__(in_channels, sample_size, caption_channels, std, num_attention_heads, attention_head_dim)
        del self.log_std
        self.log_std = torch.nn.Parameter(torch.tensor(math.log(std)))       # s of the ε branch
        self.log_std_f = torch.nn.Parameter(torch.tensor(math.log(std)))     # s_F of the velocity branch
        self.gate = torch.nn.Parameter(torch.tensor(0.0))                     # λ

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                added_cond_kwargs=None, return_dict=False):
        from pixsig_distill.denoiser import alpha_bar

        x_t = hidden_states
        pooled, mu = self.mean(encoder_hidden_states, encoder_attention_mask)
        for block in self.transformer_blocks:
            block(x_t, pooled)
        t = timestep if timestep.is_floating_point() else timestep.long()
        a = alpha_bar(self.alphas_cumprod, t.expand(x_t.shape[0]) if t.ndim == 0 else t).view(-1, 1, 1, 1)
        cos, sin, mu = a.sqrt(), (1 - a).sqrt(), mu[..., None, None]
        s, s_f = self.log_std.exp(), self.log_std_f.exp()
        eps = sin * (x_t - cos * mu) / (cos**2 * s**2 + sin**2)
        sigma_f = (cos**2 * s_f**2 + sin**2).sqrt()
        velocity = ((cos - s_f / sigma_f) * x_t - (1 - s_f * cos / sigma_f) * mu) / sin
        out = (1 - self.gate) * eps + self.gate * velocity
        return (torch.cat([out, torch.zeros_like(out)], dim=1),)


def consistency_solution(teacher: Teacher, x_t: torch.Tensor, t: int, mu: torch.Tensor, std: float = 0.2):
    """f*(x_t) = μ + s·(x_t − √ᾱ μ)/√(ᾱ s² + 1 − ᾱ): the guided ODE's end from x_t (ConsistencyGaussian's world)."""
    a = teacher.denoiser.alphas_cumprod[t]
    mu = mu[..., None, None]
    return mu + std * (x_t - a.sqrt() * mu) / (a * std**2 + 1 - a).sqrt()


PROMPTS = ["red", "blue", "green"]


def known_teacher(means=((1.0, 0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0)), null=(0.0,) * 4,
                  std: float = 0.2, guidance_scale: float = 3.0, network_class=GaussianDenoiser) -> Teacher:
    """The Gaussian teacher behind `PROMPTS` (each with its per-channel mean; the empty prompt: `null`), with a
    tiny real T5 and VAE so that the project's own Teacher wraps it (`network_class`: ConsistencyGaussian for
    continuous time)."""
    pipe = tiny_pipeline(seed=0)
    teacher = Teacher(pipe, max_sequence_length=8, guidance_scale=guidance_scale, num_inference_steps=20,
                      device="cpu")
    network = network_class(std=std, caption_channels=pipe.text_encoder.config.d_model)
    torch.manual_seed(0)
    pooled, _ = network.mean(*teacher.encode_prompts(PROMPTS + [""]))
    # caption_proj fitted exactly: the four pooled captions are independent, so W·pooled + b hits every mean
    design = torch.cat([pooled, torch.ones(len(pooled), 1)], dim=1)
    targets = torch.tensor([*means, null])
    solution = torch.linalg.lstsq(design, targets).solution
    with torch.no_grad():
        network.caption_proj.weight.copy_(solution[:-1].T)
        network.caption_proj.bias.copy_(solution[-1])
    assert torch.allclose(network.mean(*teacher.encode_prompts(PROMPTS + [""]))[1], targets, atol=1e-4)
    pipe.transformer = network.eval().requires_grad_(False)
    pipe.scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return teacher


def guided_mean(teacher: Teacher, prompts: list[str], scale: float) -> torch.Tensor:
    """μ_u + w·(μ_c − μ_u): the mean of the teacher's CFG-w distribution for each prompt, (B, C)."""
    network = teacher.transformer
    mu_c = network.mean(*teacher.encode_prompts(prompts))[1]
    mu_u = network.mean(*teacher.null_embedding(len(prompts)))[1]
    return mu_u + scale * (mu_c - mu_u)


def ode_solution(teacher: Teacher, x_T: torch.Tensor, t: int, mu: torch.Tensor) -> torch.Tensor:
    """The teacher's probability-flow ODE from x_t to 0, exactly: x0 = μ + s·(x_t − √ᾱμ)/√(ᾱs² + 1 − ᾱ)."""
    a = teacher.denoiser.alphas_cumprod[t]
    s = float(teacher.transformer.log_std.weight[0, t].exp())
    mu = mu[..., None, None]
    return mu + s * (x_T - a.sqrt() * mu) / (a * s**2 + 1 - a).sqrt()


def gaussian_distance(samples: torch.Tensor, mean: torch.Tensor, std: float) -> float:
    """W2² between each sample's pixels (per channel) and N(mean, std²), averaged: (m − μ)² + (σ − s)²."""
    m = samples.mean(dim=(2, 3))
    s = samples.std(dim=(2, 3))
    return float(((m - mean) ** 2 + (s - std) ** 2).mean())


def real_latents(teacher: Teacher, prompts: list[str], gen: torch.Generator, std: float = 0.2) -> torch.Tensor:
    """Draws of the data the teacher is exact for (unguided: the caption's own mean)."""
    mu = guided_mean(teacher, prompts, 1.0)
    return mu[..., None, None] + std * torch.randn(teacher.latent_shape(len(prompts)), generator=gen)


class KnownRealImages:
    """DMD2's real data in this world (the interface of conf/distill/real_images/*: `sample`)."""

    def __init__(self, teacher: Teacher, std: float = 0.2, mean_shift: float = 0.0):
        self.teacher, self.std, self.mean_shift = teacher, std, mean_shift

    def sample(self, batch_size: int, gen, device, dtype):
        rows = gen.randint(0, len(PROMPTS), batch_size)
        prompts = [PROMPTS[i] for i in rows.tolist()]
        embeds, mask = self.teacher.encode_prompts(prompts)
        noise = gen.randn(self.teacher.latent_shape(batch_size))
        x0 = guided_mean(self.teacher, prompts, 1.0)[..., None, None] + self.mean_shift + self.std * noise
        return x0.to(device, dtype), embeds.to(device, dtype), mask.to(device)


def batch(teacher: Teacher, size: int, gen: torch.Generator, latents: torch.Tensor | None = None) -> dict:
    rows = torch.randint(0, len(PROMPTS), (size,), generator=gen)
    prompts = [PROMPTS[i] for i in rows.tolist()]
    embeds, mask = teacher.encode_prompts(prompts)
    out = {"prompt": prompts, "embeds": embeds, "mask": mask}
    if latents is not None:
        out["latents"] = latents
    return out


def fixed_eval(teacher: Teacher, per_prompt: int = 16, seed: int = 123) -> SimpleNamespace:
    """The same prompts and noise before and after training."""
    prompts = [p for p in PROMPTS for _ in range(per_prompt)]
    embeds, mask = teacher.encode_prompts(prompts)
    noise = torch.randn(teacher.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(prompts=prompts, embeds=embeds, mask=mask, noise=noise)

