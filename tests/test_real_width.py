"""The real PixArt configurations at full width and reduced depth, random weights, on the CPU.

Hidden 1152, 16 heads, caption channels 4096, 300 T5 tokens (120 for α), the real VAE; a tiny random T5 whose
output is 4096 wide. DMD trains at the real canvases (one layer), 64×64 latents (512 px) and 128×128 (1024 px);
PixArt-α 1024 too (its size conditions exist only there). The other methods and recipes train at the same
widths on a 16×16 canvas (128 px, 64 image tokens instead of 1,024), which tests the widths, not the
resolution. Each run trains one step (at the real canvases) or two, exports, and stock diffusers samples the
export."""

import json

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

from methods import METHODS, cases
from pixsig_distill.architectures import random_pipeline
from pixsig_distill.train import run

SIGMA_512 = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
SIGMA_1024 = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
ALPHA_1024 = "PixArt-alpha/PixArt-XL-2-1024-MS"
MODEL_CONFIG = {SIGMA_512: "pixart_sigma_512", SIGMA_1024: "pixart_sigma_1024", ALPHA_1024: "pixart_alpha_1024"}
SMALL_CANVAS = 16  # latent side: 128 px


@pytest.fixture(scope="module")
def real_width_folder(tmp_path_factory):
    folders = {}

    def make(name: str, num_layers: int, sample_size: int | None = None):
        key = name, num_layers, sample_size
        if key not in folders:
            folder = tmp_path_factory.mktemp(name.split("/")[-1])
            random_pipeline(name, num_layers=num_layers, sample_size=sample_size).save_pretrained(
                folder, safe_serialization=True)
            folders[key] = folder
        return folders[key]

    return make


def _train(folder, model: str, out, *overrides, steps: int = 2):
    from hydra import compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={model}", f"model.pretrained={folder}", "model.torch_dtype=float32", f"out_dir={out}",
            f"train.max_steps={steps}", "train.batch_size=1", "train.log_every=1", f"train.ckpt_every={steps}", "device=cpu",
            "eval=none", "train.preview_prompts=[]", *overrides])
    return run(cfg)


def _stock_sample(export, pipeline_class, output_type="latent"):
    card = json.loads((export / "pixsig_student.json").read_text())
    pipe = pipeline_class.from_pretrained(export)
    kwargs = {"timesteps": card["timesteps"]} if card.get("timesteps") else {}
    out = pipe("a red circle", num_inference_steps=card["num_inference_steps"], guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type=output_type, use_resolution_binning=False,
               **kwargs).images
    return card, out


@pytest.mark.slow
@pytest.mark.parametrize("method", cases("real_width"))
def test_sigma_512_every_method_trains_exports_and_samples_in_stock_diffusers(method, real_width_folder, tmp_path):
    """The registry's methods (tests/methods.py): one of them at the real 512-px canvas (one layer, one step, as for
    1024), the others at the same widths on the small canvas (two layers, two steps)."""
    options = METHODS[method].options("real_width")
    real_canvas = options.get("real_canvas", False)
    side = 64 if real_canvas else SMALL_CANVAS
    folder = real_width_folder(SIGMA_512, 1, None) if real_canvas else real_width_folder(SIGMA_512, 2, SMALL_CANVAS)
    summary = _train(folder, "pixart_sigma_512", tmp_path / method, *METHODS[method].overrides("real_width"),
                     steps=1 if real_canvas else 2)
    assert summary["finished"]
    card, latents = _stock_sample(tmp_path / method / "export", PixArtSigmaPipeline)
    assert card["resolution"] == 8 * side and latents.shape == (1, 4, side, side) and torch.isfinite(latents).all()
    if options.get("decode_pixels"):  # once, the whole way to pixels: the real VAE decodes (on the small canvas)
        _, images = _stock_sample(tmp_path / method / "export", PixArtSigmaPipeline, output_type="np")
        assert images.shape == (1, 8 * side, 8 * side, 3) and images.std() > 0


@pytest.mark.slow
def test_sigma_1024_dmd_with_lean_options(real_width_folder, tmp_path):
    folder = real_width_folder(SIGMA_1024, 1)
    summary = _train(folder, "pixart_sigma_1024", tmp_path / "run", "distill.fake_updates_per_step=1",
                     "distill.fake_score.lora_rank=8",
                     "train.gradient_checkpointing=true", "distill.ema_device=cpu", steps=1)
    assert summary["finished"]
    card, latents = _stock_sample(tmp_path / "run" / "export", PixArtSigmaPipeline)
    assert card["resolution"] == 1024 and latents.shape == (1, 4, 128, 128)


@pytest.mark.slow
def test_alpha_1024_size_conditions_train_and_export_to_the_alpha_pipeline(real_width_folder, tmp_path):
    """PixArt-α 1024 has use_additional_conditions: the teacher passes the image size and aspect ratio (a None
    here crashed training before), and the export is a PixArtAlphaPipeline, the stock pipeline that passes them."""
    folder = real_width_folder(ALPHA_1024, 1)
    summary = _train(folder, "pixart_alpha_1024", tmp_path / "run", "distill=lcm_lora", "distill.pair_steps=1",
                     "distill.lora_rank=4", steps=1)
    assert summary["finished"]
    export = tmp_path / "run" / "export"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    card, latents = _stock_sample(export, PixArtAlphaPipeline)
    assert latents.shape == (1, 4, 128, 128) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_sigma_512_dmd2_with_an_image_folder_lora_fake_score_and_checkpointing(real_width_folder, tmp_path):
    """2-step DMD2 at real width: the GAN head on the LoRA fake score, real images from a captioned folder encoded
    by the real VAE, checkpointed activations (the generator's GAN term reads through the frozen fake score).
    The toy world's shapes, the default real images, are refused for a model of another resolution."""
    from pixsig_distill.errors import UserError
    from test_finetune import write_folder

    folder = real_width_folder(SIGMA_512, 2, SMALL_CANVAS)
    images = write_folder(tmp_path / "images", n=2, size=8 * SMALL_CANVAS)
    common = ["distill=dmd2", "distill.timesteps=[999,499]", "distill.fake_updates_per_step=1",
              "distill.fake_score.lora_rank=8", "train.gradient_checkpointing=true"]
    with pytest.raises(UserError, match=f"toy world's shapes .* not a {8 * SMALL_CANVAS}-px model"):
        _train(folder, "pixart_sigma_512", tmp_path / "toy_images", *common)
    summary = _train(folder, "pixart_sigma_512", tmp_path / "run", *common, "distill/gan/real_images=folder",
                     f"distill.gan.real_images.folder={images}")
    assert summary["finished"] and {"loss_gan_g", "loss_gan_d"} <= set(summary["last_logs"])
    card, latents = _stock_sample(tmp_path / "run" / "export", PixArtSigmaPipeline)
    assert card["timesteps"] == [999, 499] and latents.shape == (1, 4, SMALL_CANVAS, SMALL_CANVAS)
    assert torch.isfinite(latents).all()


@pytest.mark.slow
def test_sigma_512_reward_guided_two_step_dmd(real_width_folder, tmp_path):
    """The reward recipe at real width: 2 steps by backward simulation, the reward read through the real VAE's
    decoder and a stand-in of HPSv2's image tower (full width, 2 layers, random weights: a sizing run, whose card
    claims no reward), checkpointed activations."""
    folder = real_width_folder(SIGMA_512, 2, SMALL_CANVAS)
    summary = _train(folder, "pixart_sigma_512", tmp_path / "run", "+distill/rewards=clip_stand_in", "sizing_run=true",
                     "distill.rewards.clip_stand_in.reward.layers=2", "distill.timesteps=[400,200]",
                     "distill.fake_updates_per_step=1", "train.gradient_checkpointing=true", steps=1)
    assert summary["finished"] and "reward_clip_stand_in" in summary["last_logs"]
    card, latents = _stock_sample(tmp_path / "run" / "export", PixArtSigmaPipeline)
    assert card["timesteps"] == [400, 200] and "reward_clip_stand_in" not in card
    assert latents.shape == (1, 4, SMALL_CANVAS, SMALL_CANVAS) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_tiny_decoder_recipe_at_real_width(real_width_folder, tmp_path):
    """conf/experiment/pixart_sigma_1024_tiny_decoder.yaml (TAESD layout, the real SDXL VAE as the target, latents
    from an encoded image folder) on the small canvas for speed: one step, an export that stock diffusers loads
    as `vae=`."""
    from diffusers import AutoencoderTiny
    from test_finetune import write_folder

    images = write_folder(tmp_path / "images", n=1, size=8 * SMALL_CANVAS)
    folder = real_width_folder(SIGMA_512, 2, SMALL_CANVAS)  # the other small-canvas tests' folder
    summary = _train(folder, "pixart_sigma_512", tmp_path / "run", "experiment=pixart_sigma_1024_tiny_decoder",
                     f"data.folder={images}", "distill.lpips_weight=0", "train.mixed_precision=no", "train.batch_size=1",
                     steps=1)
    logs = summary["last_logs"]
    assert summary["finished"] and {"loss_pixel", "loss_adv", "loss_discriminator"} <= set(logs)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    decoder = AutoencoderTiny.from_pretrained(tmp_path / "run" / "export")
    assert list(decoder.config.decoder_block_out_channels) == [64, 64, 64, 64]  # the TAESD layout
    assert 2 ** (len(decoder.config.block_out_channels) - 1) == 8  # a pipeline's vae_scale_factor: the SDXL VAE's
    with torch.no_grad():
        image = decoder.decode(torch.randn(1, 4, 64, 64)).sample
    assert image.shape == (1, 3, 512, 512)
