import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipe():
    from pixsig_distill.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder (safetensors), as users get from the hub."""
    folder = tmp_path_factory.mktemp("tiny_sigma")
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder
