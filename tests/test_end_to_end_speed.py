"""After one step: the tiny decoder (distill=tiny_decoder, inference vae=), trimmed text encoding, latency stages."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from evaluation.leaderboard import run as leaderboard
from pixsig_distill.errors import UserError
from pixsig_distill.generate import generate
from pixsig_distill.inference import InferenceMode, load_for_inference
from pixsig_distill.teacher import Teacher
from pixsig_distill.train import run as train

PROMPTS = ["a red circle", "a small blue square at the top left on a black background"]


@pytest.fixture(scope="module")
def student_export(tiny_folder, tmp_path_factory):
    """A one-step student export of the tiny model (its transformer as is, DMD's recipe at T̄ = 400)."""
    from diffusers import DDPMScheduler

    from pixsig_distill.methods.common import export_pipeline

    teacher = Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")
    scheduler = DDPMScheduler.from_config(teacher.scheduler.config)
    card = {"method": "dmd", "t_bar": 400, "num_inference_steps": 1, "timesteps": [400], "guidance_scale": 1.0,
            "scheduler": "DDPMScheduler", "eval_steps": [1]}
    return export_pipeline(teacher, teacher.transformer, scheduler, tmp_path_factory.mktemp("student") / "export",
                           card, full_pipeline=True)


@pytest.fixture(scope="module")
def decoder_export(tiny_folder, student_export, tmp_path_factory):
    """A tiny decoder trained for 4 steps on real latents and the student's samples, with the adversarial term."""
    out = tmp_path_factory.mktemp("tiny_decoder")
    overrides = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                 "model.max_sequence_length=16", "model.resolution=16", f"out_dir={out}", "train.max_steps=4",
                 "train.batch_size=4", "train.log_every=2", "train.sample_every=4", "train.ckpt_every=2",
                 "device=cpu", "eval=none", "distill=tiny_decoder", "distill.latents.n=16",
                 f"distill.student='{student_export}'", "distill.student_share=0.5",
                 "distill.adversarial_weight=0.1", "distill.decoder.channels=8"]
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        summary = train(compose("train", overrides=overrides))
    assert summary["finished"] and set(summary["last_logs"]) >= {"loss_pixel", "loss_adv", "loss_discriminator"}
    return out


def test_tiny_decoder_export_is_what_stock_diffusers_loads_and_samples_with(decoder_export, student_export):
    from diffusers import AutoencoderTiny, PixArtSigmaPipeline

    export = decoder_export / "export"
    assert (export / "diffusion_pytorch_model.safetensors").is_file() and (export / "README.md").is_file()
    card = json.loads((export / "pixsig_decoder.json").read_text())
    assert card["student"] == str(student_export) and card["vae_scale_factor"] == 2 and card["latent_channels"] == 4
    assert (decoder_export / "samples").is_dir()  # previews, decoded by the tiny decoder
    vae = AutoencoderTiny.from_pretrained(export)
    assert vae.config.scaling_factor == 1.0
    pipe = PixArtSigmaPipeline.from_pretrained(student_export, vae=vae)
    assert pipe.vae_scale_factor == 2

    def call(**kwargs):
        return pipe(PROMPTS[0], num_inference_steps=1, timesteps=[400], guidance_scale=1.0, height=16, width=16,
                    use_resolution_binning=False, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                    **kwargs).images

    latents = call(output_type="latent")
    image = call(output_type="np")[0]
    # The pipeline divides by scaling_factor (1.0) and feeds the tiny decoder the latents the transformer made:
    # the latents it was trained on.
    with torch.no_grad():
        direct = (vae.decode(latents).sample[0].clamp(-1, 1) + 1) / 2
    assert np.abs(image - direct.permute(1, 2, 0).numpy()).max() < 1e-5


def test_generate_with_the_tiny_decoder_matches_stock_diffusers(decoder_export, student_export, compose_generate,
                                                                tmp_path):
    from diffusers import AutoencoderTiny, PixArtSigmaPipeline

    export = decoder_export / "export"
    report = generate(compose_generate(f"student={student_export}", f"prompt='{PROMPTS[0]}'", "n_images=1",
                                       f"vae={export}"))
    assert report["images"] == 1
    ours = np.array(Image.open(tmp_path / "gen" / "images" / "00000.png")).astype(int)
    pipe = PixArtSigmaPipeline.from_pretrained(student_export, vae=AutoencoderTiny.from_pretrained(export))
    stock = pipe(PROMPTS[0], num_inference_steps=1, timesteps=[400], guidance_scale=1.0, height=16, width=16,
                 use_resolution_binning=False, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(ours - np.array(stock).astype(int)).max() <= 1


def test_leaderboard_rows_with_the_tiny_decoder_are_paired_with_the_same_student(
        decoder_export, student_export, tiny_folder, tmp_path):
    export = decoder_export / "export"
    entries = (f"entries=[{{name: s, method: dmd, path: '{student_export}'}},"
               f"{{name: s_tiny, method: dmd, path: '{student_export}', vae: '{export}', compare_to: s}}]")
    base = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", f"out_dir={tmp_path / 'lb'}", "device=cpu",
            "n_samples=4", "batch_size=4", "teacher_steps=[2]", "latency.warmup=1", "latency.runs=2", "grid.n=2",
            "progress=false", "eval.metrics=[clip,attributes]", "eval.bootstrap.resamples=20", "eval.real_row=false",
            "eval.compare_to.steps=2"]
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        result = leaderboard(compose("leaderboard", overrides=base + [entries]))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["s"]["compared_to"] == "teacher (2 steps)" and rows["s_tiny"]["compared_to"] == "s (1 step)"
    assert rows["s_tiny"]["vae"] == str(export) and rows["s"]["cache"] != rows["s_tiny"]["cache"]
    for row in result["rows"]:  # the breakdown: the three stages of the same end-to-end runs
        stages = row["latency"]["end_to_end"]["stages"]
        assert set(stages) == {"text_encoder", "transformer", "vae"}
        assert sum(s["median"] for s in stages.values()) <= row["latency"]["end_to_end"]["max"] * 1000 * 1.01
        assert set(row["latency_stages_ms"]) == set(stages)
    assert rows["s_tiny"]["latency"]["end_to_end"]["decoder"] == "AutoencoderTiny"
    assert rows["s"]["latency"]["end_to_end"]["decoder"] == "AutoencoderKL"
    markdown = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "## Against s (1 step), image for image" in markdown and "| s_tiny (1) | " in markdown
    assert "T5 + transformer + VAE (ms)" in markdown
    header = (tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"vae", "compared_to", "clip_diff", "vae_stage_median_ms"} <= set(header)
    # `vae=` for the whole run decodes every row with it: the teacher's images are others, under another cache key
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        again = leaderboard(compose("leaderboard", overrides=base + ["entries=[]", "latency.enabled=false",
                                                                     f"vae={export}"]))
    teacher = next(r for r in again["rows"] if r["name"] == "teacher")
    assert teacher["vae"] == str(export) and teacher["cache"] != rows["teacher"]["cache"]


def test_end_of_training_evaluation_of_a_decoder_pairs_each_model_with_its_vae(decoder_export, tiny_folder,
                                                                               tmp_path):
    """evaluate_export reads the export's card: for a decoder, the teacher and the student it was trained on, each
    with its VAE and with the decoder, the latter paired with the former."""
    from evaluation.evaluate import evaluate_export

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                          "model.torch_dtype=float32", "model.max_sequence_length=16",
                                          "model.resolution=16", "eval.n_samples=4", "eval.batch_size=4",
                                          "eval.metrics=[clip]", "eval.bootstrap.resamples=10", "eval.real_row=false",
                                          f"eval.teacher_cache_dir={tmp_path / 'teacher'}"])
    teacher = Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")
    result = evaluate_export(cfg.eval, cfg.model, teacher, decoder_export / "export", tmp_path / "eval")
    rows = [(r["name"], r["steps"], r.get("compared_to")) for r in result["rows"]]
    assert rows == [("teacher", 20, None), ("teacher + tiny decoder", 20, "teacher (20 steps)"),
                    ("dmd", 1, "teacher (20 steps)"), ("dmd + tiny decoder", 1, "dmd (1 step)")]
    assert "## Against dmd (1 step), image for image" in (tmp_path / "eval" / "eval.md").read_text()


def test_demo_shows_every_model_again_with_the_tiny_decoder(decoder_export, student_export, tiny_folder):
    from pixsig_distill.demo import generate_all, load_models

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("demo", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                         "model.torch_dtype=float32", "model.max_sequence_length=16", "device=cpu",
                                         f"student={student_export}", f"vae={decoder_export / 'export'}"])
    models = load_models(cfg)
    assert [m.name.endswith("+ tiny decoder") for m in models] == [False, False, True, True]
    assert [type(m.model.vae).__name__ for m in models] == ["AutoencoderKL"] * 2 + ["AutoencoderTiny"] * 2
    assert models[2].model.transformer is models[0].model.transformer  # the same networks, another decoder
    out = generate_all(models, "a red circle", 0, 2, 4.5)
    images = [np.asarray(image, dtype=float) for image in out[0::2]]
    assert np.abs(images[1] - images[3]).mean() > 0  # the student's image through either decoder


def test_tiny_decoder_bad_input_is_one_line(compose_generate, decoder_export, tiny_folder, tmp_path):
    with pytest.raises(UserError, match="no config.json there"):
        generate(compose_generate("prompt=x", "n_images=1", f"vae={tmp_path}"))
    with pytest.raises(UserError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        generate(compose_generate("prompt=x", "n_images=1", f"vae={tiny_folder / 'vae'}"))
    # a decoder for another VAE (3 resolutions, the toy world's) on this model (2): named, with the fix
    from diffusers import AutoencoderKL

    from pixsig_distill.decoders import tiny_decoder_like

    other = tiny_decoder_like(AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                                            up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8), channels=8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="decodes 4-channel latents ×4, but this model makes 4-channel latents ×2"):
        generate(compose_generate("prompt=x", "n_images=1", f"vae={tmp_path / 'other'}"))
    with pytest.raises(UserError, match="needs real latents: data=images"):
        from pixsig_distill.methods.tiny_decoder import TinyDecoder

        method = TinyDecoder(Teacher.from_pretrained(str(tiny_folder), device="cpu"), decoder={}, latents=None,
                             student=None, student_share=0.0, pixel_weight=1.0, lpips_weight=0.0, lpips=None,
                             adversarial_weight=0.0, discriminator_channels=8, ema_decay=None,
                             optimizer=torch.optim.AdamW, grad_clip=None)
        method.train_step({"prompt": ["x"]}, torch.Generator())


@pytest.mark.parametrize("engine,stage,adversarial,message", [
    ("FSDP", None, 0.0, "needs no sharding; launch it with DDP"),
    ("DEEPSPEED", 3, 0.0, "needs no sharding; launch it with DDP"),
    ("DEEPSPEED", 2, 0.1, "adversarial_weight > 0 under DeepSpeed"),
])
def test_tiny_decoder_refuses_what_it_cannot_run_in_one_line(tiny_folder, engine, stage, adversarial, message):
    """FSDP2 wraps transformer blocks (a decoder has none, and ~1M weights need no shards); DeepSpeed cannot run the
    decoder's GAN loss through a second engine. Checked in `prepare`, before any step."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pixsig_distill.methods.tiny_decoder import TinyDecoder

    method = TinyDecoder(Teacher.from_pretrained(str(tiny_folder), device="cpu"), decoder={"channels": 8},
                         latents=None, student=None, student_share=0.0, pixel_weight=1.0, lpips_weight=0.0, lpips=None,
                         adversarial_weight=adversarial, discriminator_channels=8, ema_decay=None,
                         optimizer=torch.optim.AdamW, grad_clip=None)
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, engine),
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(UserError, match=message):
        method.prepare(accelerator)


# ---- trimmed text encoding ----------------------------------------------------------------------------------

def test_trimmed_prompts_make_the_same_images_with_fewer_tokens():
    """T5 over the longest prompt of the batch, not max_sequence_length padded tokens: the same images (CFG, whose
    empty-prompt branch is fitted to the same length, included), from fewer T5 tokens. The T5 features of the
    valid tokens agree to float rounding (sums over another number of masked keys)."""
    from pixsig_distill.config import _toy_asset
    from pixsig_distill.images import to_uint8

    teacher = Teacher.from_pretrained(_toy_asset("teacher"), max_sequence_length=64, device="cpu")
    noise = torch.randn(teacher.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(0))

    def sample(trim: bool):
        teacher.trim_text = trim
        embeds, mask = teacher.encode_prompts(PROMPTS)
        return embeds, mask, to_uint8(teacher.decode(teacher.sample(embeds=embeds, mask=mask, noise=noise)))

    padded_embeds, padded_mask, padded = sample(False)
    trimmed_embeds, trimmed_mask, trimmed = sample(True)
    tokens = trimmed_embeds.shape[1]
    assert padded_embeds.shape[1] == 64 and tokens == teacher.prompt_tokens(PROMPTS) < 20
    assert torch.equal(trimmed_mask, padded_mask[:, :tokens]) and not padded_mask[:, tokens:].any()
    assert torch.allclose(trimmed_embeds, padded_embeds[:, :tokens], atol=1e-5, rtol=0)
    assert np.abs(trimmed.astype(int) - padded.astype(int)).max() <= 1  # 20 steps, CFG 4.5: the same images


def test_trimming_is_on_by_default_and_works_on_cached_prompts(tiny_folder):
    """`text_encoder.trim` (conf/inference/default.yaml) defaults on; with T5 released first (cached embeddings)
    the cached rows are cut to the batch's longest prompt too."""
    from omegaconf import OmegaConf

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("generate", overrides=[f"model.pretrained={tiny_folder}", "model=pixart_sigma_512",
                                             "model.max_sequence_length=16", "model.torch_dtype=float32"])
    mode = InferenceMode.from_config(cfg)
    assert mode.trim_text and "prompts trimmed" in mode.describe(Teacher.from_pretrained(str(tiny_folder)))
    released = InferenceMode(release_text_encoder=True)
    model_cfg = OmegaConf.merge(cfg.model, {"pretrained": str(tiny_folder), "resolution": 16})
    model, _ = load_for_inference(model_cfg, mode=released, prompts=PROMPTS, device="cpu")
    embeds, mask = model.encode_prompts(PROMPTS[:1])
    assert model.pipe.text_encoder is None and embeds.shape[1] == int(mask.sum()) < 16
