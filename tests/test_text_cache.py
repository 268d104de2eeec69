import launching
import pytest
import torch

from pixsig_distill.data import CachedTextDataset, read_prompt_file, write_text_cache
from pixsig_distill.errors import UserError
from pixsig_distill.teacher import Teacher

PROMPTS = ["a red circle", "a blue square at the top left on a green background", "a triangle"]


@pytest.fixture(scope="module")
def teacher(tiny_folder):
    return Teacher.from_pretrained(str(tiny_folder), max_sequence_length=16, device="cpu")


def test_cache_round_trip_equals_direct_encoding(teacher, tmp_path):
    folder = write_text_cache(tmp_path / "cache", PROMPTS, teacher.encode_prompts, teacher.null_embedding(1),
                              shard_size=2, batch_size=2)
    assert sorted(p.name for p in folder.glob("shard-*.safetensors")) == ["shard-00000.safetensors",
                                                                         "shard-00001.safetensors"]
    data = CachedTextDataset(folder, max_length=16)
    embeds, mask = teacher.encode_prompts(PROMPTS)
    assert len(data) == 3
    for i, prompt in enumerate(PROMPTS):
        item = data[i]
        assert item["prompt"] == prompt
        assert torch.equal(item["mask"], mask[i])
        valid = mask[i].bool()
        assert torch.allclose(item["embeds"][valid], embeds[i][valid])
        assert torch.all(item["embeds"][~valid] == 0)
    null_embeds, null_mask = data.null_embedding()
    ref_embeds, ref_mask = teacher.null_embedding(1)
    assert torch.equal(null_mask, ref_mask[0]) and torch.allclose(null_embeds[:1], ref_embeds[0, :1])


def test_cached_embeddings_give_the_same_eps(teacher, tmp_path):
    """The transformer's masked cross-attention ignores padding: cache-padded and pipeline-padded agree."""
    folder = write_text_cache(tmp_path / "cache", PROMPTS, teacher.encode_prompts, teacher.null_embedding(1))
    data = CachedTextDataset(folder)  # padded to the longest cached prompt only
    batch = [data[i] for i in range(3)]
    x = torch.randn(teacher.latent_shape(3))
    t = torch.tensor([10, 500, 900])
    ours = teacher.denoiser.eps(x, t, torch.stack([b["embeds"] for b in batch]), torch.stack([b["mask"] for b in batch]))
    ref = teacher.denoiser.eps(x, t, *teacher.encode_prompts(PROMPTS))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_incomplete_or_corrupt_cache_is_refused(teacher, tmp_path):
    with pytest.raises(UserError, match="not a complete text-embedding cache"):
        CachedTextDataset(tmp_path / "nothing")
    folder = write_text_cache(tmp_path / "cache", PROMPTS, teacher.encode_prompts, teacher.null_embedding(1))
    shard = folder / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(UserError, match="missing or corrupt"):
        CachedTextDataset(folder)


@pytest.mark.parametrize("content,message", [
    (b"", "has no prompts"), (b"\n  \n", "has no prompts"), (b"\x00\x01\x02binary", "is binary"),
    (b"caf\xe9 au lait\n", "not UTF-8"), (b"x" * 10_000 + b"\n", "10000 characters"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_prompt_file(path)
    with pytest.raises(UserError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_prompt_file_reading(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red circle \n\nan orange square\n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red circle", "an orange square"]


def test_cache_text_command(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "cache"
    result = launching.python_m("pixsig_distill.cache_text", "model=pixart_sigma_512",
                                f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                                "model.max_sequence_length=16", f"prompts={prompts}", f"out_dir={out}", "device=cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(CachedTextDataset(out)) == 3
    result = launching.python_m("pixsig_distill.cache_text", f"prompts={tmp_path / 'nope.txt'}", f"out_dir={out}")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cache_text_encodes_an_image_folder_that_training_then_reads_without_t5(tiny_folder, compose_train, tmp_path):
    from hydra.utils import instantiate
    from test_finetune import write_folder

    from pixsig_distill.real_images import image_folder_latents

    folder, out = write_folder(tmp_path / "images", n=4), tmp_path / "image_cache"
    result = launching.python_m("pixsig_distill.cache_text", "model=pixart_sigma_512",
                                f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                                "model.max_sequence_length=16", "model.resolution=16", f"images={folder}",
                                f"out_dir={out}", "device=cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    cached = CachedTextDataset(out)
    without_t5 = instantiate(compose_train("model.load_text_encoder=false").model)
    assert len(cached) == 4 and cached[0]["latents"].shape == without_t5.latent_shape(1)[1:]
    assert len(image_folder_latents(without_t5, folder, cache_dir=out)) == 4  # found, not encoded again
