import os
import shutil
import subprocess
import sys

import pytest
import torch

from pixsig_distill.errors import UserError
from pixsig_distill.teacher import Teacher, load_pipeline
from pixsig_distill.testing import put_in_hub_cache

PROMPTS = ["a red circle at the top left", "a blue square on a green background"]


@pytest.fixture(scope="module")
def teacher(tiny_folder):
    return Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")


def test_sampling_equals_stock_pipeline(teacher, tiny_folder):
    """Our sampler (DPM-Solver++ 20 steps, CFG 4.5) gives the pipeline's latents and images."""
    from diffusers import PixArtSigmaPipeline

    stock = PixArtSigmaPipeline.from_pretrained(tiny_folder)
    for steps, scale in [(20, 4.5), (5, 1.0)]:
        ours = teacher.sample(PROMPTS, num_inference_steps=steps, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(3))
        theirs = stock(PROMPTS, num_inference_steps=steps, guidance_scale=scale, output_type="latent",
                       generator=torch.Generator().manual_seed(3), use_resolution_binning=False).images
        assert (ours - theirs).abs().max() <= 1e-4
    images = stock(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt",
                   use_resolution_binning=False).images
    ours = (teacher.decode(teacher.sample(PROMPTS, generator=torch.Generator().manual_seed(3))) / 2 + 0.5).clamp(0, 1)
    assert (ours - images).abs().max() <= 1e-4


def test_eps_drops_learned_sigma_and_cfg_formula(teacher):
    embeds, mask = teacher.encode_prompts(PROMPTS)
    x = torch.randn(teacher.latent_shape(2))
    t = torch.tensor([500, 20])
    full = teacher.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert full.shape[1] == 8  # ε + learned variance, as the real PixArt-Σ
    eps_c = teacher.denoiser.eps(x, t, embeds, mask)
    assert torch.allclose(eps_c, full[:, :4], atol=1e-6)
    null_embeds, null_mask = teacher.null_embedding(2)
    eps_u = teacher.denoiser.eps(x, t, null_embeds, null_mask)
    guided = teacher.denoiser.guided_eps(x, t, embeds, mask, guidance_scale=3.0)
    assert torch.allclose(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5)
    assert torch.allclose(teacher.denoiser.guided_eps(x, t, embeds, mask, guidance_scale=1.0), eps_c)


def test_null_embedding_is_the_empty_prompt(teacher):
    embeds, mask = teacher.null_embedding(3)
    ref_embeds, ref_mask = teacher.encode_prompts([""])
    assert embeds.shape[0] == 3 and torch.equal(embeds[1], ref_embeds[0]) and torch.equal(mask[2], ref_mask[0])
    assert int(mask[0].sum()) == 1  # only </s>


def test_x0_prediction_inverts_the_forward_process(teacher):
    embeds, mask = teacher.encode_prompts(PROMPTS)
    x_t = torch.randn(teacher.latent_shape(2))
    t = torch.tensor([999, 400])
    eps = teacher.denoiser.eps(x_t, t, embeds, mask)
    x0 = teacher.denoiser.x0(x_t, t, embeds, mask)
    a = teacher.denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_t, atol=1e-4)


def test_alpha_schedule_is_pixart_linear(teacher):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.allclose(teacher.denoiser.alphas_cumprod, expected, rtol=1e-5)


def test_local_folder_round_trip_keeps_weights(tiny_pipe, tiny_folder):
    pipe = load_pipeline(str(tiny_folder))
    for name in ("transformer", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(tiny_pipe, name).state_dict()
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert pipe.tokenizer("a red circle").input_ids == tiny_pipe.tokenizer("a red circle").input_ids


def test_scheduler_override(tiny_folder):
    teacher = Teacher.from_pretrained(str(tiny_folder), scheduler="DDIMScheduler", device="cpu")
    assert type(teacher.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(UserError, match="unknown scheduler"):
        Teacher.from_pretrained(str(tiny_folder), scheduler="NoSuchScheduler", device="cpu")


def test_hub_id_loads_through_the_hub_code_path(tiny_folder, tmp_path):
    """`model.pretrained=<hub id>` resolves through huggingface_hub's cache, offline, in a fresh process."""
    put_in_hub_cache(tiny_folder, "pixsig-test/tiny-sigma", tmp_path / "hub")
    code = ("from pixsig_distill.teacher import Teacher\n"
            "t = Teacher.from_pretrained('pixsig-test/tiny-sigma', max_sequence_length=16, device='cpu')\n"
            "print('layers', t.transformer.config.num_layers)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layers 2" in result.stdout


def test_uncached_hub_id_offline_says_how_to_fix(tmp_path):
    code = "from pixsig_distill.teacher import load_pipeline\nload_pipeline('pixsig-test/not-there')\n"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not in the local cache" in result.stderr and "model.pretrained=" in result.stderr


def test_missing_folder_and_missing_component_are_named(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))
    broken = tmp_path / "no_vae"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="lacks vae"):
        load_pipeline(str(broken))


def test_corrupt_weights_give_one_line(tiny_folder, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="could not load model") as err:
        load_pipeline(str(broken))
    assert "\n" not in str(err.value)
