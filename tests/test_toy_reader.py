"""The learned attribute reader (the second reader): at least 99 % all-correct on real held-out renders, which it
never trained on, and a low score on images of other captions."""

import numpy as np
import pytest

from pixsig_distill.toy.reader import load_reader, reader_hits
from pixsig_distill.toy.world import ToyWorldDataset


@pytest.fixture(scope="module")
def heldout():
    data = ToyWorldDataset("heldout", 600, seed=3)
    items = [data[i] for i in range(len(data))]
    images = np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                       for it in items])
    return images, [it["caption"] for it in items]


def test_the_shipped_reader_reads_real_heldout_images(heldout):
    images, captions = heldout
    hits = reader_hits(images, captions, load_reader())
    assert hits.all(axis=1).mean() >= 0.99


def test_the_reader_rejects_images_of_other_captions(heldout):
    images, captions = heldout
    shuffled = list(np.roll(captions, 1))
    assert reader_hits(images, shuffled).all(axis=1).mean() < 0.1
