"""Each method, on a problem whose answer is known exactly (tests/known_answer.py), moves its student toward that
answer within a few dozen steps; the same test with a sign flipped or two scores swapped on purpose moves it away.

The suite's other end-to-end tests compare two runs of the same code or check that values are finite: a flipped
sign would pass them all. These would not.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from hydra import compose, initialize_config_module

import known_answer as ka
import pixsig_distill
import pixsig_distill.methods.dmd as dmd_module
import pixsig_distill.methods.finetune as finetune_module
import pixsig_distill.methods.gan as gan_module
import pixsig_distill.methods.lcm as lcm_module
import pixsig_distill.methods.scm as scm_module
import pixsig_distill.methods.tiny_decoder as tiny_decoder_module
from pixsig_distill.config import build
from pixsig_distill.draws import StepDraws
from pixsig_distill.schedule import add_noise


def method_from_yaml(teacher, distill: str, *overrides: str, edit=None):
    """The method exactly as `distill=<name>` builds it (its YAML defaults), with the given overrides."""
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"distill={distill}", "model=pixart_sigma_512", *overrides])
    if edit is not None:
        edit(cfg)
    torch.manual_seed(0)  # LoRA adapters start from torch's global generator
    method = build(cfg.distill, teacher=teacher)
    method.prepare(Accelerator(cpu=True))
    return method


@pytest.fixture(scope="module")
def teacher():
    return ka.known_teacher()


def shift_generator(network, offset: float) -> None:
    """Start the student away from the teacher: every caption's mean moved by `offset`."""
    bias = next(p for name, p in network.named_parameters() if name.endswith(("caption_proj.bias",
                                                                             "caption_proj.base_layer.bias")))
    with torch.no_grad():
        bias.add_(offset)


def train(method, teacher, steps: int, batch_size: int = 16, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        method.train_step(ka.batch(teacher, batch_size, gen), gen)


# ---- DMD: the generator's distribution → the (guided) teacher's, N(μ_g, s²) -------------------------------------
LORA = [f"distill.lora_target_modules=[{','.join(ka.TARGETS)}]"]  # the known world's linears
DMD_FAST = ["distill.generator_optimizer.lr=0.02", "distill.fake_optimizer.lr=0.05", "distill.ema_decay=null", *LORA]


def dmd_distance(method, teacher, scale: float) -> float:
    probe = ka.fixed_eval(teacher)
    samples = method.sample(probe.embeds, probe.mask, probe.noise)  # its exported recipe: 1 step, or its chain
    return ka.gaussian_distance(samples, ka.guided_mean(teacher, probe.prompts, scale), 0.2)


def dmd_learns(teacher, *overrides: str, scale: float = 1.0, steps: int = 60, distill: str = "dmd", edit=None):
    """(distance before, after) for a generator started away from the teacher (every mean moved by 0.5)."""
    method = method_from_yaml(teacher, distill, *DMD_FAST, f"distill.real_guidance_scale={scale}", *overrides,
                              edit=edit)
    shift_generator(method.generator, 0.5)
    before = dmd_distance(method, teacher, scale)
    train(method, teacher, steps)
    return before, dmd_distance(method, teacher, scale)


def dmd_converges(before: float, after: float) -> bool:
    """Most of the way to the target (the DM gradient's own noise keeps a generator at lr 0.02 jittering about it;
    a wrong direction ends hundreds of times farther away than it started)."""
    return after < 0.4 * before


@pytest.mark.parametrize("variant", [[], ["distill.generator.lora_rank=4"], ["distill.fake_score.lora_rank=4"],
                                     ["distill.timesteps=[400,200]"]],
                         ids=["full", "lora_generator", "lora_fake_score", "two_steps"])
def test_dmd_moves_the_generator_to_the_teacher_distribution(teacher, variant):
    assert dmd_converges(*dmd_learns(teacher, *variant))


def test_dmd_with_a_guided_real_score_matches_the_guided_distribution(teacher):
    assert dmd_converges(*dmd_learns(teacher, scale=3.0))  # μ_g = μ_u + 3(μ_c − μ_u), far from μ_c


# ---- DMD2: its GAN's discriminator learns, and its generator term pulls toward the real images ---------------
def dmd2_method(teacher, *overrides: str):
    def real_images_of_this_world(cfg):
        cfg.distill.gan.real_images = {"_target_": "known_answer.KnownRealImages", "_partial_": True}

    return method_from_yaml(teacher, "dmd2", *DMD_FAST, "distill.gan.head_lr=0.01", *overrides,
                            edit=real_images_of_this_world)


def test_dmd2_moves_the_generator_to_the_teacher_distribution(teacher):
    method = dmd2_method(teacher)
    shift_generator(method.generator, 0.5)
    before = dmd_distance(method, teacher, 1.0)
    train(method, teacher, 60)
    assert dmd_converges(before, dmd_distance(method, teacher, 1.0))


def mean_offset(method, teacher) -> float:
    """|mean of the generator's samples − mean of the real images|, averaged over prompts and channels."""
    probe = ka.fixed_eval(teacher)
    samples = method.sample(probe.embeds, probe.mask, probe.noise)
    return float((samples.mean(dim=(2, 3)) - ka.guided_mean(teacher, probe.prompts, 1.0)).abs().mean())


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gan_learns(teacher, head: str = "projection", discriminator_steps: int = 60):
    """Phase 1, the generator held still: the discriminator learns to tell real images from its samples (returns
    its accuracy over the last 10 updates). Phase 2, the discriminator held still and the DM loss off: a few
    generator updates on the GAN term alone (returns the mean offset to the real images before and after)."""
    method = dmd2_method(teacher, "distill.gan.generator_weight=1.0", "distill.gan.discriminator_weight=1.0",
                         "distill.fake_updates_per_step=1", f"distill.gan.head={head}")
    shift_generator(method.generator, 0.5)
    method.distribution_matching_loss = lambda x0_hat, *args: 0.0 * x0_hat.sum()
    gen = torch.Generator().manual_seed(0)
    set_lr(method.optimizers["generator"], 0.0)
    accuracy = []
    for _ in range(discriminator_steps):
        logs = method.train_step(ka.batch(teacher, 16, gen), gen)
        accuracy.append((float(logs["d_real_acc"]) + float(logs["d_fake_acc"])) / 2)
    set_lr(method.optimizers["generator"], 0.005)
    set_lr(method.optimizers["fake_score"], 0.0)
    before = mean_offset(method, teacher)
    train(method, teacher, 3, seed=1)
    return sum(accuracy[-10:]) / 10, before, mean_offset(method, teacher)


@pytest.mark.parametrize("head", ["projection", "per_token", "pooled"])
def test_gan_discriminator_learns_and_its_generator_term_pulls_toward_real_images(teacher, head):
    accuracy, before, after = gan_learns(teacher, head)
    assert accuracy > 0.75
    assert after < 0.5 * before, (before, after)


# ---- rewards: a reward term raises the reward of the generator's decoded samples --------------------------
class Brightness(torch.nn.Module):
    """A reward with a known maximiser: the mean of the decoded image (the brighter the better)."""

    name = "brightness"

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))

    def objective_models(self):
        return {}


def reward_learns(teacher, weight: float = 1.0, steps: int = 20, ceiling: float | None = None,
                  dm_start_step: int | None = None):
    """(mean reward before, after) with the DM loss off: the reward term alone drives the generator (DM loss replaced
    by 0; or, with `dm_start_step`, kept out by DMD itself until that step)."""
    def with_reward(cfg):
        cfg.distill.rewards = {"brightness": {"_target_": "pixsig_distill.methods.rewards.Reward", "weight": weight,
                                              "ceiling": ceiling, "start_step": 0,
                                              "reward": {"_target_": "test_learning.Brightness"}}}

    start = [] if dm_start_step is None else [f"distill.dm_start_step={dm_start_step}"]
    method = method_from_yaml(teacher, "dmd", *DMD_FAST, "distill.generator_optimizer.lr=0.005", *start,
                              edit=with_reward)
    if dm_start_step is None:
        method.distribution_matching_loss = lambda x0_hat, *args: 0.0 * x0_hat.sum()
    probe = ka.fixed_eval(teacher)

    def mean_reward():
        with torch.no_grad():
            images = teacher.vae.decode(method.sample(probe.embeds, probe.mask, probe.noise)
                                        / teacher.vae.config.scaling_factor).sample
        return float(images.clamp(-1, 1).mean())

    before = mean_reward()
    train(method, teacher, steps)
    return before, mean_reward()


def test_a_reward_term_raises_its_reward(teacher):
    before, after = reward_learns(teacher)
    assert after > before + 0.05, (before, after)
    # A warm start (distill.dm_start_step, here never reached): the generator learns from its terms alone, exactly
    # as with the DM loss taken out.
    assert reward_learns(teacher, dm_start_step=10_000) == pytest.approx((before, after), abs=1e-6)


def test_a_reward_with_a_cold_start_joins_at_its_step():
    from pixsig_distill.methods.rewards import Reward

    term = Reward(Brightness(), 1.0, None, start_step=3)
    batch = {"prompt": ["p", "q"]}
    assert [term.draw(None, batch, types.SimpleNamespace(step=s))["on"] for s in (0, 2, 3, 9)] == [False, False,
                                                                                                  True, True]
    off = term.draw(None, batch, types.SimpleNamespace(step=2))
    assert term.generator_losses(None, torch.zeros(2, 4, 2, 2), None, None, off, slice(None), (0, 1)) == []


def test_a_reward_ceiling_leaves_the_samples_above_it_alone(teacher):
    """−λ·min(r, ceiling): a sample whose reward is above the ceiling gets no gradient, the others their full one."""
    from pixsig_distill.methods.rewards import Reward

    class Identity(torch.nn.Module):
        def forward(self, images, prompts):  # the reward of sample i: its decoded image's mean
            return images.mean(dim=(1, 2, 3))

    dmd = types.SimpleNamespace(teacher=teacher)
    x0 = (torch.randn(4, *teacher.latent_shape(1)[1:]) * 0.5).requires_grad_(True)
    draws = {"prompts": np.array(["p"] * 4), "on": True}
    rewards = Identity()(teacher.vae.decode(x0 / teacher.vae.config.scaling_factor).sample.clamp(-1, 1), None)
    ceiling = float(rewards.median().detach())
    for term, above in ((Reward(Identity(), 1.0, None, 0), False), (Reward(Identity(), 1.0, ceiling, 0), True)):
        x0.grad = None
        losses = term.generator_losses(dmd, x0, None, None, draws, slice(None), (0, 1))
        sum(weight * value for _, value, weight in losses).backward()
        per_sample = x0.grad.flatten(1).abs().sum(1)
        assert bool((per_sample[rewards > ceiling] == 0).all()) == above and bool((per_sample[rewards < ceiling] > 0).all())


# ---- LCM: the student's one-step sample → the teacher's guided ODE solution from the same noise ---------------
# a coarse DDIM grid (10 steps): the boundary condition at t = 0 reaches t = 999 in fewer updates
LCM_FAST = ["distill.optimizer.lr=0.05", "distill.ema_decay=0.5", "distill.num_ddim_timesteps=10"]


def lcm_distance(method, teacher) -> float:
    probe = ka.fixed_eval(teacher)
    samples = method.sample(probe.embeds, probe.mask, probe.noise, num_inference_steps=1)
    mu = ka.guided_mean(teacher, probe.prompts, method.guidance_w + 1)  # LCM's w is CFG scale − 1
    return float(((samples - ka.ode_solution(teacher, probe.noise, 999, mu)) ** 2).mean())


def lcm_learns(teacher, distill: str = "lcm", steps: int = 100):
    method = method_from_yaml(teacher, distill, *LCM_FAST, *(LORA if "lora" in distill else []))
    before = lcm_distance(method, teacher)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):  # x0 for q(x_t | x0): draws of the guided distribution
        batch = ka.batch(teacher, 16, gen)
        mu = ka.guided_mean(teacher, batch["prompt"], method.guidance_w + 1)
        batch["latents"] = mu[..., None, None] + 0.2 * torch.randn(teacher.latent_shape(16), generator=gen)
        method.train_step(batch, gen)
    return before, lcm_distance(method, teacher)


@pytest.mark.parametrize("distill", ["lcm", "lcm_lora"])
def test_lcm_moves_the_student_to_the_teachers_ode_solution(teacher, distill):
    before, after = lcm_learns(teacher, distill)
    assert after < 0.1 * before, (before, after)


# ---- sCM: the student's one-step sample → the teacher's guided ODE solution from the same noise --------------
# continuous time: ka.ConsistencyGaussian, whose output can be the teacher's ε and the exact consistency velocity
SCM_FAST = ["distill.optimizer.lr=0.01", "distill.ema_decay=null", "distill.tangent_warmup_steps=20",
            "distill.guidance_scale=3.0", "distill.proposal_mean=-0.8"]  # sCM's proposal: more low-noise times


@pytest.fixture(scope="module")
def continuous_teacher():
    return ka.known_teacher(network_class=ka.ConsistencyGaussian)


def scm_distance(method, teacher) -> float:
    """Mean squared distance of one-step samples to the guided ODE's end from the same noise."""
    probe = ka.fixed_eval(teacher)
    samples = method.sample(probe.embeds, probe.mask, probe.noise, num_inference_steps=1)
    mu = ka.guided_mean(teacher, probe.prompts, method.guidance_scale)
    return float(((samples - ka.consistency_solution(teacher, probe.noise, 999, mu)) ** 2).mean())


def scm_learns(teacher, distill: str = "scm", *overrides: str, steps: int = 200):
    """(distance before, after): x0 are draws of the guided distribution; the loop's step number drives the
    tangent warm-up (StepDraws.step)."""
    method = method_from_yaml(teacher, distill, *SCM_FAST, *overrides)
    before = scm_distance(method, teacher)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = ka.batch(teacher, 16, gen)
        mu = ka.guided_mean(teacher, batch["prompt"], method.guidance_scale)
        batch["latents"] = mu[..., None, None] + 0.2 * torch.randn(teacher.latent_shape(16), generator=gen)
        method.train_step(batch, StepDraws(gen, step=step))
    return before, scm_distance(method, teacher)


def scm_converges(before: float, after: float) -> bool:
    """Velocity regression alone (the warm-up's start) ends at the guided mean, s² = 0.04 away: sCM gets under a
    tenth of that."""
    return after < 0.004 < before


@pytest.mark.parametrize("jvp", ["exact", "finite_difference"])
def test_scm_moves_the_one_step_student_to_the_guided_ode_solution(continuous_teacher, jvp):
    assert scm_converges(*scm_learns(continuous_teacher, "scm", f"distill.jvp={jvp}"))


# ---- rCM: sCM plus DMD's term on the student's samples (after the warm-up) ----------------------------------
# the DMD term weighs enough to matter here (its sign flipped, the student runs away); a smaller step for its noise
RCM_FAST = ["distill.optimizer.lr=0.005", "distill.fake_optimizer.lr=0.05", "distill.fake_updates_per_step=3",
            "distill.dmd_weight=0.1"]


def rcm_learns(teacher):
    return scm_learns(teacher, "rcm", *RCM_FAST, steps=300)


def rcm_converges(before: float, after: float) -> bool:
    """Within half the distance of the guided mean (velocity regression's end): DMD's gradient noise keeps the
    student jittering about the answer; a flipped DMD term ends thousands of times farther away."""
    return after < 0.02 < before


def test_rcm_moves_the_one_step_student_to_the_guided_ode_solution(continuous_teacher):
    assert rcm_converges(*rcm_learns(continuous_teacher))


# ---- fine-tuning: the model's distribution → new data ------------------------------------------------------
NEW_MEANS = ((2.0, 0.0, 0.0, 0.0), (-2.0, 0.0, 0.0, 0.0), (0.0, 2.0, 0.0, 0.0))


def finetune_distance(method, teacher) -> float:
    probe = ka.fixed_eval(teacher)
    samples = method.sample(probe.embeds, probe.mask, probe.noise)  # the teacher's sampler, unguided here
    target = torch.tensor([NEW_MEANS[ka.PROMPTS.index(p)] for p in probe.prompts])
    return ka.gaussian_distance(samples, target, 0.3)


def finetune_learns(distill: str = "finetune", steps: int = 60):
    teacher = ka.known_teacher(guidance_scale=1.0)  # its sampler without CFG: samples are N(μ(text), s²)
    method = method_from_yaml(teacher, distill, "distill.optimizer.lr=0.02", "distill.ema_decay=null", *LORA)
    before = finetune_distance(method, teacher)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = ka.batch(teacher, 16, gen)
        means = torch.tensor([NEW_MEANS[ka.PROMPTS.index(p)] for p in batch["prompt"]])
        batch["latents"] = means[..., None, None] + 0.3 * torch.randn(teacher.latent_shape(16), generator=gen)
        method.train_step(batch, gen)
    return before, finetune_distance(method, teacher)


@pytest.mark.parametrize("distill", ["finetune", "finetune_lora"])
def test_finetune_moves_the_model_to_the_new_data(distill):
    before, after = finetune_learns(distill)
    assert after < 0.2 * before, (before, after)


# ---- tiny decoder: its images → the teacher VAE's images of the same latents --------------------------------
def decoder_distance(method, teacher, latents) -> float:
    with torch.no_grad():
        return float((method.decode(latents) - teacher.decode(latents).clamp(-1, 1)).abs().mean())


def decoder_learns(steps: int = 40):
    """The toy teacher's VAE is the answer: a fresh AutoencoderTiny trained on encoded toy images, measured on
    other images' latents."""
    from pixsig_distill.config import _toy_asset
    from pixsig_distill.draws import StepDraws
    from pixsig_distill.teacher import Teacher
    from pixsig_distill.toy.real_latents import toy_real_latents

    toy = Teacher.from_pretrained(_toy_asset("teacher"), max_sequence_length=16, device="cpu")
    method = method_from_yaml(toy, "tiny_decoder", "distill.latents.n=64", "distill.ema_decay=null")
    held_out = toy_real_latents(toy, n=32, seed=99).sample(32, StepDraws(torch.Generator().manual_seed(1)), "cpu",
                                                          torch.float32)[0]
    before = decoder_distance(method, toy, held_out)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        method.train_step({"prompt": [""] * 16}, gen)
    return before, decoder_distance(method, toy, held_out)


def test_tiny_decoder_learns_to_decode_like_the_teachers_vae():
    before, after = decoder_learns()
    assert after < 0.5 * before, (before, after)


# ---- every method has a learning test, and each test catches a wrong direction ------------------------------
LEARNING_TESTS = {"dmd", "dmd2", "lcm", "lcm_lora", "scm", "rcm", "finetune", "finetune_lora", "tiny_decoder"}


def test_every_method_has_a_learning_test():
    shipped = {p.stem for p in (Path(pixsig_distill.__file__).parent / "conf" / "distill").glob("*.yaml")}
    assert shipped == LEARNING_TESTS, f"give {sorted(shipped - LEARNING_TESTS)} a test on the known-answer world"


def _negate(fn):
    return lambda *args, **kwargs: -fn(*args, **kwargs)


SABOTAGE = {
    # name: (what breaks, the learning run that must then fail, its pass condition)
    "dm_gradient_negated": (lambda mp: mp.setattr(dmd_module, "dm_gradient", _negate(dmd_module.dm_gradient)),
                            lambda t: dmd_learns(t), dmd_converges),
    "real_and_fake_swapped": (lambda mp: mp.setattr(dmd_module.DMD, "distribution_matching_loss",
                                                    _swapped_dm_loss),
                              lambda t: dmd_learns(t), dmd_converges),
    "real_score_unguided": (lambda mp: mp.setattr(dmd_module.DMD, "real_x0", lambda self, x_t, t, e, m:
                                                  self.teacher.denoiser.x0(x_t, t, e, m, guidance_scale=1.0)),
                            lambda t: dmd_learns(t, scale=3.0), dmd_converges),
    "gan_generator_term_negated": (lambda mp: mp.setattr(gan_module, "generator_gan_loss",
                                                         lambda logits: F.softplus(logits).mean()),
                                   lambda t: gan_learns(t)[1:], lambda before, after: after < 0.5 * before),
    "gan_generator_term_detached": (lambda mp: mp.setattr(gan_module, "generator_gan_loss",
                                                          lambda logits: F.softplus(-logits.detach()).mean()),
                                    lambda t: gan_learns(t)[1:], lambda before, after: after < 0.5 * before),
    "reward_maximised_the_wrong_way": (lambda mp: None, lambda t: reward_learns(t, weight=-1.0),
                                       lambda before, after: after > before + 0.05),
    "lcm_loss_negated": (lambda mp: mp.setattr(lcm_module, "consistency_distance",
                                               _negate(lcm_module.consistency_distance)),
                         lambda t: lcm_learns(t), lambda before, after: after < 0.1 * before),
    "lcm_target_is_the_teacher_not_its_ema_student": (lambda mp: mp.setattr(lcm_module.LCM, "target_network",
                                                               lambda self: self.teacher.transformer),
                                         lambda t: lcm_learns(t), lambda before, after: after < 0.1 * before),
    "scm_tangent_sign_flipped": (lambda mp: mp.setattr(scm_module.SCM, "tangent", _negated_tangent),
                                 lambda t: scm_learns(t), scm_converges),
    # reading A of "the stop-gradient removed": F_θ⁻ with its graph in the target, g still without one; the loss is
    # then ‖−g‖², whose gradient is exactly zero
    "scm_target_without_stop_gradient": (lambda mp: mp.setattr(scm_module, "consistency_loss",
                                                               lambda F, g: (F - (F + g)).flatten(1).pow(2).sum(1)),
                                         lambda t: scm_learns(t), scm_converges),
    "rcm_dm_gradient_negated": (lambda mp: mp.setattr(dmd_module, "dm_gradient", _negate(dmd_module.dm_gradient)),
                                lambda t: rcm_learns(t), rcm_converges),
    "finetune_loss_negated": (lambda mp: mp.setattr(finetune_module.F, "mse_loss", _negate(F.mse_loss)),
                              lambda t: finetune_learns(), lambda before, after: after < 0.2 * before),
    "decoder_pixel_loss_negated": (lambda mp: mp.setattr(tiny_decoder_module.F, "l1_loss", _negate(F.l1_loss)),
                                   lambda t: decoder_learns(), lambda before, after: after < 0.5 * before),
}


_scm_tangent = scm_module.SCM.tangent


def _negated_tangent(self, *args):
    """cos t̂ sin t̂·dF_θ⁻/dt̂ with its sign flipped."""
    return -_scm_tangent(self, *args)


def _swapped_dm_loss(self, x0_hat, embeds, mask, t, noise):
    """DMD's loss with the real and the fake score's estimates in each other's place."""
    with torch.no_grad():
        x_t = add_noise(x0_hat.detach(), noise, t, self.teacher.denoiser.alphas_cumprod)
        grad = dmd_module.dm_gradient(x0_hat.detach(), self.fake_x0(x_t, t, embeds, mask),
                                      self.real_x0(x_t, t, embeds, mask))
    return dmd_module.dm_loss(x0_hat, grad)


@pytest.mark.parametrize("name", sorted(SABOTAGE))
def test_a_wrong_direction_fails_its_learning_test(name, request, monkeypatch):
    """The learning tests above can fail: with this defect on purpose, the same run misses its target."""
    sabotage, learn, passes = SABOTAGE[name]
    world = request.getfixturevalue("continuous_teacher" if name.startswith(("scm", "rcm")) else "teacher")
    sabotage(monkeypatch)
    before, after = learn(world)
    assert not passes(before, after), (before, after)
