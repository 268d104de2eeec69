"""Defects a real-scale run hit: an export without T5, a resolution from the wrong place, oversized previews,
a latency report that named the wrong batch."""

import json

import pytest
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image

from pixsig_distill.data import write_text_cache
from pixsig_distill.errors import UserError
from pixsig_distill.teacher import Teacher
from pixsig_distill.train import run

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]


def test_export_of_a_teacher_without_t5_is_transformer_only_and_loads_on_the_teacher(compose_train, tiny_folder,
                                                                                     tmp_path):
    teacher = Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")
    cache = write_text_cache(tmp_path / "cache", PROMPTS, teacher.encode_prompts, teacher.null_embedding(1))
    summary = run(compose_train("model.load_text_encoder=false", "data=cached", f"data.folder={cache}",
                                "train.preview_prompts=[]"))
    export = tmp_path / "run" / "export"
    card = json.loads((export / "pixsig_student.json").read_text())
    assert summary["finished"] and not card["full_pipeline"] and card["teacher"] == str(tiny_folder)
    assert not (export / "text_encoder").exists() and (export / "transformer").is_dir()
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    pipe = PixArtSigmaPipeline.from_pretrained(card["teacher"], transformer=PixArtTransformer2DModel.from_pretrained(
        export / "transformer"), scheduler=DDPMScheduler.from_pretrained(export / "scheduler"))
    out = pipe("a red circle", timesteps=card["timesteps"], num_inference_steps=1, guidance_scale=1.0,
               output_type="latent", use_resolution_binning=False).images
    assert torch.isfinite(out).all()


def test_full_export_keeps_the_teachers_own_vae_and_t5_files(compose_train, tiny_folder, tmp_path):
    run(compose_train())
    for name in ("vae", "text_encoder"):
        ours = sorted(p.name for p in (tmp_path / "run" / "export" / name).iterdir())
        assert ours == sorted(p.name for p in (tiny_folder / name).iterdir())
        for file in (tiny_folder / name).iterdir():
            assert (tmp_path / "run" / "export" / name / file.name).read_bytes() == file.read_bytes()


def test_a_resolution_that_is_not_the_transformers_is_refused(tiny_folder):
    with pytest.raises(UserError, match="model.resolution=32 but this transformer makes 16 px images"):
        Teacher.from_pretrained(str(tiny_folder), resolution=32, device="cpu")
    assert Teacher.from_pretrained(str(tiny_folder), resolution=None, device="cpu").resolution == 16


def test_a_student_is_sampled_at_its_own_resolution(compose_generate, compose_train, tmp_path):
    """`generate model=<other resolution> student=...`: the student's transformer decides the image size."""
    run(compose_train())
    report_dir = tmp_path / "gen"
    from pixsig_distill.generate import generate

    generate(compose_generate(f"student={tmp_path / 'run' / 'export'}", "model.resolution=32", "n_images=1",
                              "prompt='a red circle'", f"out_dir={report_dir}"))
    assert Image.open(report_dir / "images" / "00000.png").size == (16, 16)
    latency = json.loads((report_dir / "latency.json").read_text())
    assert latency["batch_size"] == 1 and latency["images"] == 1  # one image: batch 1, not the configured 8


def test_preview_grids_are_only_upscaled_when_small(tmp_path):
    from pixsig_distill.loop import _save_preview

    class Stub:
        def __init__(self, size):
            self.size = size

        def sample(self, embeds, mask, noise):
            return noise

        def decode(self, latents):
            return torch.zeros(len(latents), 3, self.size, self.size)

    for size, expected in ((16, 16 * 8), (512, 512)):
        stub = Stub(size)
        _save_preview(stub, stub, (None, None, torch.zeros(2, 4, 2, 2)), tmp_path / f"{size}.png")
        height = Image.open(tmp_path / f"{size}.png").size[1]
        assert expected <= height <= 1.25 * expected + 8, (size, height)  # (+ padding)
