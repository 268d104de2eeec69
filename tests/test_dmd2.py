"""DMD2: the GAN losses, backward simulation, exact resume of a few-step run, and the stock-diffusers round trip."""

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from hydra.utils import instantiate

from pixsig_distill.checkpoint import load_checkpoint
from pixsig_distill.config import build
from pixsig_distill.draws import StepDraws
from pixsig_distill.errors import UserError
from pixsig_distill.methods.gan import GANHead, discriminator_loss, generator_gan_loss
from pixsig_distill.schedule import add_noise
from pixsig_distill.train import run

FOUR = "distill.timesteps=[999,749,499,249]"
FAST = ["distill.gan.real_images.n=16", "distill.generator_optimizer.lr=1e-3", "distill.fake_optimizer.lr=1e-3"]


def _ckpt(run_dir, step, name):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def test_gan_losses_push_the_right_way():
    real = torch.tensor([0.5, -1.0], requires_grad=True)
    fake = torch.tensor([0.2, 1.5], requires_grad=True)
    discriminator_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # descent raises D(real), lowers D(fake)
    fake_g = torch.tensor([0.2, 1.5], requires_grad=True)
    generator_gan_loss(fake_g).backward()
    assert (fake_g.grad < 0).all()  # descent raises D(G(z)): the generator tries to look real
    # A perfect discriminator costs ~0; a fooled one log 2 per side at logits 0.
    assert discriminator_loss(torch.full((4,), 20.0), torch.full((4,), -20.0)) < 1e-6
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)) == pytest.approx(2 * np.log(2))


def test_gan_head_scores_every_token_or_the_pooled_tokens_or_their_fit_to_the_caption():
    tokens = torch.randn(3, 16, 24)
    per_token, pooled = GANHead(24, 8, kind="per_token"), GANHead(24, 8, kind="pooled")
    assert per_token(tokens).shape == (3, 16) and pooled(tokens).shape == (3,)
    projection = GANHead(24, 8, kind="projection", caption_width=6)
    embeds, mask = torch.randn(3, 5, 6), torch.ones(3, 5, dtype=torch.long)
    assert projection(tokens, embeds, mask).shape == (3,)
    with torch.no_grad():
        projection.caption.weight.fill_(0.1)
    # the conditional term: the same tokens score differently under another caption; padding does not count
    assert not torch.allclose(projection(tokens, embeds, mask), projection(tokens, -embeds, mask))
    padded = torch.cat([embeds, torch.randn(3, 2, 6)], 1), torch.cat([mask, torch.zeros(3, 2, dtype=torch.long)], 1)
    assert torch.allclose(projection(tokens, embeds, mask), projection(tokens, *padded), atol=1e-6)
    # per-token: a token's logit depends on that token alone (a patch discriminator)
    changed = tokens.clone()
    changed[:, 5] += torch.randn(24)  # (a constant shift would vanish in the LayerNorm)
    diff = (per_token(changed) - per_token(tokens)).abs()
    assert diff[:, 5].min() > 0 and diff[:, :5].max() == 0 and diff[:, 6:].max() == 0
    # the losses average over tokens: per-token logits and their per-sample means agree at logits 0
    zeros = torch.zeros(3, 16)
    assert discriminator_loss(zeros, zeros) == pytest.approx(2 * np.log(2))


def _method(compose_train, *overrides):
    cfg = compose_train("distill=dmd2", *FAST, *overrides)
    teacher = instantiate(cfg.model)
    return build(cfg.distill, teacher=teacher), teacher


def test_backward_simulation_feeds_each_step_the_chains_own_noise_level(compose_train):
    method, teacher = _method(compose_train, FOUR)
    draws = method.chain.draw(method, 8, StepDraws(torch.Generator().manual_seed(0)))
    draws["step"] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    embeds, mask = teacher.encode_prompts(["a red circle"] * 8)
    x, t = method.chain.input(method, draws, slice(None), embeds, mask)
    assert t.tolist() == [999, 749, 499, 249] * 2
    assert torch.equal(x[0], draws["z"][0])  # step 1: pure noise
    # Step k's input is the chain's x̂0 of step k−1 re-noised to t_k with that step's noise: replay it by hand.
    ab = teacher.denoiser.alphas_cumprod
    chain, inputs = draws["z"], [draws["z"]]
    for j, t_j in enumerate([999, 749, 499]):
        x0 = method.generate(method.generator, embeds, mask, chain, torch.full((8,), t_j))
        chain = add_noise(x0, draws["renoise"][j], torch.full((8,), [749, 499, 249][j]), ab)
        inputs.append(chain)
    for i, k in enumerate(draws["step"].tolist()):
        rel = ((x[i] - inputs[k][i]).abs().max() / inputs[k][i].abs().max()).item()
        assert rel < 1e-5  # a sub-batch rounds differently (measured 2e-7)
    # ... and the noise level is right: the part of step k's input that is noise has std √(1 − ᾱ_{t_k}).
    for i in (1, 2, 3):
        x0 = method.generate(method.generator, embeds[:1], mask[:1], inputs[i - 1][i:i + 1],
                             torch.tensor([[999, 749, 499][i - 1]]))
        residual = (x[i] - ab[t[i]].sqrt() * x0[0]) / (1 - ab[t[i]]).sqrt()
        assert torch.allclose(residual, draws["renoise"][i - 1][i], atol=1e-4)


def test_training_chain_equals_the_exported_scheduler(compose_train):
    """The re-noising of backward simulation is what the exported LCMScheduler does at inference."""
    method, teacher = _method(compose_train, FOUR)
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    z = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
    scheduler = method.scheduler()
    scheduler.set_timesteps(timesteps=method.chain.timesteps)
    noises, x = [], z
    for j, t in enumerate(scheduler.timesteps):
        eps = teacher.denoiser.eps(x, t.reshape(1), embeds, mask, transformer=method.generator)
        gen = torch.Generator().manual_seed(100 + j)
        if j < 3:
            noises.append(torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + j)))
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    ours = method.chain.simulate(method, embeds, mask, z, torch.tensor([3, 3]), noises)
    # ours is the input of step 4; one more generator step gives the sample
    final = method.generate(method.generator, embeds, mask, ours, torch.tensor([249, 249]))
    assert (final - x).abs().max() < 1e-4


def test_discriminator_reads_the_generated_side_off_the_denoising_forward(compose_train):
    """On the default GAN range the head's fake logits come from the fake score's ε-MSE forward (no forward of
    their own), and the loss equals the one of a separate forward at the same t and noise."""
    method, teacher = _method(compose_train, "distill.gan.t_max=null")
    gan = method.terms[0]
    assert gan.shares_forward and gan.t_range == method.fake_t_range
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    gen = StepDraws(torch.Generator().manual_seed(0))
    x0, t, noise = torch.randn(teacher.latent_shape(2)), torch.tensor([100, 700]), torch.randn(teacher.latent_shape(2))
    extra = gan.draw(method, {"embeds": embeds}, gen)
    assert "t_fake" not in extra
    forwards = []
    hook = method.fake_score.register_forward_pre_hook(lambda *_: forwards.append(1))
    method.fake_score_loss(x0, embeds, mask, t, noise)
    (_, loss_d, _), *_ = gan.fake_score_losses(method, x0, embeds, mask, extra, slice(None), 0)
    hook.remove()
    assert len(forwards) == 2  # ε-MSE + the real branch
    real_x0, real_embeds, real_mask = extra["real"][0]
    separate = discriminator_loss(
        gan.realism(method, real_x0, real_embeds, real_mask, extra["t_real"][0], extra["noise_real"][0],
                    method.fake_score),
        gan.realism(method, x0, embeds, mask, t, noise, method.fake_score))
    assert torch.allclose(loss_d, separate, atol=1e-6)
    loss_d.backward()  # the shared forward carries the GAN gradient into the head
    assert method.fake_score.gan_head.trunk[1].weight.grad.abs().sum() > 0
    # another range (the default, t <= 300) gives the generated side a forward of its own
    other, _ = _method(compose_train)
    assert not other.terms[0].shares_forward and "t_fake" in other.terms[0].draw(other, {"embeds": embeds}, gen)


def test_dmd2_bad_timesteps_and_missing_real_images(compose_train):
    for bad in ("distill.timesteps=[249,999]", "distill.timesteps=[0]", "distill.timesteps=[]",
                "distill.timesteps=[400.7,200]", "distill.timesteps=abc"):
        with pytest.raises(UserError, match="decreasing order"):
            _method(compose_train, bad)
    with pytest.raises(UserError, match="needs real images"):
        _method(compose_train, "distill.gan.real_images=null")
    with pytest.raises(UserError, match="distill.gan.block=99"):
        _method(compose_train, "distill.gan.block=99")
    with pytest.raises(UserError, match="t_min < t_max"):
        _method(compose_train, "distill.gan.t_min=500", "distill.gan.t_max=100")


def test_two_step_run_resumes_exactly(compose_train, tmp_path):
    common = ["distill=dmd2", "distill.timesteps=[999,499]", *FAST, "train.deterministic=true"]
    straight = run(compose_train(*common, out_dir=tmp_path / "a"))
    run(compose_train(*common, "train.max_steps=2", out_dir=tmp_path / "b"))
    resumed = run(compose_train(*common, out_dir=tmp_path / "b"))
    assert straight["step"] == resumed["step"] == 4
    assert {"loss_gan_g", "loss_gan_d", "loss_dm"} <= set(straight["last_logs"])
    for name in ("generator", "fake_score", "generator_ema"):
        a, b = _ckpt(tmp_path / "a", 4, name), _ckpt(tmp_path / "b", 4, name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    assert any(k.startswith("gan_head.") for k in _ckpt(tmp_path / "a", 4, "fake_score"))  # the head is saved


@pytest.mark.parametrize("lora", [[], ["distill.fake_score.lora_rank=4"]], ids=["full_fake", "lora_fake"])
def test_gradient_checkpointing_trains_as_without(lora, compose_train, tmp_path):
    """The generator's GAN term reads through the checkpointed fake score, frozen for that update: its forward is
    recomputed in the backward under the same state (it used to stop with a checkpoint metadata mismatch), and
    the weights are those of the run without checkpointing."""
    common = ["distill=dmd2", "distill.timesteps=[999,499]", *FAST, *lora, "train.deterministic=true",
              "train.max_steps=2"]
    plain = run(compose_train(*common, out_dir=tmp_path / "plain"))
    checkpointed = run(compose_train(*common, "train.gradient_checkpointing=true", out_dir=tmp_path / "ckpt"))
    assert plain["finished"] and checkpointed["finished"]
    for name in ("generator", "fake_score"):
        a, b = _ckpt(tmp_path / "plain", 2, name), _ckpt(tmp_path / "ckpt", 2, name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name


@pytest.mark.parametrize("timesteps", [[999, 499], [999, 749, 499, 249]], ids=["2step", "4step"])
def test_export_round_trip_in_stock_diffusers(compose_train, tmp_path, timesteps):
    override = f"distill.timesteps=[{','.join(map(str, timesteps))}]"
    run(compose_train("distill=dmd2", override, *FAST, "train.max_steps=2", out_dir=tmp_path / "r"))
    export = tmp_path / "r" / "export"
    card = json.loads((export / "pixsig_student.json").read_text())
    assert card["timesteps"] == timesteps and card["scheduler"] == "LCMScheduler" and card["eval_steps"] == [len(timesteps)]
    pipe = PixArtSigmaPipeline.from_pretrained(export)
    prompts = ["a red circle", "a blue square"]
    stock = pipe(prompts, timesteps=timesteps, guidance_scale=1.0, output_type="latent", max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), use_resolution_binning=False).images
    method, teacher = _method(compose_train, override, f"out_dir={tmp_path / 'r'}")
    load_checkpoint(tmp_path / "r" / "checkpoints" / "step-0000002", method.checkpoint_modules())
    embeds, mask = teacher.encode_prompts(prompts)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(teacher.latent_shape(2), generator=gen)
    from pixsig_distill.sampling import sample_latents

    with method.sampling_network() as generator:
        ours = sample_latents(lambda x, t: teacher.denoiser.eps(x, t, embeds, mask, transformer=generator), method.scheduler(),
                              noise, timesteps=timesteps, generator=gen)
    assert (ours - stock).abs().max() < 1e-4
