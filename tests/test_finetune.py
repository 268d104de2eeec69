"""distill=finetune / finetune_lora on a captioned image folder: trains, resumes exactly, exports a pipeline that
stock diffusers loads (and that training accepts as a teacher), and refuses bad folders in one line."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixsig_distill.errors import UserError
from pixsig_distill.train import run


def write_folder(folder, n=6, captions=True, size=16):
    from pixsig_distill.toy.world import split_scenes

    folder.mkdir(parents=True, exist_ok=True)
    scenes = split_scenes("train")[:n]
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.render(size, np.random.default_rng(i))).save(folder / f"{i:03d}.png")
    if captions:
        (folder / "captions.txt").write_text("\n".join(s.caption for s in scenes) + "\n")
    return folder


def finetune(compose_train, folder, out_dir, *overrides):
    return run(compose_train("distill=finetune", "data=images", f"data.folder={folder}", "train.max_steps=2",
                             "train.ckpt_every=2", "train.batch_size=3", *overrides, out_dir=out_dir))


@pytest.mark.parametrize("method", ["finetune", "finetune_lora"])
def test_finetune_trains_exports_and_stock_diffusers_loads_it(method, compose_train, tmp_path):
    from diffusers import PixArtSigmaPipeline

    folder = write_folder(tmp_path / "images")
    summary = finetune(compose_train, folder, tmp_path / "run", f"distill={method}")
    assert summary["finished"] and summary["last_logs"]["loss_eps"] > 0
    export = tmp_path / "run" / "export"
    assert (folder / ".pixsig-latents").is_dir()  # latents and embeddings encoded once, cached as shards
    pipe = PixArtSigmaPipeline.from_pretrained(export)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 use_resolution_binning=False, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    if method == "finetune_lora":
        assert (export / "lora" / "adapter_config.json").is_file()


def test_the_finetune_is_a_teacher_for_distillation(compose_train, tmp_path):
    folder = write_folder(tmp_path / "images")
    finetune(compose_train, folder, tmp_path / "ft")
    summary = run(compose_train(f"model.pretrained={tmp_path / 'ft' / 'export'}", "train.max_steps=2",
                                out_dir=tmp_path / "dmd"))
    assert summary["finished"] and (tmp_path / "dmd" / "export" / "pixsig_student.json").is_file()


def test_finetune_resumes_exactly(compose_train, tmp_path):
    folder = write_folder(tmp_path / "images")
    finetune(compose_train, folder, tmp_path / "a", "train.max_steps=4")
    finetune(compose_train, folder, tmp_path / "b", "train.max_steps=2")
    finetune(compose_train, folder, tmp_path / "b", "train.max_steps=4")  # resumes from step 2
    for name in ("transformer", "transformer_ema", "optimizer-transformer"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_unreadable_and_non_rgb_images_are_handled(compose_train, tmp_path, caplog):
    folder = write_folder(tmp_path / "images", n=5)
    Image.open(folder / "001.png").convert("L").save(folder / "001.png")  # grayscale: converted
    Image.open(folder / "002.png").convert("RGBA").save(folder / "002.png")  # alpha: converted
    (folder / "005.png").write_bytes(b"not an image")  # unreadable: skipped and counted
    with open(folder / "captions.txt", "a") as f:
        f.write("a red circle in the center on a white background\n")
    import logging

    with caplog.at_level(logging.WARNING):
        summary = finetune(compose_train, folder, tmp_path / "run")
    assert summary["finished"] and "skipped 1 unreadable images of 6" in caplog.text


@pytest.mark.parametrize("case,message", [
    ("empty", "lists no images"), ("no_captions", "has no metadata.jsonl or captions.txt"),
    ("fewer_captions", "has 3 lines for 4 images"), ("more_captions", "has 5 lines for 4 images"),
    ("unlisted_image", "have no caption in metadata.jsonl"), ("missing_image", "listed images are missing"),
    ("all_unreadable", "none of its 2 images can be read"), ("missing_folder", "does not exist"),
])
def test_bad_folders_are_one_line_before_training(case, message, compose_train, tmp_path):
    import json

    folder = tmp_path / "images"
    if case == "empty":
        folder.mkdir()
        (folder / "captions.txt").write_text("")
    elif case == "no_captions":
        write_folder(folder, n=4, captions=False)
    elif case in ("fewer_captions", "more_captions"):
        write_folder(folder, n=4, captions=False)
        (folder / "captions.txt").write_text("\n".join(["a red circle"] * (3 if case == "fewer_captions" else 5)))
    elif case in ("unlisted_image", "missing_image"):
        write_folder(folder, n=4, captions=False)
        names = ["000.png", "001.png", "002.png"] + (["009.png", "003.png"] if case == "missing_image" else [])
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": "a red circle"})
                                                         for n in names))
    elif case == "all_unreadable":
        folder.mkdir()
        for name in ("a.png", "b.png"):
            (folder / name).write_bytes(b"junk")
        (folder / "captions.txt").write_text("a red circle\na blue square\n")
    with pytest.raises(UserError, match=message):
        finetune(compose_train, folder, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_finetune_without_images_says_which_data_it_needs(compose_train, tmp_path):
    with pytest.raises(UserError, match="data=images data.folder=DIR"):
        run(compose_train("distill=finetune", "train.max_steps=1"))


def test_images_not_yet_encoded_need_t5_and_say_so(compose_train, tmp_path):
    folder = write_folder(tmp_path / "images")
    with pytest.raises(UserError, match="not encoded yet and this teacher was loaded without T5"):
        finetune(compose_train, folder, tmp_path / "run", "model.load_text_encoder=false")


def test_once_encoded_the_finetune_runs_without_t5(compose_train, tmp_path):
    folder = write_folder(tmp_path / "images")
    finetune(compose_train, folder, tmp_path / "first")  # encodes the folder (and the empty prompt) once
    summary = finetune(compose_train, folder, tmp_path / "second", "model.load_text_encoder=false",
                       "train.preview_prompts=[]")
    assert summary["finished"] and (tmp_path / "second" / "export" / "transformer").is_dir()
