import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, PixArtSigmaPipeline
from safetensors.torch import load_file

from pixsig_distill.checkpoint import load_checkpoint
from pixsig_distill.config import build
from pixsig_distill.errors import UserError
from pixsig_distill.lora import add_lora, load_lora, save_lora
from pixsig_distill.schedule import ddim_step, lcm_boundary_scalings, skipping_step_grid
from pixsig_distill.testing import PIXART_SCHEDULER
from pixsig_distill.train import run

FAST = ["distill.pair_steps=2"]  # prompt-only toy data: the teacher samples x0 in 2 steps here
VARIANTS = {"lcm": ["distill=lcm"], "lcm_w": ["distill=lcm", "distill.w_embedding=true", "distill.export_w=6.0"],
            "lcm_lora": ["distill=lcm_lora", "distill.lora_rank=4"]}


def _trained(compose_train, out_dir, *overrides):
    """Train 4 steps, then rebuild the method from the last checkpoint (teacher, method, config)."""
    cfg = compose_train(*FAST, *overrides, out_dir=out_dir)
    summary = run(cfg)
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    load_checkpoint(out_dir / "checkpoints" / "step-0000004", method.checkpoint_modules())
    return summary, teacher, method


# ---- the pure pieces against diffusers ----------------------------------------------------------

def test_boundary_scalings_match_lcm_scheduler():
    scheduler = LCMScheduler.from_config(PIXART_SCHEDULER, timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 39, 259, 519, 999])
    c_skip, c_out = lcm_boundary_scalings(t, 10.0)
    for i, step in enumerate(t):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert abs(c_skip[i] - ref_skip) < 1e-7 and abs(c_out[i] - ref_out) < 1e-7
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x: the consistency boundary condition


def test_skipping_step_grid_is_the_lcm_schedulers_original_schedule():
    grid = skipping_step_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    scheduler = LCMScheduler.from_config(PIXART_SCHEDULER, original_inference_steps=50)
    scheduler.set_timesteps(50)
    assert sorted(scheduler.timesteps.tolist()) == grid.tolist()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]  # a subset of the grid the student trains on


def test_skipping_step_ddim_solver_matches_ddim_scheduler():
    """Our DDIM step t → max(t − 20, 0) equals DDIMScheduler's 50-step trailing schedule (η = 0), whose
    last step also lands on ᾱ_0 when set_alpha_to_one=False, as diffusers' LCM example does."""
    scheduler = DDIMScheduler.from_config(PIXART_SCHEDULER, timestep_spacing="trailing", set_alpha_to_one=False,
                                          clip_sample=False)
    scheduler.set_timesteps(50)
    grid = skipping_step_grid(1000, 50)
    assert scheduler.timesteps.tolist() == grid.flip(0).tolist()
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        ref = scheduler.step(eps, t, x, eta=0.0).prev_sample
        ours = ddim_step(x, eps, t.view(1), (t - 20).clamp(min=0).view(1), scheduler.alphas_cumprod)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), int(t)


def test_guidance_convention(compose_train):
    """guidance_w = w in ε_c + w(ε_c − ε_u) is CFG scale w + 1 in the teacher's ε_u + s(ε_c − ε_u)."""
    cfg = compose_train("distill=lcm")
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    x, t = torch.randn(teacher.latent_shape(2)), torch.tensor([999, 259])
    w = torch.full((2,), 4.5)
    ref = teacher.denoiser.guided_eps(x, t, embeds, mask, guidance_scale=5.5)
    assert torch.allclose(method.teacher_eps(x, t, embeds, mask, w), ref, atol=1e-5)


def test_guidance_embedding_bakes_exactly_into_a_stock_transformer(compose_train):
    """The grafted w-embedding (zero-initialised: the student starts as the teacher) follows deep copies,
    changes the output with w, and folds exactly into linear_1's bias for one w."""
    import copy

    from pixsig_distill.methods.guidance_embedding import add_guidance_embedding, bake_guidance, guidance

    teacher = build(compose_train().model)
    model = copy.deepcopy(teacher.transformer)
    add_guidance_embedding(model)
    twin = copy.deepcopy(model)  # as the EMA target is made
    embeds, mask = teacher.encode_prompts(["a red circle"])
    x, t = torch.randn(teacher.latent_shape(1)), torch.tensor([499])

    def eps(net, w):
        with torch.no_grad(), guidance(net, torch.tensor([w])):
            return _eps(net, teacher, x, t, embeds, mask)

    plain = _eps(teacher.transformer, teacher, x, t, embeds, mask)
    assert torch.allclose(eps(model, 4.5), plain, atol=1e-5)
    with torch.no_grad():
        for p in model.guidance_embedding.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    assert torch.allclose(eps(twin, 4.5), plain, atol=1e-5)  # the copy hooks its own (still zero) embedding
    assert (eps(model, 4.5) - eps(model, 8.0)).abs().max() > 1e-3
    baked = bake_guidance(model, teacher.transformer, 8.0)
    assert not hasattr(baked, "guidance_embedding")
    assert torch.allclose(_eps(baked, teacher, x, t, embeds, mask), eps(model, 8.0), atol=1e-5)
    with pytest.raises(RuntimeError, match="outside"):
        _eps(model, teacher, x, t, embeds, mask)


# ---- training, resume, export --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lcm", "lcm_lora"])
def test_training_resumes_exactly(compose_train, tmp_path, variant):
    """4 steps in one go == 2 steps, stop, re-run the same command (deterministic mode)."""
    args = [*FAST, *VARIANTS[variant], "train.deterministic=true"]
    straight = run(compose_train(*args, out_dir=tmp_path / "a"))
    run(compose_train(*args, "train.max_steps=2", out_dir=tmp_path / "b"))
    resumed = run(compose_train(*args, out_dir=tmp_path / "b"))
    assert straight["finished"] and resumed["step"] == 4
    assert "loss_lcm" in straight["last_logs"] and all(math.isfinite(v) for v in straight["last_logs"].values())
    names = ["lora"] if variant == "lcm_lora" else ["student", "target"]
    for name in names:
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    if variant == "lcm_lora":  # checkpoints hold the adapters only
        assert a and all("lora_" in k for k in a)
    card = json.loads((tmp_path / "a" / "export" / "pixsig_student.json").read_text())
    assert card["method"] == variant and card["scheduler"] == "LCMScheduler" and card["num_inference_steps"] == 4


@pytest.mark.parametrize("variant", ["lcm", "lcm_w", "lcm_lora"])
def test_export_round_trips_through_stock_diffusers(compose_train, tmp_path, variant):
    _, teacher, method = _trained(compose_train, tmp_path / "run", *VARIANTS[variant])
    pipe = PixArtSigmaPipeline.from_pretrained(tmp_path / "run" / "export")
    assert isinstance(pipe.scheduler, LCMScheduler)
    saved = json.loads((tmp_path / "run" / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert "solver_order" not in saved and saved["original_inference_steps"] == 50  # no DPM-Solver leftovers
    prompts = ["a red circle", "a blue square"]
    embeds, mask = teacher.encode_prompts(prompts)
    for steps in (1, 2, 4):
        stock = pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, output_type="latent",
                     generator=torch.Generator().manual_seed(steps), use_resolution_binning=False).images
        gen = torch.Generator().manual_seed(steps)  # the same draws: initial noise, then LCM's re-noising
        noise = torch.randn(teacher.latent_shape(2), generator=gen)
        ours = method.sample(embeds, mask, noise, num_inference_steps=steps, generator=gen)
        assert (ours - stock).abs().max() <= 1e-4 * stock.abs().max(), steps


def test_pairs_latents_are_used_and_prompt_only_batches_get_teacher_samples(compose_train):
    cfg = compose_train("distill=lcm", *FAST)
    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    batch = {"prompt": ["a red circle", "a blue square"], "embeds": embeds, "mask": mask}
    latents = torch.randn(teacher.latent_shape(2))
    assert torch.equal(method.clean_latents({**batch, "latents": latents}), latents)
    with pytest.raises(UserError, match="make_pairs"):
        method.clean_latents({**batch, "latents": torch.randn(2, 4, 4, 4)})
    made = method.clean_latents(batch)  # prompt-only: the teacher's own 2-step samples, cached per prompt
    again = method.clean_latents({**batch, "prompt": batch["prompt"][::-1], "embeds": embeds.flip(0),
                                  "mask": mask.flip(0)})
    assert torch.equal(again, made.flip(0)) and len(method.samples.cache) == 2
    seed = zlib.crc32(b"a red circle")  # seed 0: the noise of a prompt depends on the prompt only
    noise = torch.randn(teacher.latent_shape(1)[1:], generator=torch.Generator().manual_seed(seed))[None]
    expected = teacher.sample(embeds=embeds[:1], mask=mask[:1], noise=noise, num_inference_steps=2)
    assert torch.allclose(made[:1], expected, atol=1e-5 * expected.abs().max())


# ---- LoRA ----------------------------------------------------------------------------------------

def _eps(transformer, teacher, x, t, embeds, mask):
    return teacher.denoiser.eps(x, t, embeds, mask, transformer=transformer)


def test_lora_save_load_merge(compose_train, tmp_path):
    import copy

    from peft import PeftModel

    cfg = compose_train("distill=lcm_lora")
    teacher = build(cfg.model)
    model = add_lora(copy.deepcopy(teacher.transformer), rank=4)
    with torch.no_grad():  # B = 0 at init: make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_lora(model, tmp_path / "lora", {"method": "lcm_lora"})
    loaded = PeftModel.from_pretrained(copy.deepcopy(teacher.transformer), str(tmp_path / "lora"))
    embeds, mask = teacher.encode_prompts(["a red circle"])
    x, t = torch.randn(teacher.latent_shape(1)), torch.tensor([499])
    with torch.no_grad():
        ref, base = _eps(model, teacher, x, t, embeds, mask), _eps(teacher.transformer, teacher, x, t, embeds, mask)
        unmerged = _eps(loaded, teacher, x, t, embeds, mask)
        merged = _eps(loaded.merge_and_unload(), teacher, x, t, embeds, mask)
    assert (ref - base).abs().max() > 1e-3  # the adapters matter ...
    assert torch.allclose(unmerged, ref, atol=1e-5) and torch.allclose(merged, unmerged, atol=1e-5)  # ... and survive


def test_merge_lora_command_writes_the_exported_student(compose_train, tiny_folder, tmp_path):
    from hydra import compose, initialize_config_module

    from pixsig_distill.merge_lora import merge_lora

    run(compose_train(*FAST, *VARIANTS["lcm_lora"], out_dir=tmp_path / "run"))
    export = tmp_path / "run" / "export"
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("merge_lora", overrides=[f"base={tiny_folder}", f"lora={export / 'lora'}",
                                               f"out_dir={tmp_path / 'merged'}"])
    merge_lora(cfg)
    card = json.loads((tmp_path / "merged" / "pixsig_student.json").read_text())
    assert card["method"] == "lcm_lora" and card["original_inference_steps"] == 50
    kwargs = dict(num_inference_steps=2, guidance_scale=0.0, output_type="latent", use_resolution_binning=False)
    ours = PixArtSigmaPipeline.from_pretrained(tmp_path / "merged")("a red circle", generator=torch.Generator()
                                                                    .manual_seed(0), **kwargs).images
    exported = PixArtSigmaPipeline.from_pretrained(export)("a red circle", generator=torch.Generator()
                                                           .manual_seed(0), **kwargs).images
    assert (ours - exported).abs().max() <= 1e-5 * exported.abs().max()


@pytest.mark.parametrize("method", ["finetune_lora", "dmd_lora"])
def test_merge_lora_keeps_the_adapters_own_recipe(method, compose_train, tiny_folder, tmp_path):
    """A merged fine-tune keeps its teacher's scheduler and CFG, a merged DMD LoRA generator its fixed timesteps:
    merge_lora carries the adapter's recipe instead of labelling every adapter an LCM-LoRA."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.merge_lora import merge_lora
    from test_finetune import finetune, write_folder

    if method == "finetune_lora":
        finetune(compose_train, write_folder(tmp_path / "images"), tmp_path / "run", "distill=finetune_lora",
                 "distill.lora_rank=4")
    else:
        run(compose_train("train.max_steps=2", "distill.generator.lora_rank=4", out_dir=tmp_path / "run"))
    export = tmp_path / "run" / "export"

    def merge(*extra):
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return merge_lora(compose("merge_lora", overrides=[f"base={tiny_folder}", f"lora={export / 'lora'}",
                                                               f"out_dir={tmp_path / 'merged'}", *extra]))

    merge()
    exported, merged = (json.loads((d / "pixsig_student.json").read_text()) for d in (export, tmp_path / "merged"))
    for key in ("method", "scheduler", "num_inference_steps", "guidance_scale", "timesteps"):
        assert merged.get(key) == exported.get(key), key
    schedulers = [json.loads((d / "scheduler" / "scheduler_config.json").read_text()) for d in (export, tmp_path / "merged")]
    assert schedulers[0] == schedulers[1]
    if method == "dmd_lora":
        with pytest.raises(UserError, match="fixed timesteps"):
            merge("num_inference_steps=4")


def test_lora_rank_must_be_positive(compose_train):
    cfg = compose_train("distill=lcm_lora")
    teacher = build(cfg.model)
    for bad in (0, -4, 2.5):
        with pytest.raises(UserError, match="lora_rank"):
            build(cfg.distill, teacher=teacher, lora_rank=bad)


def test_mismatched_lora_is_refused(compose_train, tmp_path):
    import copy

    from diffusers import PixArtTransformer2DModel

    cfg = compose_train("distill=lcm_lora")
    teacher = build(cfg.model)
    save_lora(add_lora(copy.deepcopy(teacher.transformer), rank=4), tmp_path / "lora", {})
    narrower = PixArtTransformer2DModel.from_config({**teacher.transformer.config, "attention_head_dim": 4})
    with pytest.raises(UserError, match="does not match this transformer: '.*' is 12×.* in the base but the adapter's"
                       ) as err:
        load_lora(narrower, tmp_path / "lora")
    assert "\n" not in str(err.value)
    shallower = PixArtTransformer2DModel.from_config({**teacher.transformer.config, "num_layers": 1})
    with pytest.raises(UserError, match="transformer_blocks.1"):
        load_lora(shallower, tmp_path / "lora")
    with pytest.raises(UserError, match="not a peft LoRA folder"):
        load_lora(teacher.transformer, tmp_path)


# ---- serving and data --------------------------------------------------------------------------

def test_generate_serves_lcm_students_at_1_2_4_steps(compose_train, tiny_folder, tmp_path):
    from hydra import compose, initialize_config_module

    import numpy as np
    from PIL import Image

    from pixsig_distill.generate import generate

    run(compose_train(*FAST, "distill=lcm", out_dir=tmp_path / "run"))

    def gen(*overrides):
        base = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                "model.max_sequence_length=16", "model.resolution=16", f"out_dir={tmp_path / 'gen'}", "device=cpu",
                f"student={tmp_path / 'run' / 'export'}", "prompt='a red circle'", "n_images=2"]
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return generate(compose("generate", overrides=base + list(overrides)))

    assert gen()["steps"] == 4 and gen("steps=1")["method"] == "lcm"
    images = []
    for batch_size in (1, 2):  # LCM re-noises between steps: from the per-image generators too
        gen("steps=2", f"batch_size={batch_size}")
        images.append([np.array(Image.open(p)).astype(int) for p in sorted((tmp_path / "gen" / "images").iterdir())])
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(*images))
    with pytest.raises(UserError, match="50-step grid"):
        gen("steps=60")


def test_training_from_teacher_pairs(compose_train, tiny_folder, tmp_path, caplog):
    """data=cached on a make_pairs folder: x0 are the stored teacher latents, nothing is sampled online."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.make_pairs import make_pairs

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("make_pairs", overrides=[
            "model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", "prompts=toy_train", "max_pairs=4",
            "num_inference_steps=2", "batch_size=4", f"out_dir={tmp_path / 'pairs'}", "device=cpu"])
    make_pairs(cfg)
    with caplog.at_level("WARNING"):
        summary = run(compose_train("distill=lcm", "data=cached", f"data.folder={tmp_path / 'pairs'}",
                                    out_dir=tmp_path / "run"))
    assert summary["finished"] and "no teacher latents" not in caplog.text


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "pixsig_distill" / "toy" / "weights" / "teacher" /
                         "model_index.json").is_file(), reason="the toy teacher is not shipped yet")
def test_toy_run_reports_one_two_and_four_steps_against_the_teacher(tmp_path, monkeypatch):
    """The default toy command's end-of-run report, shrunk: LCM at 1/2/4 steps and the teacher's own 4 steps."""
    from hydra import compose, initialize_config_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # teacher figures are cached per machine
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("train", overrides=["distill=lcm", *FAST, f"out_dir={tmp_path / 'run'}", "device=cpu",
                                          "train.max_steps=1", "train.batch_size=2", "eval.n_samples=4",
                                          "eval.batch_size=4", "eval.scorers.diversity.prompts=2",
                                          "eval.scorers.diversity.seeds=2"])
    run(cfg)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    rows = {(r["name"], r["steps"]): r for r in report["rows"]}
    assert {("teacher", 20), ("teacher", 4), ("lcm", 1), ("lcm", 2), ("lcm", 4)} <= set(rows)
    assert rows[("lcm", 4)]["n_samples"] == 4 and rows[("real images (another draw)", 0)]["kind"] == "real"
    assert all(math.isfinite(rows[("lcm", s)]["fid"]) for s in (1, 2, 4))
    assert {"fid_lo", "clip_hi", "attr_all", "diversity"} <= set(rows[("lcm", 1)])
    assert (tmp_path / "run" / "eval.md").is_file()
    card = (tmp_path / "run" / "export" / "README.md").read_text()  # the model card carries the figures
    assert "## Evaluation" in card and "| lcm | 4 |" in card and "num_inference_steps=4" in card
    assert (tmp_path / "run" / "eval_grid.png").is_file()
