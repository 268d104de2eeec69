"""Tests for the toy-world evaluators: the shipped toy CLIP and its FID features."""

import numpy as np
import open_clip
import pytest
import torch
from cleanfid.fid import frechet_distance
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.image.fid import FrechetInceptionDistance

from pixsig_distill.toy import clip as toy_clip
from pixsig_distill.toy.features import ToyFeatureExtractor, fid_from_features, toy_features, toy_fid, toy_fid_folders
from pixsig_distill.toy.world import all_scenes, write_image_folder


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return toy_clip.load_toy_clip()


@pytest.fixture(scope="module")
def heldout64():
    return toy_clip.heldout_images(64, seed=1)


@pytest.fixture(scope="module")
def extractor():
    return ToyFeatureExtractor()


def _uint8(images01: torch.Tensor) -> torch.Tensor:
    return (images01 * 255).round().to(torch.uint8)


def test_shipped_files_are_small_and_in_open_clip_layout():
    files = {p.name for p in toy_clip.WEIGHTS_DIR.iterdir()}
    assert {toy_clip.CONFIG_FILE, toy_clip.WEIGHTS_FILE, "tokenizer.json"} <= files
    assert (toy_clip.WEIGHTS_DIR / toy_clip.WEIGHTS_FILE).stat().st_size <= 8 * 2**20


def test_shipped_clip_loads_through_open_clip(shipped):
    model, _, tokenizer = shipped
    assert isinstance(model, open_clip.CLIP)
    assert isinstance(tokenizer, open_clip.tokenizer.HFTokenizer)
    # The normalisation comes from the shipped preprocess_cfg, not open_clip's defaults.
    assert model.visual.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    assert model.visual.preprocess_cfg["std"] == [0.5, 0.5, 0.5]
    # Loaded weights are exactly the file's (open_clip's safetensors path, strict load).
    state = load_file(str(toy_clip.WEIGHTS_DIR / toy_clip.WEIGHTS_FILE))
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    tokens = tokenizer(["a small red circle at the top left on a navy background"])
    assert tokens.shape == (1, 16) and tokens[0, 12] == toy_clip.EOS_ID and tokens[0, 13:].eq(toy_clip.PAD_ID).all()
    assert torch.equal(tokenizer(["A SMALL Red circle at the top left on a navy background"]), tokens)
    assert tokenizer(["a purple hexagon"])[0, 1:3].eq(toy_clip.UNK_ID).all()


def test_open_clip_transform_matches_tensor_path(shipped, heldout64):
    model, preprocess, _ = shipped
    images, _ = heldout64
    pil = Image.fromarray(_uint8(images[0]).permute(1, 2, 0).numpy())
    via_open_clip = preprocess(pil)
    via_tensor = toy_clip.prepare_images(model, _uint8(images[:1]).float() / 255)[0]
    assert torch.allclose(via_open_clip, via_tensor, atol=1e-5)
    assert via_tensor.min() >= -1 and via_tensor.max() <= 1


def test_matched_pairs_score_above_mismatched(shipped, heldout64):
    model, _, tokenizer = shipped
    images, captions = heldout64
    assert len(set(captions)) == 64
    sims = toy_clip.clip_image_features(model, images) @ toy_clip.clip_text_features(model, tokenizer, captions).T
    matched = sims.diag()
    mismatched_mean = (sims.sum(1) - matched) / 63
    assert (matched > mismatched_mean).all()
    assert (sims.argmax(dim=1) == torch.arange(64)).float().mean() >= 0.7  # top-1 among all 64
    assert toy_clip.caption_accuracy(model, tokenizer, images, captions) >= 0.9


def test_one_attribute_off_candidates():
    scenes = {sc.caption: sc for sc in all_scenes()}
    caption = "a small red circle at the top left on a navy background"
    off = toy_clip.one_attribute_off(caption)
    assert len(off) == len(set(off)) == 21 and caption not in off
    assert "a small red circle at the top on a navy background" in off
    fields = ("shape", "colour", "size", "position", "background")
    for other in off:
        assert sum(getattr(scenes[other], f) != getattr(scenes[caption], f) for f in fields) == 1


def test_train_three_steps_reloads_and_is_deterministic(tmp_path):
    torch.set_num_threads(1)
    kwargs = dict(steps=3, batch_size=16, seed=3, warmup_steps=1, progress=False)
    out = toy_clip.train_toy_clip(tmp_path / "a", **kwargs)
    model, _, tokenizer = toy_clip.load_toy_clip(weights_dir=out)
    feats = toy_clip.clip_text_features(model, tokenizer, ["a large blue square in the center on a white background"])
    assert feats.shape == (1, 128) and torch.isfinite(feats).all()
    again = toy_clip.train_toy_clip(tmp_path / "b", **kwargs)
    a, b = load_file(str(out / toy_clip.WEIGHTS_FILE)), load_file(str(again / toy_clip.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _real_and_shifted(n=256):
    images, _ = toy_clip.heldout_images(n, seed=1)
    real = _uint8(images)
    shifted = _uint8((images + torch.tensor([0.25, -0.15, 0.0]).view(1, 3, 1, 1)).clamp(0, 1))
    return real, shifted


def test_feature_extractor_with_torchmetrics_fid(extractor):
    real, shifted = _real_and_shifted()
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    assert fid.inception is extractor and extractor.num_features == 128
    fid.update(real, real=True)
    fid.update(real, real=False)
    self_fid = float(fid.compute())
    fid.reset()
    fid.update(real, real=True)
    fid.update(shifted, real=False)
    shifted_fid = float(fid.compute())
    assert abs(self_fid) < 1e-3
    assert shifted_fid > 1.0 and shifted_fid > 1000 * abs(self_fid)

    # Float inputs in [0, 1] (torchmetrics' normalize=True) give the same features.
    assert torch.allclose(extractor(real.float() / 255), extractor(real), atol=1e-6)

    # clean-fid's frechet_distance on the same features agrees with torchmetrics.
    f_real, f_shift = extractor(real).numpy(), extractor(shifted).numpy()
    cleanfid_value = fid_from_features(f_real, f_shift)
    assert cleanfid_value == pytest.approx(shifted_fid, rel=1e-3)
    mu, sigma = f_real.mean(0), np.cov(f_real, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-3)
    # toy_fid takes channel-last uint8 numpy arrays.
    assert toy_fid(real.permute(0, 2, 3, 1).numpy(), shifted.permute(0, 2, 3, 1).numpy()) == pytest.approx(
        cleanfid_value, rel=1e-6
    )


def test_clean_fid_folder_path_matches_toy_fid(tmp_path):
    a = write_image_folder(tmp_path / "a", "heldout", 200, seed=1)
    b = write_image_folder(tmp_path / "b", "heldout", 200, seed=2)
    direct = toy_fid(
        np.stack([np.array(Image.open(p)) for p in sorted(a.glob("*.png"))]),
        np.stack([np.array(Image.open(p)) for p in sorted(b.glob("*.png"))]),
    )
    assert toy_fid_folders(a, b) == pytest.approx(direct, rel=1e-4)
    assert toy_features(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 128)
