"""Gradient accumulation: grad_accum=2 at batch b is the same update as grad_accum=1 at batch 2b, for every
method of the registry (tests/methods.py) and every network it checkpoints; and a network that stops training stops
the run."""

import pytest
from safetensors.torch import load_file

from methods import METHODS, cases, networks, optimizer_keys
from pixsig_distill.errors import UserError
from pixsig_distill.train import run



def sgd(cfg) -> list[str]:
    """Every optimizer of the method as SGD at lr 0.5, and any EMA at 0.5. SGD, not AdamW: Adam's update hardly
    depends on the gradient's scale, so half a batch would look right."""
    overrides = [o for key in optimizer_keys(cfg) for o in (f"distill.{key}._target_=torch.optim.SGD",
                                                              f"distill.{key}.lr=0.5")]
    return overrides + (["distill.ema_decay=0.5"] if cfg.distill.get("ema_decay") is not None else [])


def _weights(out, name):
    return load_file(str(out / "checkpoints" / "step-0000002" / f"{name}.safetensors"))


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", cases("grad_accum"))
def test_accumulating_two_micro_batches_equals_one_double_batch(method, compose_train, tiny_pipe, tmp_path):
    common = [*METHODS[method].overrides("grad_accum"), "train.deterministic=true", "train.max_steps=2",
              "train.ckpt_every=2", "train.log_every=1", "train.sample_every=100", "distill.grad_clip=null"]
    composed = compose_train(*common)
    common += sgd(composed)
    run(compose_train(*common, "train.batch_size=2", "train.grad_accum=2", out_dir=tmp_path / "accum"))
    run(compose_train(*common, "train.batch_size=4", "train.grad_accum=1", out_dir=tmp_path / "big"))
    run(compose_train(*common, "train.batch_size=2", "train.grad_accum=1", out_dir=tmp_path / "half"))
    teacher = tiny_pipe.transformer.state_dict()
    for name in networks(composed):
        accum, big, half = (_weights(tmp_path / run_name, name) for run_name in ("accum", "big", "half"))
        if any("lora_" in k for k in accum):  # adapters start at B = 0: how far B moved
            moved = max(v.abs().max().item() for k, v in accum.items() if "lora_B" in k)
        else:
            moved = _max_diff(accum, {k: teacher[k] for k in accum})
        assert moved > 1e-4, f"{method}: {name} did not train"
        # Same update as the double batch, to float precision; clearly not the update of half the batch.
        assert _max_diff(accum, big) < 1e-3 * moved, f"{method}: {name} differs from the double batch"
        assert _max_diff(half, big) > 1e-2 * moved, f"{method}: the test cannot tell half a batch from the whole"


def test_a_network_that_does_not_train_stops_the_run(compose_train, tmp_path):
    with pytest.raises(UserError, match="the weights of generator did not change in the logging interval that "
                                        "ended at step 2"):
        run(compose_train("distill.generator_optimizer.lr=0", "train.log_every=2"))


def test_reference_recipe_moves_its_generator_with_accumulation(compose_train, tiny_folder, tmp_path):
    """experiment=pixart_sigma_512_dmd (grad_accum 2, bf16, checkpointing, EMA 0.9999) on the tiny model: the
    generator and its export leave the teacher."""
    cfg = compose_train("distill.regression=null", "data=toy", "model.load_text_encoder=true",
                        "train.log_every=1", "train.sample_every=100",
                        "train.ckpt_every=2", "train.max_steps=2", "distill.generator_optimizer.lr=1e-3",
                        "distill.fake_optimizer.lr=1e-3", "experiment=pixart_sigma_512_dmd")
    assert cfg.train.grad_accum == 2
    run(cfg)
    generator = _weights(tmp_path / "run", "generator")
    teacher = load_file(str(tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert _max_diff(generator, teacher) > 1e-5
