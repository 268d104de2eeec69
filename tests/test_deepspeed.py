"""DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes (gloo) under `accelerate launch`, as docs/scaling.md runs
them on GPUs (the shipped `cpu_deepspeed_zero{2,3}_2proc.yaml`).

DMD is the hard case: two trained networks, each its own engine. Two claims, as tests/test_fsdp.py makes them for
FSDP2: two processes × batch b end with the weights AND the optimizer moments of one process × batch 2b (ZeRO-2 and
ZeRO-3), and a killed run resumes with its optimizer state (ZeRO-2 here; ZeRO-3 in the bf16 test). tests/test_deepspeed_methods.py runs the other methods and bf16.
"""

import json
import shutil

import pytest

from methods import learning_rate, networks
from pixsig_distill.checkpoint import list_checkpoints
from test_fsdp import ROOT, assert_same_training_state, assert_weights_close, launch, train_here
from test_multiprocess import assert_in_sync, make_text_cache, scale_out_command

pytest.importorskip("deepspeed")

ZERO_CONFIGS = {stage: ROOT / "pixsig_distill" / "conf" / "accelerate" / f"cpu_deepspeed_{stage}_2proc.yaml"
                for stage in ("zero2", "zero3")}


@pytest.fixture(scope="module")
def command(tiny_folder, tmp_path_factory):
    from conftest import tiny_train_overrides

    root = tmp_path_factory.mktemp("deepspeed")
    cache = make_text_cache(tiny_folder, root / "cache")
    return scale_out_command(lambda out_dir: tiny_train_overrides(tiny_folder, out_dir), cache, root)


@pytest.fixture(scope="module")
def dmd_reference(command, tmp_path_factory):
    """One process, the global batch of 4 at once: where both ZeRO stages must end."""
    reference = tmp_path_factory.mktemp("one_process") / "run"
    train_here(command(reference, "train.batch_size=4"))
    return reference


@pytest.mark.parametrize("stage, killed", [("zero2", True), ("zero3", False)])  # ZeRO-3 resumes in the bf16 test
def test_zero_dmd_matches_one_process_and_keeps_its_optimizer_state(stage, killed, command, dmd_reference,
                                                                    compose_train, tmp_path):
    names, lr = networks(compose_train()), learning_rate(compose_train())  # DMD's (tests/methods.py)
    out = tmp_path / stage
    if killed:  # both processes killed (SIGKILL) right after step 3, before its checkpoint
        crashed = launch(command(out), tmp_path, config=ZERO_CONFIGS[stage], PIXSIG_FAULT_AFTER="step:3")
        assert crashed.returncode != 0, crashed.log[-4000:]
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
        state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
        assert state["optimizer_states"] is True
        assert_in_sync(out, 2, names)  # both processes gathered the same full weights, and rank 0 wrote them

    run = launch(command(out), tmp_path, config=ZERO_CONFIGS[stage])
    assert run.returncode == 0, run.log[-4000:]
    if killed:
        assert "(step 2)" in run.log and "start afresh" not in run.log
    assert_in_sync(out, 4, names)

    # Weights and both engines' AdamW moments equal the one-process run's (moments restarted at the resume would
    # move every weight by ~lr in the next steps).
    files = assert_same_training_state(out, dmd_reference, 4, lr)
    assert {"optimizer-generator.safetensors", "optimizer-fake_score.safetensors"} <= files

    from diffusers import PixArtTransformer2DModel

    exported = PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer").state_dict()
    reference = PixArtTransformer2DModel.from_pretrained(dmd_reference / "export" / "transformer").state_dict()
    assert_weights_close(exported, reference, lr, "export")

    # The gathered states resume on another process count: this run's step 2 on one process with the global batch
    # (here, in this process) ends at the one-process run's step 4, moments included.
    single = tmp_path / f"{stage}_on_one_process"
    shutil.copytree(out / "checkpoints" / "step-0000002", single / "checkpoints" / "step-0000002")
    train_here(command(single, "train.batch_size=4"))
    assert_same_training_state(single, dmd_reference, 4, lr)


def test_an_optimizer_without_adams_moments_is_refused_in_one_line():
    """Checkpoints gather AdamW's moments from ZeRO's partitions: another optimizer stops before any engine is built."""
    import torch
    from accelerate.utils import DistributedType

    from pixsig_distill import deepspeed_engines
    from pixsig_distill.errors import UserError

    accelerator = type("Launch", (), {"distributed_type": DistributedType.DEEPSPEED})()
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="SGD under DeepSpeed.*torch.optim.AdamW"):
        deepspeed_engines.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0)
