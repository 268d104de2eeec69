import json
import math

import pytest
import torch

from pixsig_distill.checkpoint import list_checkpoints, load_checkpoint
from pixsig_distill.errors import UserError
from pixsig_distill.methods.dmd import dm_gradient, dm_loss
from pixsig_distill.schedule import add_noise
from pixsig_distill.train import run


def _gaussian_denoiser(mean: float, std: float, alphas_cumprod):
    """E[x0 | x_t] for data ~ N(mean, std²): the exact score of a Gaussian, in x0 form."""
    def denoise(x_t, t):
        a = alphas_cumprod[t].view(-1, 1)
        gain = a.sqrt() * std**2 / (a * std**2 + 1 - a)
        return mean + gain * (x_t - a.sqrt() * mean)
    return denoise


def test_dm_gradient_moves_the_student_toward_the_teacher():
    """1-D case: real data N(2, 0.5²); the generator shifts unit noise by a learnable offset and the
    fake score is the exact denoiser of the generator's current distribution. Following the DM loss
    must carry the offset from 0 to the teacher's mean."""
    torch.manual_seed(0)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    real = _gaussian_denoiser(2.0, 0.5, alphas_cumprod)
    offset = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([offset], lr=0.1)
    trace = []
    for _ in range(400):
        x0_hat = offset + 0.5 * torch.randn(256, 1)
        fake = _gaussian_denoiser(offset.item(), 0.5, alphas_cumprod)
        t = torch.randint(20, 981, (256,))
        x_t = add_noise(x0_hat.detach(), torch.randn(256, 1), t, alphas_cumprod)
        grad = dm_gradient(x0_hat.detach(), real(x_t, t), fake(x_t, t))
        opt.zero_grad()
        dm_loss(x0_hat, grad).backward()
        opt.step()
        trace.append(offset.item())
    assert trace[10] > 0  # it moves toward the teacher from the start
    assert abs(sum(trace[-50:]) / 50 - 2.0) < 0.1  # and settles on the teacher's mean


def test_dm_gradient_is_zero_when_distributions_match():
    x0 = torch.randn(4, 4, 8, 8)
    real = torch.randn(4, 4, 8, 8)
    assert torch.count_nonzero(dm_gradient(x0, real, real)) == 0
    grad = dm_gradient(x0, real, real + 1.0)
    expected = 1.0 / ((x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
    assert torch.allclose(grad, expected.expand_as(grad))


def test_training_writes_checkpoints_samples_logs_and_export(compose_train, tmp_path):
    summary = run(compose_train())
    out = tmp_path / "run"
    assert summary["finished"] and summary["step"] == 4
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert (out / "samples" / "step-0000004.png").is_file()
    assert any((out / "tensorboard").iterdir())
    card = json.loads((out / "export" / "pixsig_student.json").read_text())
    assert card["method"] == "dmd" and card["t_bar"] == 400
    assert all(math.isfinite(v) for v in summary["last_logs"].values())


def test_resume_continues_exactly(compose_train, tmp_path):
    """4 steps in one go == 2 steps, stop, re-run the same command for the rest (deterministic mode)."""
    straight = run(compose_train("train.deterministic=true", out_dir=tmp_path / "a"))
    run(compose_train("train.deterministic=true", "train.max_steps=2", out_dir=tmp_path / "b"))
    resumed = run(compose_train("train.deterministic=true", out_dir=tmp_path / "b"))
    assert straight["step"] == resumed["step"] == 4
    for name in ("generator", "fake_score", "generator_ema"):
        a = load_checkpoint_tensors(tmp_path / "a" / "checkpoints" / "step-0000004" / f"{name}.safetensors")
        b = load_checkpoint_tensors(tmp_path / "b" / "checkpoints" / "step-0000004" / f"{name}.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name


def load_checkpoint_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_partial_checkpoint_is_never_resumed_from(compose_train, tmp_path):
    run(compose_train("train.max_steps=2", out_dir=tmp_path / "c"))
    partial = tmp_path / "c" / "checkpoints" / ".tmp-step-0000003"
    partial.mkdir()
    (partial / "generator.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path / "c" / "checkpoints")] == ["step-0000002"]
    assert run(compose_train(out_dir=tmp_path / "c"))["step"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(compose_train, tmp_path, monkeypatch):
    """The DM loss turns NaN at the 3rd step, after the checkpoint of step 2: the run stops at step 3 naming that
    checkpoint, which is kept and holds the (finite) weights of step 2."""
    from pixsig_distill.methods.dmd import DMD

    real_loss, calls = DMD.distribution_matching_loss, []

    def breaks_at_step_3(self, x0_hat, *args):
        calls.append(1)
        loss = real_loss(self, x0_hat, *args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DMD, "distribution_matching_loss", breaks_at_step_3)
    with pytest.raises(UserError, match="loss_dm, loss_fake became non-finite at step 3; stopped, the last good "
                                        "checkpoint is .*step-0000002") as raised:
        run(compose_train("train.max_steps=6", out_dir=tmp_path / "nan"))
    from tqdm import tqdm

    # While the error is handled (its traceback alive, as when a command prints its one line), the bar is closed.
    assert raised.tb is not None and not [bar for bar in tqdm._instances if bar.desc == "train"]
    kept = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [c.name for c in kept] == ["step-0000002"]
    tensors = load_checkpoint_tensors(kept[0] / "generator.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # the kept weights are step 2's: a clean run of 2 steps ends on the same ones
    monkeypatch.setattr(DMD, "distribution_matching_loss", real_loss)
    run(compose_train("train.max_steps=2", out_dir=tmp_path / "two"))
    clean = load_checkpoint_tensors(tmp_path / "two" / "checkpoints" / "step-0000002" / "generator.safetensors")
    assert max((tensors[k] - clean[k]).abs().max().item() for k in clean) < 1e-6


def test_export_round_trips_through_stock_diffusers(compose_train, tmp_path):
    from diffusers import DDPMScheduler, PixArtSigmaPipeline

    from hydra.utils import instantiate

    cfg = compose_train("t_bar=400", out_dir=tmp_path / "e")
    run(cfg)
    export = tmp_path / "e" / "export"
    pipe = PixArtSigmaPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    saved = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert "solver_order" not in saved and saved["variance_type"] == "fixed_small"  # no DPM-Solver leftovers
    prompts = ["a red circle", "a blue square"]
    stock = pipe(prompts, timesteps=[400], num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0), use_resolution_binning=False).images
    # Our generator from the same checkpoint, sampling the same noise.
    teacher = instantiate(cfg.model)
    method = instantiate(cfg.distill, teacher=teacher)
    load_checkpoint(tmp_path / "e" / "checkpoints" / "step-0000004", method.checkpoint_modules())
    embeds, mask = teacher.encode_prompts(prompts)
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(0))
    ours = method.sample(embeds, mask, noise)
    assert (ours - stock).abs().max() < 1e-4
    # And the one-step sample really is x̂0 = (z − √(1−ᾱ)ε)/√ᾱ of the generator.
    with method.sampling_network() as generator:
        direct = method.generate(generator, embeds, mask, noise)
    assert (direct - ours).abs().max() < 1e-4


def test_bad_start_timestep_in_the_method_itself(compose_train):
    from pixsig_distill.config import build

    cfg = compose_train()
    teacher = build(cfg.model)
    for bad in (0, 1000, 4.5, "400", [400.7]):
        with pytest.raises(UserError, match="distill.timesteps"):
            build(cfg.distill, teacher=teacher, timesteps=bad)


def test_pairs_command_and_regression_loss(tiny_folder, compose_train, tmp_path):
    from hydra import compose, initialize_config_module

    from pixsig_distill.data import CachedTextDataset
    from pixsig_distill.make_pairs import make_pairs
    from pixsig_distill.teacher import Teacher

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("make_pairs", overrides=[
            "model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", "prompts=toy_train", "max_pairs=6",
            "num_inference_steps=3", "batch_size=4", "shard_size=4", f"out_dir={tmp_path / 'pairs'}", "device=cpu"])
    make_pairs(cfg)
    pairs = CachedTextDataset(tmp_path / "pairs")
    assert len(pairs) == 6 and set(pairs[0]) >= {"noise", "latents", "embeds", "mask"}
    # The stored latents are the teacher's own sample from the stored noise.
    teacher = Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")
    item = pairs[5]
    again = teacher.sample(embeds=item["embeds"][None], mask=item["mask"][None], noise=item["noise"][None],
                           num_inference_steps=3, guidance_scale=4.5)
    # (the random tiny model's latents reach ~300; batch 1 vs 4 differs only by float rounding)
    assert (again[0] - item["latents"]).abs().max() <= 1e-5 * item["latents"].abs().max()
    summary = run(compose_train("+distill/regression=pairs", f"distill.regression.pairs.folder={tmp_path / 'pairs'}",
                                out_dir=tmp_path / "reg"))
    assert summary["finished"] and "loss_reg" in summary["last_logs"]


def test_regression_without_pairs_is_refused(compose_train):
    with pytest.raises(UserError, match="needs teacher pairs"):
        run(compose_train("+distill/regression=pairs", "distill.regression.pairs=null"))


def test_resume_with_a_new_learning_rate_uses_it_and_says_so(compose_train, tmp_path, caplog):
    import logging

    from safetensors import safe_open

    run(compose_train("train.max_steps=2", "distill.generator_optimizer.lr=1e-3"))
    with caplog.at_level(logging.WARNING):
        run(compose_train("distill.generator_optimizer.lr=5e-4"))
    assert "optimizer generator: lr was 0.001 in the checkpoint; using 0.0005 from the config" in caplog.text
    assert "betas" not in caplog.text and "optimizer fake_score" not in caplog.text  # unchanged settings: silent
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-0000004" / "optimizer-generator.safetensors"),
                   "pt") as f:
        assert json.loads(f.metadata()["meta"])["param_groups"][0]["lr"] == 5e-4
