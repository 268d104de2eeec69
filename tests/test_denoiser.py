"""The denoiser (pixsig_distill/denoiser.py): the schedule at integer and continuous time, the TrigFlow mapping
against the scheduler's own ᾱ, and ε, x0, v and F of one network agreeing with each other."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pixsig_distill.denoiser import (alpha_bar, ddpm_time, eps_from_trigflow, trigflow_from_eps, trigflow_time,
                                     x0_from_trigflow)
from pixsig_distill.schedule import PIXART_SCHEDULER
from pixsig_distill.teacher import Teacher

PROMPTS = ["a red circle at the top left", "a blue square on a green background"]


@pytest.fixture(scope="module")
def alphas_cumprod():
    """PixArt-Σ's ᾱ as its diffusers scheduler computes it (linear β 1e-4..0.02, T = 1000)."""
    return DPMSolverMultistepScheduler(**PIXART_SCHEDULER).alphas_cumprod


@pytest.fixture(scope="module")
def teacher(tiny_folder):
    return Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")


def test_trigflow_time_is_arccos_of_the_schedules_root_alpha_bar(alphas_cumprod):
    t = torch.arange(1000)
    expected = alphas_cumprod.double().sqrt().acos()
    assert torch.allclose(trigflow_time(alphas_cumprod, t).double(), expected, atol=1e-6)
    # the figures the consistency recipes are planned with: the last trained time, T̄ = 400, and t = 0
    assert trigflow_time(alphas_cumprod, torch.tensor([999, 400, 0])).tolist() == pytest.approx(
        [1.5644, 1.1152, 0.0100], abs=1e-4)
    # cos t̂ and sin t̂ are the DDPM noising's √ᾱ and √(1−ᾱ): the same x_t, no rescaling
    t_hat = trigflow_time(alphas_cumprod, t).double()
    assert torch.allclose(t_hat.sin() ** 2, 1 - alphas_cumprod.double(), atol=1e-6)


def test_continuous_time_is_exact_at_integers_and_between_its_neighbours(alphas_cumprod):
    t = torch.arange(1000)
    assert torch.equal(alpha_bar(alphas_cumprod, t), alphas_cumprod.float())
    assert torch.allclose(alpha_bar(alphas_cumprod, t.double()), alphas_cumprod.float(), rtol=1e-6)
    between = torch.tensor([0.5, 123.25, 998.75])
    a = alpha_bar(alphas_cumprod, between)
    low, high = alphas_cumprod[between.floor().long()], alphas_cumprod[between.ceil().long()]
    assert (a < low).all() and (a > high).all()
    fine = alpha_bar(alphas_cumprod, torch.linspace(0, 999, 20_000))
    assert (fine[1:] < fine[:-1]).all()  # decreasing everywhere: t ↔ t̂ is one to one


def test_ddpm_time_inverts_trigflow_time(alphas_cumprod):
    t = torch.cat([torch.arange(0, 1000, 37).double(), torch.rand(200, generator=torch.Generator().manual_seed(0))
                   .double() * 999])
    round_trip = ddpm_time(alphas_cumprod, trigflow_time(alphas_cumprod, t))
    assert (round_trip - t).abs().max() < 2e-3
    t_hat = torch.linspace(0.011, 1.564, 101)
    assert torch.allclose(trigflow_time(alphas_cumprod, ddpm_time(alphas_cumprod, t_hat)), t_hat, atol=1e-5)
    # past the trained range: its ends, not an extrapolation
    assert ddpm_time(alphas_cumprod, torch.tensor([0.0, math.pi / 2 - 1e-4])).tolist() == pytest.approx([0, 999])


def test_trigflow_output_is_the_v_prediction_and_gives_back_x0_and_eps():
    gen = torch.Generator().manual_seed(0)
    x0, z = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t_hat = torch.tensor([0.1, 0.8, 1.5])
    c, s = (f(t_hat).view(-1, 1, 1, 1) for f in (torch.cos, torch.sin))
    x_t = c * x0 + s * z  # TrigFlow noising with σ_d = 1
    F = trigflow_from_eps(x_t, z, t_hat)  # a perfect ε̂
    assert torch.allclose(F, c * z - s * x0, atol=1e-5)  # F = cos t̂·ε − sin t̂·x0
    assert torch.allclose(x0_from_trigflow(x_t, F, t_hat), x0, atol=1e-5)
    assert torch.allclose(eps_from_trigflow(x_t, F, t_hat), z, atol=1e-5)


def test_the_networks_eps_x0_v_and_trigflow_agree(teacher):
    denoiser = teacher.denoiser
    embeds, mask = teacher.encode_prompts(PROMPTS)
    x_t = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 400])
    eps, x0 = denoiser.eps(x_t, t, embeds, mask), denoiser.x0(x_t, t, embeds, mask)
    a = denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(denoiser.v(x_t, t, embeds, mask), a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-4)
    # a whole-number float time is the same time: the timestep embedding takes real t as it is
    assert torch.allclose(denoiser.eps(x_t, t.float(), embeds, mask), eps, atol=1e-6)
    # at t̂ = arccos √ᾱ_t the TrigFlow output is the network's v, guided the same way
    t_hat = denoiser.trigflow_time(t)
    for scale in (1.0, 3.0):
        F = denoiser.trigflow(x_t, t_hat, embeds, mask, guidance_scale=scale)
        assert torch.allclose(F, denoiser.v(x_t, t, embeds, mask, guidance_scale=scale), atol=1e-3)
        assert torch.allclose(x0_from_trigflow(x_t, F, t_hat), denoiser.x0(x_t, t, embeds, mask, scale), atol=1e-3)
    assert not torch.allclose(denoiser.trigflow(x_t, t_hat, embeds, mask, guidance_scale=3.0),
                              denoiser.trigflow(x_t, t_hat, embeds, mask), atol=1e-3)
