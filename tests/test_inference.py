"""Inference modes (pixsig_distill/inference.py): the same images whatever the mode, and one line where a mode
cannot run here (no GPU, no bitsandbytes)."""

import json

import numpy as np
import pytest
from PIL import Image

from pixsig_distill.errors import UserError
from pixsig_distill.generate import generate
from pixsig_distill.inference import InferenceMode, load_for_inference


def images(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted((folder / "images").glob("*.png"))]


def test_releasing_t5_gives_the_same_images(compose_generate, tmp_path):
    plain = generate(compose_generate("prompt='a red circle'", "n_images=3", "steps=2", "batch_size=2",
                                      f"out_dir={tmp_path / 'plain'}"))
    released = generate(compose_generate("prompt='a red circle'", "n_images=3", "steps=2", "batch_size=2",
                                         "text_encoder.release=true", f"out_dir={tmp_path / 'released'}"))
    assert all(np.array_equal(a, b) for a, b in zip(images(tmp_path / "plain"), images(tmp_path / "released")))
    assert released["text_encoder_released"] and not plain["text_encoder_released"]
    assert "T5 released" in released["mode"] and released["steady_ms_per_image"] is not None


def test_a_released_model_holds_no_t5_and_encodes_new_prompts_from_t5_alone(compose_generate):
    cfg = compose_generate("prompt=x", "text_encoder.release=true", "text_encoder.trim=false")  # 16 tokens, as T5 ran
    mode = InferenceMode.from_config(cfg)
    model, _ = load_for_inference(cfg.model, None, "cpu", mode, prompts=["a red circle"])
    assert model.pipe.text_encoder is None and model.can_encode(["a red circle"])
    assert not model.can_encode(["a blue square"])
    from pixsig_distill.inference import add_prompts

    add_prompts(model, ["a blue square"], cfg.model, "cpu", mode)
    plain, _ = load_for_inference(cfg.model, None, "cpu", InferenceMode(trim_text=False))
    ours, theirs = model.encode_prompts(["a blue square"]), plain.encode_prompts(["a blue square"])
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(ours, theirs))
    assert np.array_equal(model.null_embedding(1)[0].numpy(), plain.null_embedding(1)[0].numpy())


def test_compiled_transformer_gives_the_same_images_and_reports_the_first_call_apart(compose_generate, tmp_path):
    generate(compose_generate("prompt='a red circle'", "n_images=2", "steps=2", "batch_size=1",
                              f"out_dir={tmp_path / 'eager'}"))
    generate(compose_generate("prompt='a red circle'", "n_images=2", "steps=2", "batch_size=1", "compile=true",
                                       f"out_dir={tmp_path / 'compiled'}"))
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(images(tmp_path / "eager"), images(tmp_path / "compiled")))
    saved = json.loads((tmp_path / "compiled" / "latency.json").read_text())
    assert saved["compile"] and "compile=default" in saved["mode"]
    assert saved["first_batch_s"] > saved["steady_ms_per_image"] / 1000  # compilation is in the first batch only


def test_release_on_a_real_width_model(tmp_path):
    """Σ-512 width (1152 hidden, a 4096-wide T5 output, 300 tokens), one layer, random weights: T5 loaded alone gives
    the embeddings (prompt and empty prompt) the full pipeline gives, so the denoiser sees the same inputs."""
    import torch
    from hydra import compose, initialize_config_module

    from pixsig_distill.architectures import random_pipeline

    folder = tmp_path / "sigma512"
    random_pipeline("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", num_layers=1).save_pretrained(folder,
                                                                                             safe_serialization=True)
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("generate", overrides=["model=pixart_sigma_512", f"model.pretrained={folder}",
                                             "model.torch_dtype=float32", "device=cpu", "prompt=x"])
    prompts = ["a red circle", "a blue square on a white background"]
    plain, _ = load_for_inference(cfg.model, None, "cpu", InferenceMode(trim_text=False))  # all 300 tokens
    released, _ = load_for_inference(cfg.model, None, "cpu", InferenceMode(release_text_encoder=True, trim_text=False),
                                     prompts=prompts)
    assert released.pipe.text_encoder is None and plain.pipe.text_encoder is not None
    (e1, m1), (e2, m2) = plain.encode_prompts(prompts), released.encode_prompts(prompts)
    assert e1.shape == (2, 300, 4096) and torch.equal(e1, e2) and torch.equal(m1, m2)
    # The empty prompt is encoded in a batch of its own by one and with the job's prompts by the other: with more
    # than one thread the BLAS may sum in another order, so equal to float rounding (bit for bit on one thread).
    assert torch.allclose(plain.null_embedding(1)[0], released.null_embedding(1)[0], atol=1e-5, rtol=0)
    x = torch.randn(plain.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])
    scale = plain.guidance_scale
    assert torch.allclose(plain.denoiser.guided_eps(x, t, e1, m1, scale), released.denoiser.guided_eps(x, t, e2, m2, scale),
                          atol=1e-5, rtol=0)


@pytest.mark.parametrize("override,message", [
    ("offload=model", "no GPU"), ("offload=sequential", "no GPU"), ("offload=disk", "use none, model or sequential"),
    ("text_encoder.quantization=8bit", "bitsandbytes"), ("text_encoder.quantization=2bit", "use none, 8bit or 4bit"),
    ("compile=maybe", "use true or false"), ("compile_mode=fastest", "compile_mode='fastest'"),
])
def test_a_mode_that_cannot_run_here_is_one_line(compose_generate, override, message):
    with pytest.raises(UserError, match=message):
        generate(compose_generate("prompt=x", override))
