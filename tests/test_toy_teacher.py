"""The shipped toy teacher loads with stock diffusers and with our loader; its training code runs."""

import torch
from diffusers import PixArtSigmaPipeline

from pixsig_distill.config import TOY_WEIGHTS
from pixsig_distill.teacher import Teacher
from pixsig_distill.toy.train import train_teacher, train_vae

TEACHER = TOY_WEIGHTS / "teacher"


def test_shipped_teacher_loads_with_stock_diffusers_offline():
    pipe = PixArtSigmaPipeline.from_pretrained(TEACHER)
    assert pipe.transformer.config.out_channels == 8  # ε + learned σ, like the real PixArt-Σ
    image = pipe("a large red circle in the center on a white background", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), use_resolution_binning=False,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_shipped_teacher_loads_with_our_loader_and_is_small():
    teacher = Teacher.from_pretrained(str(TEACHER), max_sequence_length=16, device="cpu")
    assert teacher.resolution == 32 and teacher.latent_shape(1) == (1, 4, 8, 8)
    size = sum(f.stat().st_size for f in TOY_WEIGHTS.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


def test_shipped_configs_name_no_folder_of_the_machine_that_built_them():
    import json

    named = {str(f.relative_to(TOY_WEIGHTS)): json.loads(f.read_text()).get("_name_or_path")
             for f in TOY_WEIGHTS.rglob("*.json") if isinstance(json.loads(f.read_text()), dict)}
    assert not {f: path for f, path in named.items() if path and ("/" in path or "\\" in path)}


def test_toy_teacher_follows_its_prompt():
    """A red-circle-on-white prompt gives a white background with red in the centre (not a random blob)."""
    teacher = Teacher.from_pretrained(str(TEACHER), max_sequence_length=16, device="cpu")
    latents = teacher.sample(["a large red circle in the center on a white background"] * 4,
                             generator=torch.Generator().manual_seed(0))
    images = (teacher.decode(latents) / 2 + 0.5).clamp(0, 1)
    corner = images[:, :, :4, :4].mean(dim=(2, 3))
    centre = images[:, :, 14:18, 14:18].mean(dim=(2, 3))
    assert (corner > 0.8).all()  # white
    assert (centre[:, 0] > 0.6).all() and (centre[:, 1] < 0.35).all() and (centre[:, 2] < 0.35).all()  # red


def test_training_scripts_run_a_few_steps(tmp_path):
    vae = train_vae(tmp_path / "vae", steps=2, batch_size=4, log_every=1)
    assert 0 < vae.config.scaling_factor < 100
    pipe = train_teacher(tmp_path / "teacher", vae, steps=2, batch_size=4, num_layers=1, warmup=1, log_every=1)
    reloaded = PixArtSigmaPipeline.from_pretrained(tmp_path / "teacher")
    assert reloaded.transformer.config.num_layers == 1
    assert (tmp_path / "teacher" / "training_log.json").is_file()
    a = pipe.transformer.state_dict()
    b = reloaded.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
