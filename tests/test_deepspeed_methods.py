"""The other methods under DeepSpeed with two CPU processes: the same weights as one process with the global batch,
and an export stock diffusers loads. Under ZeRO-3 (everything sharded; weights gathered for the EMA, the LCM target,
previews and checkpoints): LCM (a full student and its target) and LoRA fine-tuning (an EMA swapped in for
previews); LCM-LoRA in bf16, killed and resumed. DMD2 (backward simulation, the GAN head) under ZeRO-2: ZeRO-3
refuses it (its GAN loss runs one engine's backward through another). tests/test_deepspeed.py runs DMD under both
stages (killed and resumed under ZeRO-2); docs/scaling.md lists what ran by hand beyond these."""

import pytest

from methods import METHODS, cases, image_folder, learning_rate, networks
from test_deepspeed import ZERO_CONFIGS
from test_fsdp import assert_weights_close, checkpoint_files, differences, launch, train_here
from test_multiprocess import assert_in_sync, make_text_cache

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def command(tiny_folder, tmp_path_factory):
    """The scale-out command of a registry method (tests/methods.py) at tiny size: its data, or the text cache (both
    made here, once: the launched runs load no T5), its overrides for DeepSpeed. Also gives the composed config."""
    from hydra import compose, initialize_config_module

    from conftest import tiny_train_overrides

    root = tmp_path_factory.mktemp("deepspeed_methods")
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        model = compose("train", overrides=tiny_train_overrides(tiny_folder, root / "unused")).model
    places = {"cache": make_text_cache(tiny_folder, root / "cache"), **image_folder(model, root)}

    def _command(method, out_dir, *extra, steps=2):
        return tiny_train_overrides(tiny_folder, out_dir) + [
            f"train.max_steps={steps}", "model.load_text_encoder=false", "data=cached", f"data.folder={places['cache']}",
            "train.deterministic=true", f"hydra.run.dir={root / 'hydra'}",
            *METHODS[method].overrides("deepspeed" if method in cases("deepspeed") else None, **places), *extra]

    def composed(method):
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("train", overrides=[o for o in _command(method, root / "unused") if not o.startswith("hydra.")])

    _command.composed = composed
    return _command


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory):
    """method → its one-process run with the global batch of 4 (made once, shared by both stages)."""
    runs = {}

    def _reference(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"one_process_{method}") / "run"
            train_here(command(method, out, "train.batch_size=4"))
            runs[method] = out
        return runs[method]
    return _reference


@pytest.mark.parametrize("method", cases("deepspeed"))
def test_zero_trains_as_one_process_does(method, command, reference, tmp_path):
    """The registry's methods, each under the ZeRO stage its entry names (ZeRO-3 unless it says otherwise)."""
    options = METHODS[method].options("deepspeed")
    stage = options.get("stage", "zero3")
    out = tmp_path / stage
    real = options.get("real_launcher", False)  # one case runs the real launcher's DeepSpeed path (tests/launching.py)
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed would compile its C++ ops
    two = launch(command(method, out), tmp_path, config=ZERO_CONFIGS[stage], real=real,
                 TORCH_EXTENSIONS_DIR=str(extensions))
    assert two.returncode == 0, two.log[-4000:]
    assert not extensions.exists() or not any(extensions.iterdir())  # nothing compiled (distributed.py)
    composed = command.composed(method)
    names, lr = networks(composed), learning_rate(composed)
    if real:  # DeepSpeed's start-up lines go to the log file (console.py); the launcher's own process says one
        assert two.log.count("Setting accelerator to CPU") <= 1, two.log[-4000:]
        assert "DeepSpeed info" in (out / "train.log").read_text()
    assert_in_sync(out, 2, names)
    ours, theirs = checkpoint_files(out, 2), checkpoint_files(reference(method), 2)
    for name in names:
        if options.get("loose_tolerance"):  # more paths where float32 sums differ (as in test_fsdp.py's DMD2 test)
            diff = differences(ours[f"{name}.safetensors"], theirs[f"{name}.safetensors"])
            assert diff.max() <= lr and diff.quantile(0.99) <= 0.02 * lr, (name, diff.max().item())
        else:
            assert_weights_close(ours[f"{name}.safetensors"], theirs[f"{name}.safetensors"], lr, name)

    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer")


def test_zero3_bf16_checkpoints_keep_the_fp32_masters(command, tmp_path):
    """bf16 (DeepSpeed's own casting) with the model's activation checkpointing: the engine holds bf16 weights, the
    checkpoint its fp32 masters, and a resume writes those back into the masters (not their bf16 rounding)."""
    import torch

    out = tmp_path / "bf16"
    overrides = command("lcm_lora", out, "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                        steps=4)
    crashed = launch(overrides, tmp_path, config=ZERO_CONFIGS["zero3"], PIXSIG_FAULT_AFTER="step:3")
    assert crashed.returncode != 0, crashed.log[-4000:]
    lora = checkpoint_files(out, 2)["lora.safetensors"]
    assert {v.dtype for v in lora.values()} == {torch.float32}
    trained = torch.cat([v.flatten() for k, v in lora.items() if "lora_B" in k])  # zero at the start, then trained
    assert trained.abs().max() > 0 and (trained.bfloat16().float() != trained).any(), "masters saved bf16-rounded"

    resumed = launch(overrides, tmp_path, config=ZERO_CONFIGS["zero3"])
    assert resumed.returncode == 0, resumed.log[-4000:]
    assert "(step 2)" in resumed.log and "start afresh" not in resumed.log
    assert_in_sync(out, 4, networks(command.composed("lcm_lora")))
    assert (out / "export" / "pixsig_student.json").is_file()
