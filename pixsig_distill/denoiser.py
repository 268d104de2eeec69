"""The denoiser: a PixArt network plus the noise schedule it was trained with.

What every method asks of a diffusion network, in one place: ε̂, x̂0 and v̂ at an integer DDPM timestep or at
continuous time, classifier-free guidance, and the TrigFlow view of the same network. `Teacher` keeps the text
(T5, the prompt cache, the empty prompt) and sampling; `teacher.denoiser` is this object over the teacher's
transformer, and every call takes another network of the same architecture (`transformer=`: a student, a fake
score, a LoRA copy).

Time. DDPM (Ho et al. 2020): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for t = 0..T−1, ᾱ from the scheduler (PixArt-Σ: linear β
1e-4..0.02, T = 1000). An integer tensor t indexes ᾱ; a floating-point t is continuous time, with log ᾱ linear
between the integer timesteps (exact at every integer, decreasing in t), and the network's sinusoidal timestep
embedding takes the real t as it is. Why log ᾱ: ᾱ_t = Π_{s≤t} (1 − β_s), so −log ᾱ is a sum of one term per step, and
linear inside each step is the continuous schedule whose β is constant over the step (the VP SDE's −log ᾱ(t) =
∫β). Both directions, t → ᾱ → t̂ and t̂ → t, are then closed forms and exact inverses, and both differentiate in
forward and reverse mode (the JVPs of continuous-time consistency go through t(t̂): jvp.py).

TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", §2): with
σ_d = 1, x_t̂ = cos t̂·x0 + sin t̂·z for t̂ in [0, π/2]. Matching the DDPM noising gives cos t̂ = √ᾱ_t and
sin t̂ = √(1−ᾱ_t): t̂ = arccos √ᾱ_t, and the DDPM x_t IS the TrigFlow x_t̂, no rescaling. The network's TrigFlow
output is its v-prediction (Salimans & Ho 2022): F = cos t̂·ε̂ − sin t̂·x̂0 = (ε̂ − sin t̂·x_t) / cos t̂, and back:
x̂0 = cos t̂·x_t − sin t̂·F, ε̂ = sin t̂·x_t + cos t̂·F. The trained range is t̂(0) ≈ 0.01 to t̂(T−1) ≈ 1.5644 on
PixArt-Σ's schedule, not π/2: there cos t̂ ≈ 0.0064, and F from ε̂ divides by it.
"""

from __future__ import annotations

from typing import Callable

import torch


# ---- the schedule at integer or continuous time ------------------------------------------------------------

def _alpha_bar_64(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t in float64: an integer t indexes the schedule, a floating-point t interpolates log ᾱ linearly."""
    log_a = alphas_cumprod.to(t.device, torch.float64).log()
    if not t.is_floating_point():
        return log_a[t.long()].exp()
    t = t.to(torch.float64).clamp(0, len(log_a) - 1)
    low = t.floor().long().clamp(max=len(log_a) - 2)
    frac = t - low
    return (log_a[low] * (1 - frac) + log_a[low + 1] * frac).exp()


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per element of `t` (float32): an integer t indexes the schedule; a floating-point t interpolates log ᾱ
    linearly between the neighbouring integers (t in [0, T−1])."""
    if not t.is_floating_point():
        return alphas_cumprod.to(t.device, torch.float32)[t.long()]
    return _alpha_bar_64(alphas_cumprod, t).float()


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 in, float64 out (exactness checks); anything else gives float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def trigflow_time(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t̂ = arccos √ᾱ_t: the TrigFlow time of DDPM time t (integer or continuous), in [0, π/2)."""
    return _alpha_bar_64(alphas_cumprod, t).sqrt().acos().to(_result_dtype(t))


def ddpm_time(alphas_cumprod: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """The continuous DDPM time t with √ᾱ_t = cos t̂, the inverse of `trigflow_time` (float32; float64 for a float64
    t̂). t̂ outside the trained range [t̂(0), t̂(T−1)] gives the nearest end, 0 or T−1, with the end segment's slope
    as its derivative: t̂(T−1) rounded to float32 may land just past the end, and must keep its time tangent."""
    minus_log_a = -alphas_cumprod.to(t_hat.device, torch.float64).log()  # increasing in t
    target = -2 * t_hat.to(torch.float64).cos().clamp(min=1e-12).log()  # −log ᾱ = −2 log cos t̂
    inside = target.clamp(minus_log_a[0], minus_log_a[-1])  # tensors, not numbers: the planner's have no values
    target = target + (inside - target).detach()  # the clamped value, the unclamped derivative
    high = torch.searchsorted(minus_log_a, target.detach()).clamp(1, len(minus_log_a) - 1)  # an index: no derivative
    low = high - 1
    frac = (target - minus_log_a[low]) / (minus_log_a[high] - minus_log_a[low])
    return (low + frac).to(_result_dtype(t_hat))


def ddpm_time_rate(alphas_cumprod: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """dt/dt̂ of `ddpm_time`: how many DDPM timesteps one unit of TrigFlow time is worth at t̂ (the chain-rule factor
    by which a tangent in t̂ reaches the network's time embedding). From t = k + (−2 log cos t̂ + log ᾱ_k) /
    (log ᾱ_k − log ᾱ_{k+1}): dt/dt̂ = 2 tan t̂ / (log ᾱ_k − log ᾱ_{k+1}); ≈ 2 tan t̂ / β_{k+1} (PixArt-Σ: 167 at t = 0,
    503 at T̄ = 400, 15,583 at t = 999)."""
    log_a = alphas_cumprod.to(t_hat.device, torch.float64).log()
    low = ddpm_time(alphas_cumprod, t_hat.detach().double()).floor().long().clamp(max=len(log_a) - 2)
    return (2 * t_hat.to(torch.float64).tan() / (log_a[low] - log_a[low + 1])).to(_result_dtype(t_hat))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () values shaped to broadcast against `like` (B, C, H, W), in its dtype."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def trigflow_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """F = (ε̂ − sin t̂·x_t) / cos t̂  (= cos t̂·ε̂ − sin t̂·x̂0, the v-prediction)."""
    return (eps - _per_sample(t_hat.sin(), x_t) * x_t) / _per_sample(t_hat.cos(), x_t)


def x0_from_trigflow(x_t: torch.Tensor, F: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """x̂0 = cos t̂·x_t − sin t̂·F."""
    return _per_sample(t_hat.cos(), x_t) * x_t - _per_sample(t_hat.sin(), x_t) * F


def eps_from_trigflow(x_t: torch.Tensor, F: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """ε̂ = sin t̂·x_t + cos t̂·F."""
    return _per_sample(t_hat.sin(), x_t) * x_t + _per_sample(t_hat.cos(), x_t) * F


# ---- the network with its schedule -------------------------------------------------------------------------

class Denoiser:
    """A PixArt transformer and its noise schedule: a light view that `Teacher.denoiser` makes on each access, over
    the pipeline's current components and device (take it where it is used: the planner swaps the networks' weights
    for fake tensors after a method is built).

    `null_embedding(batch, length)`: the empty prompt's embedding and mask, the unconditional branch of guidance
    (the teacher's text side owns it). `device`: where the schedule's tensors go (the transformer's device, or the
    GPU that offload hooks run it on)."""

    def __init__(self, transformer: torch.nn.Module, alphas_cumprod: torch.Tensor, vae_scale_factor: int,
                 null_embedding: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.transformer = transformer
        self.vae_scale_factor = vae_scale_factor
        self.null_embedding = null_embedding
        self.device = device
        self.alphas_cumprod = alphas_cumprod.to(device, torch.float32)  # ᾱ_t for t = 0..T−1

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # ---- ε, x0, v ----------------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
            transformer=None) -> torch.Tensor:
        """ε̂(x_t, t, text), one call of an ε-prediction network (the teacher, DMD's networks, LCM's)."""
        return self.output(x_t, t, embeds, mask, transformer)

    def output(self, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
               transformer=None) -> torch.Tensor:
        """What the network predicts at DDPM time t (integer or continuous), one call: ε̂ for an ε-prediction
        network, F for a v-prediction (TrigFlow) student. PixArt also predicts learned variances: only the first C
        channels are kept."""
        transformer = transformer or self.transformer
        if not torch.is_autocast_enabled(x_t.device.type):
            # Without autocast (mixed_precision=no, or DeepSpeed, which casts the weights instead) feed the
            # network its own dtype: a bf16 teacher gets bf16 latents, as in the pipeline.
            dtype = next(transformer.parameters()).dtype
            x_t, embeds = x_t.to(dtype), embeds.to(dtype)
        out = transformer(x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                          timestep=t.expand(x_t.shape[0]) if t.ndim <= 1 else t,
                          added_cond_kwargs=self._size_conditions(x_t), return_dict=False)[0]
        return out[:, : x_t.shape[1]]

    def _size_conditions(self, x_t: torch.Tensor) -> dict:
        """PixArt-α 1024 (`use_additional_conditions`) also takes the image size and aspect ratio, as
        `PixArtAlphaPipeline` passes them; PixArt-Σ takes none."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        height, width = (size * self.vae_scale_factor for size in x_t.shape[-2:])
        batch = x_t.shape[0]
        return {"resolution": torch.tensor([[height, width]], device=x_t.device, dtype=x_t.dtype).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[height / width]], device=x_t.device, dtype=x_t.dtype).repeat(batch, 1)}

    def guided_eps(self, x_t, t, embeds, mask, guidance_scale: float = 1.0, null=None, transformer=None):
        """Classifier-free guidance: ε_u + s (ε_c − ε_u)  (Ho & Salimans 2022, eq. 6); s ≤ 1 is plain ε_c."""
        if guidance_scale <= 1.0:
            return self.eps(x_t, t, embeds, mask, transformer)
        null_embeds, null_mask = null if null is not None else self.null_embedding(x_t.shape[0], embeds.shape[1])
        # One batched call [uncond, cond], as the pipeline does, so results match it bit for bit.
        both = self.eps(torch.cat([x_t, x_t]), torch.cat([t.expand(x_t.shape[0])] * 2),
                        torch.cat([null_embeds, embeds]), torch.cat([null_mask, mask]), transformer)
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t per sample, shaped to broadcast against `like` (integer or continuous t)."""
        return _per_sample(alpha_bar(self.alphas_cumprod, t), like)

    def x0(self, x_t, t, embeds, mask, guidance_scale: float = 1.0, transformer=None) -> torch.Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (DDPM eq. 15) from the (optionally guided) ε̂, in float32."""
        eps = self.guided_eps(x_t, t, embeds, mask, guidance_scale, transformer=transformer).float()
        a = self.alpha_bar(t, eps)
        return (x_t.float() - (1 - a).sqrt() * eps) / a.sqrt()

    def v(self, x_t, t, embeds, mask, guidance_scale: float = 1.0, transformer=None) -> torch.Tensor:
        """v̂ = √ᾱ_t·ε̂ − √(1−ᾱ_t)·x̂0 = (ε̂ − √(1−ᾱ_t)·x_t) / √ᾱ_t (Salimans & Ho 2022, §4), in float32."""
        eps = self.guided_eps(x_t, t, embeds, mask, guidance_scale, transformer=transformer).float()
        a = self.alpha_bar(t, eps)
        return (eps - (1 - a).sqrt() * x_t.float()) / a.sqrt()

    # ---- TrigFlow -----------------------------------------------------------------------------------------
    def trigflow_time(self, t: torch.Tensor) -> torch.Tensor:
        """t̂ = arccos √ᾱ_t of DDPM time t (integer or continuous)."""
        return trigflow_time(self.alphas_cumprod, t)

    def ddpm_time(self, t_hat: torch.Tensor) -> torch.Tensor:
        """The continuous DDPM time of TrigFlow time t̂ (clamped to the trained range)."""
        return ddpm_time(self.alphas_cumprod, t_hat)

    def trained_trigflow_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """t̂(0) and t̂(T−1), the TrigFlow times the network was trained between (≈ 0.01 and 1.5644 on PixArt-Σ);
        tensors, which the planner's fake tensors can be compared with."""
        ends = trigflow_time(self.alphas_cumprod, torch.tensor([0, self.num_train_timesteps - 1],
                                                               device=self.alphas_cumprod.device))
        return ends[0], ends[1]

    def ddpm_time_rate(self, t_hat: torch.Tensor) -> torch.Tensor:
        """dt/dt̂ at t̂: the chain-rule factor of a tangent in t̂ at the network's time embedding."""
        return ddpm_time_rate(self.alphas_cumprod, t_hat)

    def in_trigflow_time(self, embeds: torch.Tensor, mask: torch.Tensor, transformer=None
                         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """fn(x_t, t̂) → `output` at the continuous DDPM time t(t̂), for one batch of text: the function whose JVP in
        (x_t, t̂) continuous-time consistency needs (jvp.py). Differentiable in both arguments, forward mode
        included, inside the trained range; a t̂ beyond it reads as the nearest end (and has no time tangent)."""
        def call(x_t: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
            return self.output(x_t, self.ddpm_time(t_hat), embeds, mask, transformer)

        return call

    def trigflow(self, x_t, t_hat, embeds, mask, guidance_scale: float = 1.0, null=None,
                 transformer=None) -> torch.Tensor:
        """F(x_t̂, t̂) = (ε̂ − sin t̂·x_t) / cos t̂, the network's TrigFlow output at TrigFlow time t̂ (B,) or (), in
        float32. t̂ is clamped to the trained range first (the network has never seen t̂ past t̂(T−1))."""
        t_hat = t_hat.clamp(*self.trained_trigflow_range())
        t_hat = t_hat.expand(x_t.shape[0]) if t_hat.ndim == 0 else t_hat
        eps = self.guided_eps(x_t, self.ddpm_time(t_hat), embeds, mask, guidance_scale, null, transformer).float()
        return trigflow_from_eps(x_t.float(), eps, t_hat)
