"""Tests for the procedural captioned toy world (pixsig_distill.toy.world)."""

from pathlib import Path

import launching
import numpy as np
import pytest
import torch

from pixsig_distill.toy import world
from pixsig_distill.toy.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ToyWorldDataset,
    all_scenes,
    caption_vocabulary,
    heldout_captions,
    split_scenes,
    write_image_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_caption_format_and_count():
    scene = Scene("circle", "red", "small", "top left", "navy")
    assert scene.caption == "a small red circle at the top left on a navy background"
    assert Scene("square", "blue", "large", "center", "white").caption == (
        "a large blue square in the center on a white background"
    )
    captions = [sc.caption for sc in all_scenes()]
    assert len(captions) == len(set(captions)) == 3 * 7 * 3 * 9 * 4 >= 2000
    assert all_scenes() == sorted(all_scenes())


def test_split_is_disjoint_complete_and_about_twelve_percent():
    train, heldout = split_scenes("train"), split_scenes("heldout")
    assert not {sc.caption for sc in train} & {sc.caption for sc in heldout}
    assert sorted(train + heldout) == all_scenes()
    assert 0.10 <= len(heldout) / len(all_scenes()) <= 0.14
    assert set(heldout_captions()) == {sc.caption for sc in heldout}


def test_every_attribute_and_shape_colour_pair_is_in_training():
    train = split_scenes("train")
    for field, values in (
        ("shape", SHAPES),
        ("colour", COLOURS),
        ("size", SIZES),
        ("position", POSITIONS),
        ("background", BACKGROUNDS),
    ):
        assert {getattr(sc, field) for sc in train} == set(values), field
    assert {(sc.shape, sc.colour) for sc in train} == {(s, c) for s in SHAPES for c in COLOURS}


def test_bad_split_and_attribute_are_rejected():
    with pytest.raises(ValueError, match="train, heldout"):
        split_scenes("test")
    with pytest.raises(ValueError, match="train, heldout"):
        ToyWorldDataset(split="validation", size=4)
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", "small", "top", "black")


def test_vocabulary_covers_every_caption_word():
    vocab = caption_vocabulary()
    assert vocab == sorted(set(vocab))
    assert {w for sc in all_scenes() for w in sc.caption.split()} == set(vocab)
    assert {"circle", "magenta", "navy", "center", "background"} <= set(vocab)


def test_dataset_is_deterministic_and_jittered():
    a = ToyWorldDataset("train", size=8, seed=3)
    b = ToyWorldDataset("train", size=8, seed=3)
    item = a[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(item["image"], b[5]["image"]) and item["caption"] == b[5]["caption"]
    assert not torch.equal(a[4]["image"], a[5]["image"])
    # The same caption drawn with two rngs differs only by jitter.
    scene = split_scenes("train")[0]
    one = scene.render(32, np.random.default_rng(1))
    assert np.array_equal(one, scene.render(32, np.random.default_rng(1)))
    assert not np.array_equal(one, scene.render(32, np.random.default_rng(2)))
    assert ToyWorldDataset("heldout", size=2, resolution=48)[0]["image"].shape == (3, 48, 48)


def test_dataset_cycles_through_whole_split():
    n = len(split_scenes("heldout"))
    # Only the scene choice is checked; rendering every image would be slow.
    scenes = tuple(split_scenes("heldout"))
    chosen = [world._scene_for_index(scenes, 0, i) for i in range(n)]
    assert sorted(chosen) == list(scenes)
    assert heldout_captions(n) == [sc.caption for sc in chosen]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("position", ["top left", "center", "bottom right", "right"])
def test_render_places_colour_at_position_on_background(shape, size, position):
    scene = Scene(shape, "orange", size, position, "navy")
    image = scene.render(32, np.random.default_rng(7))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    cx, cy = scene.center(32)
    # The image corner farthest from the object is pure background.
    corner_x = 0 if cx > 16 else 31
    corner_y = 0 if cy > 16 else 31
    assert tuple(image[corner_y, corner_x]) == BACKGROUNDS["navy"]
    # Pixels of the shape colour exist and are centred near the nominal position.
    distance = np.abs(image.astype(int) - COLOURS["orange"]).sum(axis=-1)
    ys, xs = np.nonzero(distance < 30)
    assert len(xs) >= 9
    assert abs(xs.mean() + 0.5 - cx) < 4 and abs(ys.mean() + 0.5 - cy) < 4


def test_write_image_folder_matches_dataset(tmp_path):
    out = write_image_folder(tmp_path / "imgs", "heldout", 5, seed=1)
    captions = (out / "captions.txt").read_text().splitlines()
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]
    assert captions == heldout_captions(5, seed=1)
    from PIL import Image

    item = ToyWorldDataset("heldout", size=5, seed=1)[3]
    pixels = np.asarray(Image.open(out / "00003.png"))
    assert np.allclose(pixels.transpose(2, 0, 1) / 127.5 - 1, item["image"].numpy(), atol=1e-6)
    assert captions[3] == item["caption"]


def _cli(*args):
    return launching.python_m("pixsig_distill.toy.make_images", *args, cwd=REPO_ROOT, timeout=60)


def test_cli_writes_images_and_rejects_bad_arguments(tmp_path):
    out = tmp_path / "cli"
    result = _cli("--split", "train", "--n", "7", "--seed", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.png"))) == 7
    assert len((out / "captions.txt").read_text().splitlines()) == 7

    result = _cli("--n", "0", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--n must be a positive" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_rejects_unknown_split(tmp_path, capsys):
    # In-process (a subprocess costs seconds of torch import); same argparse path.
    from pixsig_distill.toy.make_images import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--split", "test", "--n", "3", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'test'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
