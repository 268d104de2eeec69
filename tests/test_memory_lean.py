"""Memory-lean DMD: a LoRA fake score on the frozen teacher, a LoRA generator merged at export, an optional EMA
kept on the CPU. Each trains, resumes exactly and exports a student that stock diffusers samples."""

import json

import pytest
import torch
from diffusers import PixArtSigmaPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from pixsig_distill.checkpoint import load_checkpoint
from pixsig_distill.errors import UserError
from pixsig_distill.train import run

LORA_FAKE = ["distill.fake_score.lora_rank=4"]
LORA_BOTH = ["distill.fake_score.lora_rank=4", "distill.generator.lora_rank=4"]


def _ckpt(out, step, name):
    return load_file(str(out / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def test_lora_fake_score_leaves_the_real_score_untouched(compose_train, tiny_pipe):
    cfg = compose_train(*LORA_FAKE)
    teacher = instantiate(cfg.model)
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    x = torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    embeds, mask = teacher.encode_prompts(["a red circle", "a blue square"])
    real_before = teacher.denoiser.eps(x, t, embeds, mask)
    method = instantiate(cfg.distill, teacher=teacher)
    fake_base = dict(method.fake_score.named_parameters())
    shared = [k for k, v in teacher.transformer.named_parameters()
              if any(v is w for w in fake_base.values())]
    assert len(shared) == len(before)  # one frozen base, not a second copy
    with torch.no_grad():  # adapters that do something (B = 0 at init would hide a mistake)
        for name, p in method.fake_score.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert torch.equal(teacher.denoiser.eps(x, t, embeds, mask), real_before)  # adapters off outside fake-score calls
    assert not torch.allclose(method.fake_x0(x, t, embeds, mask), teacher.denoiser.x0(x, t, embeds, mask), atol=1e-4)
    assert torch.equal(teacher.denoiser.eps(x, t, embeds, mask), real_before)
    assert not any(v.requires_grad for v in teacher.transformer.parameters())
    assert all(torch.equal(teacher.transformer.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("options", [LORA_FAKE, LORA_BOTH], ids=["lora_fake", "lora_generator_and_fake"])
def test_lora_dmd_trains_resumes_and_exports_to_stock_diffusers(options, compose_train, tiny_pipe, tmp_path):
    common = [*options, "train.deterministic=true", "distill.generator_optimizer.lr=1e-3", "distill.fake_optimizer.lr=1e-3"]
    straight = run(compose_train(*common, out_dir=tmp_path / "a"))
    run(compose_train(*common, "train.max_steps=2", out_dir=tmp_path / "b"))
    run(compose_train(*common, out_dir=tmp_path / "b"))
    assert straight["finished"]
    for name in ("generator", "fake_score", "generator_ema"):
        a, b = _ckpt(tmp_path / "a", 4, name), _ckpt(tmp_path / "b", 4, name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    fake = _ckpt(tmp_path / "a", 4, "fake_score")
    assert fake and all("lora_" in k for k in fake)  # adapters only: the checkpoint is small
    export = tmp_path / "a" / "export"
    card = json.loads((export / "pixsig_student.json").read_text())
    assert card["resolution"] == 16 and card["teacher"]
    pipe = PixArtSigmaPipeline.from_pretrained(export)
    assert not any("lora" in k for k in pipe.transformer.state_dict())  # merged: a plain transformer
    prompts = ["a red circle", "a blue square"]
    stock = pipe(prompts, timesteps=[400], num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0), use_resolution_binning=False).images
    cfg = compose_train(*common, out_dir=tmp_path / "a")
    teacher = instantiate(cfg.model)
    method = instantiate(cfg.distill, teacher=teacher)
    load_checkpoint(tmp_path / "a" / "checkpoints" / "step-0000004", method.checkpoint_modules())
    embeds, mask = teacher.encode_prompts(prompts)
    ours = method.sample(embeds, mask, torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(0)))
    assert (ours - stock).abs().max() < 1e-4
    assert not torch.allclose(ours, teacher.sample(embeds=embeds, mask=mask, timesteps=[400], guidance_scale=1.0,
                                                   noise=torch.randn(teacher.latent_shape(2),
                                                                     generator=torch.Generator().manual_seed(0)),
                                                   scheduler=method.scheduler()), atol=1e-4)  # it trained
    if "distill.generator.lora_rank=4" in options:  # the adapter, in peft format, on top of the teacher
        from peft import PeftModel

        base = PixArtSigmaPipeline.from_pretrained(cfg.model.pretrained).transformer
        merged = PeftModel.from_pretrained(base, str(export / "lora")).merge_and_unload().state_dict()
        exported = pipe.transformer.state_dict()
        assert max((merged[k] - exported[k]).abs().max().item() for k in exported) < 1e-5


def test_ema_on_cpu_and_without_ema(compose_train, tmp_path):
    """The EMA kept on the CPU is the same average as the one kept beside the generator, and it is what is
    exported."""
    summary = run(compose_train("distill.ema_device=cpu", "train.deterministic=true", out_dir=tmp_path / "cpu"))
    run(compose_train("train.deterministic=true", out_dir=tmp_path / "same"))
    on_cpu, beside = _ckpt(tmp_path / "cpu", 4, "generator_ema"), _ckpt(tmp_path / "same", 4, "generator_ema")
    assert summary["finished"] and on_cpu.keys() == beside.keys()
    assert max((on_cpu[k] - beside[k]).abs().max().item() for k in on_cpu) < 1e-6
    generator = _ckpt(tmp_path / "cpu", 4, "generator")
    assert max((on_cpu[k] - generator[k]).abs().max().item() for k in on_cpu) > 0  # an average, not a copy
    export = PixArtSigmaPipeline.from_pretrained(tmp_path / "cpu" / "export").transformer.state_dict()
    assert max((export[k] - on_cpu[k]).abs().max().item() for k in on_cpu) < 1e-6
    summary = run(compose_train("distill.ema_decay=null", out_dir=tmp_path / "none"))
    assert summary["finished"]
    assert not (tmp_path / "none" / "checkpoints" / "step-0000004" / "generator_ema.safetensors").exists()
    # No EMA: the export is the generator itself.
    export = PixArtSigmaPipeline.from_pretrained(tmp_path / "none" / "export").transformer.state_dict()
    generator = _ckpt(tmp_path / "none", 4, "generator")
    assert max((export[k] - generator[k]).abs().max().item() for k in generator) == 0


@pytest.mark.parametrize("override,message", [
    ("distill.fake_score.lora_rank=-1", "distill.fake_score.lora_rank=-1; use 0"),
    ("distill.ema_device=gpu", "distill.ema_device='gpu'; use same"),
    ("distill.ema_decay=1.5", "distill.ema_decay=1.5; use a number in"),
])
def test_bad_memory_options_are_one_line(override, message, compose_train):
    with pytest.raises(UserError, match=message):
        run(compose_train(override))
