"""FSDP2 with two CPU processes (gloo) under `accelerate launch`, as docs/scaling.md runs it on GPUs.

The same tiny scale-out command as tests/test_multiprocess.py, launched with the shipped
`cpu_fsdp2_2proc.yaml` (accelerate's FSDP2 path, one shard unit per transformer block). Two claims:

* sharding changes nothing but the order of floating-point sums: two processes × batch b end with the
  weights AND the optimizer moments of one process × batch 2b (the step's random draws are made for the
  global batch, draws.py);
* a killed run resumes with its optimizer state: killed after step 3, rerun, it ends where the
  uninterrupted one-process run ends, moments included (a restart of AdamW's moments would not). DMD's rerun is
  one process with the global batch: the gathered states resume on another process count.

Every launch forks its ranks from preloaded imports with the environment `accelerate launch` gives them for this
config (tests/launching.py); FSDP2 goes through the launcher's path that DDP takes, and the DDP test runs the real
command.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import launching
from launching import ROOT, Launch
from methods import METHODS, cases, image_folder, learning_rate
from methods import networks as method_networks
from pixsig_distill.checkpoint import list_checkpoints
from test_multiprocess import assert_in_sync, make_text_cache, scale_out_command

FSDP_CONFIG = ROOT / "pixsig_distill" / "conf" / "accelerate" / "cpu_fsdp2_2proc.yaml"
# Two processes sum the gradient in another order than one (float32 rounding, ~1e-7 relative). AdamW divides by
# √v, so where a gradient is ~0 (LoRA's A matrices start with zero gradient) that rounding can move a weight by a
# fraction of one step (lr): measured at most 0.11·lr over 4 steps, 99.9 % of the weights within 5e-8.
STEP_FRACTION, TYPICAL = 0.2, 1e-6


def launch(overrides: list[str], tmp_path: Path, config: Path = FSDP_CONFIG, real: bool = False, **env) -> Launch:
    """Two processes as `accelerate launch --config_file config` starts them (tests/launching.py)."""
    return launching.launch(overrides, tmp_path, config, real=real, **env)


def train_here(overrides: list[str]) -> dict:
    """The one-process reference run, in this process: the same `run(cfg)` that `python -m pixsig_distill.train`
    calls, without a launch's ~10 s of imports."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.train import run

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
        summary = run(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # train.deterministic=true sets it process-wide
    assert summary["finished"], summary
    return summary


def differences(a: dict, b: dict):
    assert set(a) == set(b)
    return torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])


def assert_weights_close(a: dict, b: dict, lr: float, what: str) -> None:
    diff = differences(a, b)
    assert diff.max() <= STEP_FRACTION * lr and diff.quantile(0.999) <= TYPICAL, (what, diff.max().item())


def assert_moments_close(a: dict, b: dict, what: str) -> None:
    """Adam's moments (and step counts) equal up to float32 rounding, relative to the scale of that moment over
    the network (some gradients are exactly 0 in theory, e.g. attention key biases: theirs are pure rounding)."""
    for kind in ("step", "exp_avg", "exp_avg_sq"):
        keys = [k for k in a if k.rsplit(".", 1)[1] == kind]
        scale = max(b[k].float().abs().max().item() for k in keys)
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in keys)
        assert worst <= 1e-3 * scale, (what, kind, worst, scale)


def checkpoint_files(out: Path, step: int) -> dict:
    folder = out / "checkpoints" / f"step-{step:07d}"
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}


def assert_same_training_state(out: Path, reference: Path, step: int, lr: float) -> set[str]:
    """The checkpoint at `step` of `out` has the reference run's files, its weights and its AdamW moments; returns
    the file names (a test may ask for particular optimizers)."""
    ours, theirs = checkpoint_files(out, step), checkpoint_files(reference, step)
    assert set(ours) == set(theirs) and any(name.startswith("optimizer-") for name in ours)
    for name in ours:
        if name.startswith("optimizer-"):
            assert_moments_close(ours[name], theirs[name], name)
        else:
            assert_weights_close(ours[name], theirs[name], lr, name)
    return set(ours)


@pytest.mark.parametrize("method", cases("fsdp2"))
def test_fsdp2_matches_one_process_and_resumes_with_its_optimizer_state(method, tiny_folder, tiny_train_args,
                                                                        compose_train, tmp_path, capsys, caplog):
    """The registry's methods (tests/methods.py), each network its method checkpoints."""
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    case = METHODS[method]
    places = image_folder(compose_train().model, tmp_path) if case.needs_images("fsdp2") else {}
    extra = case.overrides("fsdp2", **places)
    composed = compose_train(*extra)
    networks, lr = tuple(method_networks(composed)), learning_rate(composed)

    # The reference: one process, the global batch of 4 at once.
    reference = tmp_path / "one_process"
    train_here(command(reference, *extra, "train.batch_size=4"))

    # FSDP2, 2 processes × 2, both killed (SIGKILL) right after step 3, before its checkpoint.
    out = tmp_path / "fsdp"
    crashed = launch(command(out, *extra), tmp_path, PIXSIG_FAULT_AFTER="step:3")
    assert crashed.returncode != 0, crashed.log[-4000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["optimizer_states"] is True
    assert_in_sync(out, 2, networks)  # both processes gathered the same full weights, and rank 0 wrote them

    # DMD resumes on another process count: one process with the global batch (here, in this process) reads the
    # gathered states.
    if case.options("fsdp2").get("resume_on_one_process"):
        capsys.readouterr()
        train_here(command(out, *extra, "train.batch_size=4"))
        log = capsys.readouterr().out + caplog.text
    else:
        resumed = launch(command(out, *extra), tmp_path)
        assert resumed.returncode == 0, resumed.log[-4000:]
        log = resumed.log
        assert_in_sync(out, 4, networks)
    assert "(step 2)" in log and "start afresh" not in log

    # Weights and optimizer moments at step 4 equal the one-process run's (restarted moments would not: AdamW's
    # first steps after a restart move every weight by ~lr).
    assert_same_training_state(out, reference, 4, lr)

    # The export was written from the gathered weights (data=cached exports the transformer and scheduler).
    from diffusers import PixArtTransformer2DModel

    ours, theirs = (PixArtTransformer2DModel.from_pretrained(run / "export" / "transformer").state_dict()
                    for run in (out, reference))
    assert_weights_close(ours, theirs, lr, "export")


def test_fsdp2_runs_lcm_with_bf16_and_gradient_checkpointing(tiny_folder, tiny_train_args, compose_train, tmp_path):
    """The GPU recipe's settings (bf16 autocast + FSDP2's bf16 parameter all-gather, the model's own activation
    checkpointing) through the same code on CPU: it trains, checkpoints in sync and exports."""
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    out = tmp_path / "run"
    lcm = ["distill=lcm", "distill.pair_steps=2"]
    result = launch(command(out, *lcm, "train.max_steps=2", "train.mixed_precision=bf16",
                            "train.gradient_checkpointing=true"), tmp_path)
    assert result.returncode == 0, result.log[-4000:]
    assert_in_sync(out, 2, method_networks(compose_train(*lcm)))
    assert (out / "export" / "pixsig_student.json").is_file()


def test_fsdp2_runs_dmd2_as_one_process_does(tiny_folder, tiny_train_args, compose_train, tmp_path):
    """DMD2 sharded: 2-step backward simulation, the GAN head on a hooked fake-score block, its real images from a
    captioned folder (encoded once, here beforehand: the launched runs load no T5), checkpointed activations (the
    generator's GAN term reads through the fake score, frozen for that update) — the same weights as one process
    with the global batch."""
    from hydra.utils import instantiate

    from pixsig_distill.real_images import encode_image_folder
    from test_finetune import write_folder

    folder, bank = write_folder(tmp_path / "images", n=8), tmp_path / "bank"
    encode_image_folder(instantiate(compose_train().model), folder, cache_dir=bank)
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    extra = ["distill=dmd2", "distill.timesteps=[999,499]", "train.max_steps=2", "train.gradient_checkpointing=true",
             "distill/gan/real_images=folder",
             f"distill.gan.real_images.folder={folder}", f"distill.gan.real_images.cache_dir={bank}"]
    reference, out = tmp_path / "one_process", tmp_path / "fsdp"
    train_here(command(reference, *extra, "train.batch_size=4"))
    two = launch(command(out, *extra), tmp_path)
    assert two.returncode == 0, two.log[-4000:]
    networks = method_networks(compose_train(*extra))
    assert_in_sync(out, 2, networks)
    ours, theirs = checkpoint_files(out, 2), checkpoint_files(reference, 2)
    assert any(k.startswith("gan_head.") for k in ours["fake_score.safetensors"])
    # DMD2 has more paths on which float32 rounding differs (the chain's sub-batches, the GAN terms), so a weight whose
    # gradient is rounding noise moves by up to one Adam step (measured 0.5·lr); a real mismatch (other real images,
    # other noise per process) would move most weights by ~lr.
    lr = learning_rate(compose_train(*extra))
    for name in networks:
        diff = differences(ours[f"{name}.safetensors"], theirs[f"{name}.safetensors"])
        assert diff.max() <= lr and diff.quantile(0.99) <= 0.02 * lr, (name, diff.max().item())


@pytest.mark.parametrize("method", ["finetune"])  # LoRA: lcm_lora above
def test_fsdp2_fine_tunes_as_one_process_does(method, tiny_folder, tiny_train_args, compose_train, tmp_path):
    """Fine-tuning sharded, on a captioned image folder (encoded once beforehand: the launched runs load no T5):
    the same weights as one process with the global batch, and an export stock diffusers loads."""
    from hydra.utils import instantiate

    from pixsig_distill.real_images import encode_image_folder
    from test_finetune import write_folder

    folder, bank = write_folder(tmp_path / "images", n=8), tmp_path / "bank"
    encode_image_folder(instantiate(compose_train().model), folder, cache_dir=bank)

    def command(out_dir, *extra):
        return tiny_train_args(out_dir) + ["model.load_text_encoder=false", "data=images", f"data.folder={folder}",
                                           f"data.cache_dir={bank}", "train.deterministic=true", f"distill={method}",
                                           "train.max_steps=2", f"hydra.run.dir={tmp_path / 'hydra'}", *extra]

    composed = compose_train(f"distill={method}")
    networks, lr = method_networks(composed), learning_rate(composed)
    reference, out = tmp_path / "one_process", tmp_path / "fsdp"
    train_here(command(reference, "train.batch_size=4"))
    two = launch(command(out), tmp_path)
    assert two.returncode == 0, two.log[-4000:]
    assert_in_sync(out, 2, networks)
    ours, theirs = checkpoint_files(out, 2), checkpoint_files(reference, 2)
    for name in networks:
        assert_weights_close(ours[f"{name}.safetensors"], theirs[f"{name}.safetensors"], lr, name)
    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer")
