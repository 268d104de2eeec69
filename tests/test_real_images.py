"""Captioned image folders encoded once (VAE latents + T5 embeddings) in the text cache's format and read back
memory-mapped: what DMD2's GAN (`distill/gan/real_images=folder`) and the fine-tune (`data=images`) read."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors import safe_open

from pixsig_distill.data import CachedTextDataset
from pixsig_distill.draws import StepDraws
from pixsig_distill.errors import UserError
from pixsig_distill.real_images import encode_image_folder, encode_images, image_folder_latents
from test_finetune import write_folder


def test_an_encoded_folder_holds_each_images_latents_and_only_its_valid_tokens(compose_train, tmp_path):
    teacher = instantiate(compose_train().model)
    folder = write_folder(tmp_path / "images", n=5)
    cache = encode_image_folder(teacher, folder)
    captions = (folder / "captions.txt").read_text().splitlines()
    dataset = CachedTextDataset(cache)
    assert dataset.prompts == captions and "latents" in dataset.extra_keys
    lengths = []
    for i, caption in enumerate(captions):
        image = np.array(Image.open(folder / f"{i:03d}.png").convert("RGB"))[None]
        embeds, mask = teacher.encode_prompts([caption])
        n = int(mask.sum())
        lengths.append(n)
        item = dataset[i]
        assert torch.allclose(item["latents"], encode_images(teacher, image)[0], atol=1e-5)
        assert torch.allclose(item["embeds"][:n], embeds[0, :n].cpu()) and int(item["mask"].sum()) == n
    with safe_open(str(cache / "shard-00000.safetensors"), "pt") as f:  # no padding is stored
        assert f.get_slice("embeds").get_shape()[0] == sum(lengths)
    # the bank hands out the rows its draws name
    bank = image_folder_latents(teacher, folder)  # already encoded: read back, not encoded again
    latents, embeds, mask = bank.sample(3, StepDraws(torch.Generator().manual_seed(0)), "cpu", torch.float32)
    rows = StepDraws(torch.Generator().manual_seed(0)).randint(0, 5, 3).tolist()
    assert torch.equal(latents, torch.stack([dataset[r]["latents"] for r in rows]))
    assert torch.equal(mask, torch.stack([dataset[r]["mask"] for r in rows]))


def test_a_cache_folder_holding_other_images_is_refused_in_one_line(compose_train, tmp_path):
    teacher = instantiate(compose_train().model)
    encode_image_folder(teacher, write_folder(tmp_path / "a", n=3), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="holds other encodings \(of other images, another teacher, or written by an older version of pixsig-distill\); give an empty"):
        encode_image_folder(teacher, write_folder(tmp_path / "b", n=4), cache_dir=tmp_path / "cache")
