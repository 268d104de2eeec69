"""Two training processes (DDP over gloo, on CPU) under `accelerate launch`, as docs/scaling.md runs them.

The command is the documented scale-out one at tiny size: cached T5 embeddings (data=cached,
model.load_text_encoder=false), launched with the shipped CPU config. `accelerate launch --cpu
--num_processes 2` would start a single process (accelerate's CPU launcher expects mpirun), hence the
config (torchrun launcher) plus device=cpu (gloo). Most launches fork their ranks from preloaded imports with the
environment `accelerate launch` gives them (tests/launching.py); the DMD2 test runs the real command.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import launching
from launching import ROOT, Launch
from methods import METHODS, cases, image_folder, learning_rate, networks
from pixsig_distill.checkpoint import list_checkpoints
from pixsig_distill.distributed import state_digest

CPU_CONFIG = ROOT / "pixsig_distill" / "conf" / "accelerate" / "cpu_2proc.yaml"


def make_text_cache(tiny_folder, out: Path) -> Path:
    from hydra import compose, initialize_config_module

    from pixsig_distill.cache_text import cache_text

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("cache_text", overrides=[
            "model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", "prompts=toy_train", f"out_dir={out}",
            "device=cpu"])
    return cache_text(cfg)


def launch(overrides: list[str], tmp_path: Path, real: bool = False, **env) -> Launch:
    return launching.launch(overrides, tmp_path, CPU_CONFIG, real=real, **env)


def rank_digests(out_dir: Path, step: int) -> list[dict]:
    files = sorted((out_dir / "rank_digests").glob(f"step-{step:07d}-rank-*.json"))
    return [json.loads(f.read_text()) for f in files]


def checkpoint_digests(out_dir: Path, step: int, names) -> dict:
    folder = out_dir / "checkpoints" / f"step-{step:07d}"
    return {name: state_digest(load_file(str(folder / f"{name}.safetensors"))) for name in names}


def assert_in_sync(out_dir: Path, step: int, names) -> None:
    """Both processes hold bit-identical weights, and the checkpoint rank 0 wrote is those weights."""
    ranks = rank_digests(out_dir, step)
    assert len(ranks) == 2, f"expected a digest from each of 2 processes at step {step}, got {len(ranks)}"
    assert set(ranks[0]) == set(names)
    assert ranks[0] == ranks[1] == checkpoint_digests(out_dir, step, names)


def scale_out_command(tiny_train_args, cache: Path, tmp_path: Path):
    def command(out_dir, *extra):  # the documented scale-out command, at tiny size
        return tiny_train_args(out_dir) + ["model.load_text_encoder=false", "data=cached", f"data.folder={cache}",
                                           "train.deterministic=true", f"hydra.run.dir={tmp_path / 'hydra'}", *extra]
    return command


def test_two_processes_stay_in_sync_and_resume_after_a_crash(tiny_folder, tiny_train_args, compose_train, tmp_path):
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    names, lr = networks(compose_train()), learning_rate(compose_train())  # DMD's (tests/methods.py)

    out = tmp_path / "run"
    overrides = command(out)

    # Both processes are killed (SIGKILL) right after step 3, before its checkpoint (tests/test_faults.py's hook).
    crashed = launch(overrides, tmp_path, PIXSIG_FAULT_AFTER="step:3")
    assert crashed.returncode != 0, crashed.log[-4000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    # The processes saw different batches and noise, yet after the all-reduced updates their weights agree.
    assert_in_sync(out, 2, names)

    # The same command again: both processes resume from step 2 and finish; no checkpoint step is lost.
    resumed = launch(overrides, tmp_path)
    log = resumed.log
    assert resumed.returncode == 0, log[-4000:]
    assert "resuming from" in log and "(step 2)" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 4 and summary["finished"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert_in_sync(out, 4, names)
    # Without T5 the previews come from the text cache.
    assert (out / "samples" / "step-0000004.png").is_file()
    assert (out / "export" / "pixsig_student.json").is_file()

    # And the crash cost nothing: the uninterrupted run of the global batch in one process (the step's draws are
    # made for the global batch, draws.py) ends with the same weights, up to the order of float32 sums.
    from test_fsdp import assert_weights_close, train_here

    straight_out = tmp_path / "straight"
    train_here(command(straight_out, "train.batch_size=4"))
    for name in names:
        a = load_file(str(out / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        b = load_file(str(straight_out / "checkpoints" / "step-0000004" / f"{name}.safetensors"))
        assert_weights_close(a, b, lr, name)


@pytest.mark.parametrize("method", cases("ddp"))
def test_every_method_stays_in_sync_under_ddp(method, tiny_folder, tiny_train_args, compose_train, tmp_path):
    """The registry's methods (tests/methods.py) under DDP, e.g. LCM (its EMA target gathered through
    distributed.full_parameters) and LCM-LoRA (adapters only): both processes hold the same weights of every
    network the method checkpoints."""
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    out = tmp_path / "run"
    case = METHODS[method]
    places = image_folder(compose_train().model, tmp_path) if case.needs_images("ddp") else {}
    overrides = case.overrides("ddp", **places)
    result = launch(command(out, *overrides, "train.max_steps=2"), tmp_path)
    assert result.returncode == 0, result.log[-4000:]
    assert_in_sync(out, 2, networks(compose_train(*overrides)))


def test_cpu_flag_alone_starts_one_process():
    """Why the test uses a config: `accelerate launch --cpu --num_processes 2` validates to the single-process
    launcher (documented in docs/scaling.md). Checked without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "-m", "pixsig_distill.train"])
    args, _, _ = _validate_launch_command(args)
    assert not args.multi_gpu and not args.use_fsdp and not args.use_deepspeed  # → simple_launcher: one process
    config = launch_command_parser().parse_args(["--config_file", str(CPU_CONFIG), "-m", "pixsig_distill.train"])
    config, _, _ = _validate_launch_command(config)
    assert config.multi_gpu and config.num_processes == 2  # → torchrun with 2 processes


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp2_shard_grad_op", "fsdp2_full_shard", "deepspeed_zero2",
                                  "deepspeed_zero3", "cpu_2proc", "cpu_fsdp2_2proc", "multinode"])
def test_shipped_launch_configs_parse(name):
    """Every shipped accelerate config is accepted by `accelerate launch` (the GPU ones cannot run here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "pixsig_distill" / "conf" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "pixsig_distill.train"])
    args, _, _ = _validate_launch_command(args)
    if "fsdp" in name:
        assert args.use_fsdp and str(args.fsdp_version) == "2" and args.num_processes == (2 if "cpu" in name else 8)
        assert str(args.fsdp_reshard_after_forward).lower() == ("false" if "grad_op" in name else "true")
        assert args.fsdp_transformer_layer_cls_to_wrap == "BasicTransformerBlock"
    if name == "multinode":  # the machine arguments come from the command line (scripts/slurm/train.sbatch)
        assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16 and args.machine_rank == 0
    if name == "deepspeed_zero2":
        assert args.use_deepspeed and args.zero_stage == 2 and args.mixed_precision == "bf16"
        assert args.gradient_accumulation_steps is None  # train.grad_accum decides
    if name == "deepspeed_zero3":  # its settings are a DeepSpeed JSON, with live-parameter limits
        import json

        zero = json.loads((ROOT / args.deepspeed_config_file).read_text())["zero_optimization"]
        assert args.use_deepspeed and zero["stage"] == 3 and zero["stage3_max_live_parameters"] < 1e9


def test_state_digest_sees_every_bit():
    a = {"w": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    b = {"w": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    assert state_digest(a) == state_digest(b)
    b["w"][1] = torch.finfo(torch.float32).tiny
    assert state_digest(a) != state_digest(b)


def test_dmd2_under_ddp_matches_one_process(tiny_folder, tiny_train_args, compose_train, tmp_path):
    """DMD2 under DDP: the fake score's update runs it on generated and real latents (the GAN's two sides) before
    one backward, and the generator's GAN term reads through it; both processes end with the same weights.
    (test_fsdp.py compares sharded DMD2 with one process.)"""
    from hydra.utils import instantiate

    from pixsig_distill.real_images import encode_image_folder
    from test_finetune import write_folder

    folder, bank = write_folder(tmp_path / "images", n=8), tmp_path / "bank"
    encode_image_folder(instantiate(compose_train().model), folder, cache_dir=bank)  # the launched runs load no T5
    command = scale_out_command(tiny_train_args, make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    extra = ["distill=dmd2", "distill.timesteps=[999,499]", "train.max_steps=2", "distill/gan/real_images=folder",
             f"distill.gan.real_images.folder={folder}", f"distill.gan.real_images.cache_dir={bank}"]
    result = launch(command(tmp_path / "ddp", *extra), tmp_path, real=True)  # the real launcher with this config
    assert result.returncode == 0, result.log[-4000:]
    assert_in_sync(tmp_path / "ddp", 2, networks(compose_train(*extra)))
    fake = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000002" / "fake_score.safetensors"))
    assert any(k.startswith("gan_head.") for k in fake)


@pytest.mark.parametrize("config, expected", [
    ("cpu_2proc", {}), ("cpu_fsdp2_2proc", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    ("cpu_deepspeed_zero2_2proc", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    ("cpu_deepspeed_zero3_2proc", {"ACCELERATE_USE_DEEPSPEED": "true",
                                   "ACCELERATE_DEEPSPEED_CONFIG_FILE": "pixsig_distill/conf/accelerate/deepspeed_zero3.json"})])
def test_forked_ranks_get_what_the_real_launcher_gives(config, expected):
    """tests/launching.py forks most two-process runs: each rank must get the launcher's engine settings for its
    config (else a "ZeRO-3" test would pass as plain DDP) and a rank of its own."""
    ranks = launching.rank_environments(ROOT / "pixsig_distill" / "conf" / "accelerate" / f"{config}.yaml")
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    for rank in ranks:
        assert {key: rank.get(key) for key in expected} == expected
        engines = {"ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"}
        assert not any(rank.get(key) == "true" for key in engines - set(expected)), rank
