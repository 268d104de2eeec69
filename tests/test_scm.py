"""distill=scm on the tiny PixArt-Σ: the export is a stock pipeline (LCMScheduler, v-prediction) that samples as our
sampler does, the JVP runs on the default SDPA model (switched to the math path for the call) or is refused in one
line where it cannot run. Its learning test is in tests/test_learning.py; the shared checks run it through
tests/methods.py."""

import json

import pytest
import torch
from accelerate import Accelerator
from diffusers import LCMScheduler, PixArtSigmaPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from pixsig_distill.checkpoint import load_checkpoint
from pixsig_distill.config import build
from pixsig_distill.errors import UserError
from pixsig_distill.train import run

FAST = ["distill=scm", "distill.pair_steps=2"]


def test_export_samples_in_stock_diffusers_as_our_sampler_does(compose_train, tmp_path):
    cfg = compose_train(*FAST, "train.max_steps=2", "train.ckpt_every=2", out_dir=tmp_path / "run")
    assert run(cfg)["finished"]
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002", method.checkpoint_modules())
    export = tmp_path / "run" / "export"
    pipe = PixArtSigmaPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    card = json.loads((export / "pixsig_student.json").read_text())
    assert card["method"] == "scm" and card["eval_steps"] == [1, 2, 4] and card["guidance_scale"] == 1.0
    prompts = ["a red circle", "a blue square"]
    embeds, mask = teacher.encode_prompts(prompts)
    for steps in (1, 2, 4):
        stock = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(steps), use_resolution_binning=False).images
        gen = torch.Generator().manual_seed(steps)  # the same draws: initial noise, then the re-noising
        noise = torch.randn(teacher.latent_shape(2), generator=gen)
        ours = method.sample(embeds, mask, noise, num_inference_steps=steps, generator=gen)
        assert (ours - stock).abs().max() <= 1e-4 * stock.abs().max(), steps
    # one step is f_θ(z, t̂(999)) = cos t̂·z − sin t̂·F_θ: the consistency function, not a DDPM step
    noise = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), method.sampling_network() as student:
        one = method.generate(student, embeds, mask, noise)
    assert torch.allclose(one, method.sample(embeds, mask, noise, num_inference_steps=1), atol=1e-5)


def test_the_default_sdpa_student_trains_through_the_math_path_and_keeps_its_own(compose_train):
    """The exact JVP swaps each attention layer to diffusers' AttnProcessor for the call (PyTorch's fused kernel has
    no forward-mode AD: tests/test_jvp.py) and gives the layers their own processors back."""
    cfg = compose_train(*FAST, "distill.jvp=exact")
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    method.prepare(Accelerator(cpu=True))
    before = dict(method.student.attn_processors)
    assert {type(p) for p in before.values()} == {AttnProcessor2_0}
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    logs = method.train_step({"prompt": ["a red circle", "a blue square"], "embeds": embeds, "mask": mask},
                             torch.Generator().manual_seed(0))
    assert torch.isfinite(logs["loss_scm"]) and logs["grad_norm"] > 0
    assert method.student.attn_processors == before


def test_what_the_exact_jvp_cannot_run_is_refused_in_one_line(compose_train):
    cfg = compose_train(*FAST, "distill.jvp=exact")
    teacher = build(cfg.model)

    class FusedKernelAttention(AttnProcessor2_0):  # a kernel with the same call and no forward-mode rule
        pass

    teacher.transformer.transformer_blocks[0].attn1.set_processor(FusedKernelAttention())
    with pytest.raises(UserError, match="FusedKernelAttention.*distill.jvp=finite_difference") as err:
        build(cfg.distill, teacher=teacher)
    assert "\n" not in str(err.value)
    build(compose_train(*FAST, "distill.jvp=finite_difference").distill, teacher=teacher)  # plain forwards: fine

    from pixsig_distill.sharding import check_engine

    for engine in ("zero3", "zero2", "fsdp2"):  # training asks the method before `prepare`, a plan before simulating
        if engine == "zero3":
            with pytest.raises(UserError, match="ZeRO-3.*finite_difference.*deepspeed_zero2.yaml") as err:
                check_engine(cfg, engine)
            assert "\n" not in str(err.value)
        else:
            check_engine(cfg, engine)
    with pytest.raises(UserError, match="distill.jvp='forward'"):
        build(compose_train(*FAST, "distill.jvp=forward").distill, teacher=teacher)


def test_the_plan_counts_the_jvp_and_names_its_attention_path():
    """At 1024 px (4,096 image tokens) the exact JVP's math attention holds a 16 × 4,096 × 4,096 score matrix and
    its tangent for a layer at a time: the planner simulates the step's JVP, and says which path it assumed. One
    layer, batch 1, checkpointed activations (where the JVP, not the backward, sets the peak)."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.fake_step import simulate_step
    from pixsig_distill.plan_config import plan_notes

    peaks, notes = {}, {}
    for jvp in ("exact", "finite_difference"):
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cfg = compose("train", overrides=[
                "distill=scm", "model=pixart_sigma_1024", "model.load_text_encoder=false", "train.batch_size=1",
                "train.gradient_checkpointing=true", "train.mixed_precision=bf16", "distill.ema_decay=null",
                f"distill.jvp={jvp}"])
        peaks[jvp], notes[jvp] = simulate_step(cfg, num_layers=1).peak, " ".join(plan_notes(cfg))
    score_matrix_and_tangent = 2 * 16 * 4096**2 * 2  # bf16
    assert peaks["exact"] - peaks["finite_difference"] > 2 * score_matrix_and_tangent
    assert "math attention" in notes["exact"] and "finite difference" in notes["finite_difference"]


def test_rcm_switches_its_dmd_term_on_at_the_end_of_the_warm_up_by_the_step_number(compose_train):
    """The DMD term starts at step `tangent_warmup_steps` of the run (StepDraws.step, which a resume restores), not
    at a count of the method's own calls; the fake score learns from the first step."""
    from pixsig_distill.draws import StepDraws

    cfg = compose_train("distill=rcm", "distill.pair_steps=2", "distill.tangent_warmup_steps=5")
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    method.prepare(Accelerator(cpu=True))
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    batch = {"prompt": ["a red circle", "a blue square"], "embeds": embeds, "mask": mask}
    before = method.train_step(batch, StepDraws(torch.Generator().manual_seed(0), step=4))
    after = method.train_step(batch, StepDraws(torch.Generator().manual_seed(0), step=5))
    assert "loss_dm" not in before and float(before["r"]) == pytest.approx(0.8) and "loss_fake" in before
    assert torch.isfinite(after["loss_dm"]) and float(after["r"]) == 1.0
    card = method.card()
    assert card["method"] == "rcm" and card["dmd_timesteps"] == [999, 499] and card["eval_steps"] == [1, 2, 4]


def test_the_loss_moves_the_student_along_g_whatever_graph_g_carries():
    """Alg. 1's stop-gradient: ∂/∂F ‖F − sg(F + g)‖² = −2g exactly, also when g was built from the attached F (the
    realistic way to lose the stop-gradient), so no gradient flows through the target."""
    from pixsig_distill.methods.scm import consistency_loss, consistency_target

    F = torch.randn(3, 4, 2, 2, requires_grad=True)
    x_t, velocity, tangent = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    g, _ = consistency_target(F, velocity, x_t, tangent * F, torch.tensor([0.3, 0.9, 1.4]), r=0.5, c=0.1)
    (grad,) = torch.autograd.grad(consistency_loss(F, g).sum(), F)
    torch.testing.assert_close(grad, -2 * g.detach())
