"""JVPs of a PixArt transformer call in (x_t, t̂): forward-mode AD on the math attention path against finite
differences along the same tangent, the chain rule through t(t̂), and the TrigFlow view of PixArt's schedule (the
denoiser's, pixsig_distill/denoiser.py)."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from pixsig_distill.denoiser import (Denoiser, ddpm_time, ddpm_time_rate, eps_from_trigflow, trigflow_from_eps,
                                     trigflow_time, x0_from_trigflow)
from pixsig_distill.errors import UserError
from pixsig_distill.jvp import ExactJVP, FiniteDifferenceJVP, forward_ad_attention, pixart_call

NO_SIZE = {"resolution": None, "aspect_ratio": None}


def cosine(a, b):
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


def relative_error(a, reference):
    return float((a - reference).norm() / reference.norm())


def denoiser_of(pipe):
    """The tiny pipeline's network with its schedule, without a text side (these calls take their own embeddings)."""
    return Denoiser(pipe.transformer, pipe.scheduler.alphas_cumprod, 8, null_embedding=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def call(tiny_pipe):
    """The tiny transformer as fn(x_t, t̂), at two TrigFlow times, with sCM's tangent (cos t̂ sin t̂)·(v, 1)."""
    transformer = tiny_pipe.transformer
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t_hat = torch.tensor([0.6, 1.3])
    embeds, mask = torch.randn(2, 5, 32, generator=g), torch.ones(2, 5)
    fn = pixart_call(denoiser_of(tiny_pipe), embeds, mask)
    weight = torch.cos(t_hat) * torch.sin(t_hat)
    velocity = torch.randn(2, 4, 8, 8, generator=g)
    tangents = (weight.view(-1, 1, 1, 1) * velocity, weight)
    return fn, transformer, (x_t, t_hat), tangents


def test_exact_jvp_agrees_with_a_central_difference(call):
    fn, transformer, primals, tangents = call
    exact = ExactJVP()(fn, primals, tangents, networks=[transformer])
    near = FiniteDifferenceJVP(step=3e-4, scheme="central")(fn, primals, tangents)
    assert cosine(near, exact) > 0.99999 and relative_error(near, exact) < 1e-3
    # It is a central difference: a 3× larger step has about 9× the error (O(h²)), the one-sided one far more.
    coarse = relative_error(FiniteDifferenceJVP(step=9e-4, scheme="central")(fn, primals, tangents), exact)
    assert 5 < coarse / relative_error(near, exact) < 15
    assert relative_error(FiniteDifferenceJVP(step=3e-4, scheme="backward")(fn, primals, tangents), exact) > 3 * coarse


def test_finite_difference_steps_along_the_exact_tangent(call):
    fn, transformer, (x_t, t_hat), (dx, dt) = call
    exact, difference = ExactJVP(), FiniteDifferenceJVP(step=3e-4, scheme="central")
    full = exact(fn, (x_t, t_hat), (dx, dt), networks=[transformer])
    parts = {"latents only": (dx, torch.zeros_like(dt)), "time only": (torch.zeros_like(dx), dt)}
    for name, tangent in parts.items():
        alone = exact(fn, (x_t, t_hat), tangent, networks=[transformer])
        assert cosine(difference(fn, (x_t, t_hat), tangent), alone) > 0.99999, name
        assert cosine(alone, full) < 0.9995, f"{name} alone would be another direction"
    flipped = difference(fn, (x_t, t_hat), (-dx, -dt))
    assert cosine(flipped, full) < -0.99999


def test_the_time_tangent_reaches_the_embedding_times_dt_over_dt_hat(call, tiny_pipe):
    """fn(x, t̂) = network(x, t(t̂)): a unit tangent in t̂ is a tangent of dt/dt̂ DDPM timesteps (chain rule)."""
    _, transformer, (x_t, t_hat), (dx, _) = call
    embeds, mask = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)), torch.ones(2, 5)
    fn = pixart_call(denoiser_of(tiny_pipe), embeds, mask)

    def in_ddpm_time(x, t):
        return transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                           added_cond_kwargs=NO_SIZE, return_dict=False)[0][:, :4]

    rate = ddpm_time_rate(tiny_pipe.scheduler.alphas_cumprod, t_hat)
    assert 300 < rate[0] < 400 and 600 < rate[1] < 800  # 350 at t̂ = 0.6 (t ≈ 191), 702 at t̂ = 1.3 (t ≈ 508)
    exact, zero = ExactJVP(), torch.zeros_like(dx)
    per_t_hat = exact(fn, (x_t, t_hat), (zero, torch.ones(2)), networks=[transformer])
    timestep = ddpm_time(tiny_pipe.scheduler.alphas_cumprod, t_hat)
    per_timestep = exact(in_ddpm_time, (x_t, timestep), (zero, torch.ones(2)), networks=[transformer])
    assert relative_error(per_t_hat, rate.view(-1, 1, 1, 1) * per_timestep) < 1e-4
    assert relative_error(per_t_hat, per_timestep) > 0.99  # forgetting the factor is off by 350–700×


def test_the_ddpm_time_of_trigflow_time_is_exact_at_integers_and_its_rate_is_its_derivative():
    alphas = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    steps = torch.arange(1000)
    t_hat = trigflow_time(alphas, steps.double())
    assert abs(float(t_hat[400]) - 1.1152) < 1e-4 and abs(float(t_hat[999]) - 1.5644) < 1e-4
    assert (ddpm_time(alphas, t_hat) - steps).abs().max() < 1e-6  # exact at every integer (float64)
    assert (ddpm_time(alphas, t_hat.float()) - steps).abs().max() < 0.01  # float32 t̂: within 1/100 step
    between = (t_hat[:-1] + t_hat[1:]) / 2
    slope = torch.func.jvp(lambda u: ddpm_time(alphas, u), (between,), (torch.ones_like(between),))[1]
    assert torch.allclose(slope, ddpm_time_rate(alphas, between), rtol=1e-9)  # forward mode through t(t̂)
    secant = 1 / (t_hat[1:] - t_hat[:-1])  # the mean slope over each step
    assert torch.allclose(slope, secant, rtol=2e-3)
    assert ddpm_time_rate(alphas, t_hat[[0, 400, 999]].float()).tolist() == pytest.approx([167, 503, 15_583], rel=0.01)
    ends = t_hat[[0, 999]].float()  # rounded to float32, t̂(999) lies past the table's end: it keeps its tangent
    at_ends = torch.func.jvp(lambda u: ddpm_time(alphas, u), (ends,), (torch.ones(2),))[1]
    assert torch.allclose(at_ends, ddpm_time_rate(alphas, ends), rtol=1e-3)


def test_velocity_from_eps_is_diffusers_v_prediction():
    """F = (ε − sin t̂·x_t)/cos t̂ is the v-target of diffusers' scheduler, and f = cos t̂·x_t − sin t̂·F is x0."""
    scheduler = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g,
                                                                                        dtype=torch.float64)
    t = torch.tensor([0, 400, 900, 999])
    alphas = scheduler.alphas_cumprod.double()
    scheduler.alphas_cumprod = alphas
    t_hat = trigflow_time(alphas, t.double())
    x_t = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(x_t, torch.cos(t_hat).view(-1, 1, 1, 1) * x0 + torch.sin(t_hat).view(-1, 1, 1, 1) * noise)
    velocity = trigflow_from_eps(x_t, noise, t_hat)
    assert torch.allclose(velocity, scheduler.get_velocity(x0, noise, t), atol=1e-9)
    assert torch.allclose(x0_from_trigflow(x_t, velocity, t_hat), x0, atol=1e-9)
    assert torch.allclose(eps_from_trigflow(x_t, velocity, t_hat), noise, atol=1e-9)


def test_the_default_attention_is_switched_for_the_jvp_and_given_back(call):
    fn, transformer, primals, tangents = call
    before = dict(transformer.attn_processors)
    assert {type(p) for p in before.values()} == {AttnProcessor2_0}
    with pytest.raises(RuntimeError, match="forward AD"):  # why the switch exists: PyTorch's fused kernel
        torch.func.jvp(fn, primals, tangents)
    tangent = ExactJVP()(fn, primals, tangents, networks=[transformer])
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0
    assert transformer.attn_processors == before  # the very same processor objects are back
    # The math path computes the same function as the fused kernel.
    with torch.no_grad():
        fused = fn(*primals)
        with forward_ad_attention(transformer):
            math = fn(*primals)
    assert torch.allclose(math, fused, atol=1e-5)


def test_an_attention_without_forward_ad_is_refused_in_one_line(call):
    fn, transformer, primals, tangents = call
    other = copy.deepcopy(transformer)

    class FusedKernelAttention(AttnProcessor2_0):  # e.g. a third-party kernel: same call, no forward-mode rule
        pass

    other.transformer_blocks[1].attn2.set_processor(FusedKernelAttention())
    with pytest.raises(UserError, match="transformer_blocks.1.attn2.*FusedKernelAttention.*finite_difference") as err:
        ExactJVP().check(other)
    assert "\n" not in str(err.value)
    FiniteDifferenceJVP(0.05, "central").check(other)  # a finite difference needs no forward-mode AD


@pytest.mark.parametrize("options, message", [({"step": 0.0, "scheme": "central"}, "step=0.0 must be positive"),
                                              ({"step": 0.05, "scheme": "forward"}, "'forward' is not a scheme")])
def test_bad_finite_difference_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        FiniteDifferenceJVP(**options)
