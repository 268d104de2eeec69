"""Bad input that reaches a run (tests/test_bad_input.py has the one-line errors of the command line): a resume with
other settings, a random-weight stand-in, a plan of what training refuses, records that would claim what did not
happen, and hints that would send the user the wrong way. Each case is a tiny run or a direct call: seconds."""

import json
import re
import shutil

import pytest

from pixsig_distill.errors import UserError


def test_resume_refuses_interpolated_values_and_added_groups(compose_train, tiny_folder, tmp_path):
    """The settings whose raw value is an interpolation (`distill.timesteps: ["${t_bar}"]`, the toy model's
    `pretrained: ${toy_asset:teacher}`) and a group only one side has (`distill.rewards: {}` → a reward) are
    settings of the run like any other: resuming a finished run with them changed would export its weights under a
    card that claims a reward, two steps or another teacher."""
    from pixsig_distill.config import fingerprint_changes
    from pixsig_distill.train import run

    run(compose_train("train.max_steps=2"))
    card = (tmp_path / "run" / "export" / "pixsig_student.json").read_text()
    other_teacher = shutil.copytree(tiny_folder, tmp_path / "other_teacher")
    for change, named in [("+distill/rewards=toy_clip", "distill.rewards: {} → {toy_clip}"),
                          ("distill.timesteps=[400,200]", "distill.timesteps: [400] → [400, 200]"),
                          (f"model.pretrained={other_teacher}", f"model.pretrained: {tiny_folder} → {other_teacher}")]:
        with pytest.raises(UserError, match=re.escape(named) + ".*resume=never") as err:
            run(compose_train("train.max_steps=2", change))
        assert "\n" not in str(err.value)
    assert (tmp_path / "run" / "export" / "pixsig_student.json").read_text() == card  # nothing re-exported
    # a setting only a newer version records, under a group both record, is no change
    assert fingerprint_changes({"distill.ema_decay": 0.99}, {"distill.ema_decay": 0.99, "distill.new": 1}) == []


def test_the_toy_teacher_is_the_same_run_wherever_the_package_lies():
    from pixsig_distill.config import PACKAGE_DIR, _compose, run_fingerprint

    fingerprint = run_fingerprint(_compose("train", ["out_dir=/tmp/x"]))
    assert fingerprint["model.pretrained"] == "pixsig_distill/toy/weights/teacher"
    assert str(PACKAGE_DIR) not in json.dumps(fingerprint)
    assert "model.device" not in fingerprint and "distill.gradient_checkpointing" not in fingerprint  # follow resumables


SMALL_STAND_IN = ["+distill/rewards=clip_stand_in", "distill.rewards.clip_stand_in.reward.layers=1",
                  "+distill.rewards.clip_stand_in.reward.width=32", "+distill.rewards.clip_stand_in.reward.heads=2",
                  "+distill.rewards.clip_stand_in.reward.image_size=28", "+distill.rewards.clip_stand_in.reward.embed_dim=16"]


def test_a_random_weight_reward_trains_only_in_a_sizing_run_whose_card_claims_no_reward(compose_train, tmp_path):
    from pixsig_distill.train import run

    with pytest.raises(UserError, match="CLIPRewardStandIn, a stand-in with random weights.*sizing_run=true"):
        run(compose_train(*SMALL_STAND_IN, "train.max_steps=1"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    summary = run(compose_train(*SMALL_STAND_IN, "sizing_run=true", "train.max_steps=1", "train.log_every=1"))
    assert summary["finished"] and "reward_clip_stand_in" in summary["last_logs"]  # it did train with it
    export = tmp_path / "run" / "export"
    card, readme = json.loads((export / "pixsig_student.json").read_text()), (export / "README.md").read_text()
    assert not [key for key in card if key.startswith("reward")], card
    assert "sizing run: yes" in readme and "CLIPRewardStandIn" in readme and "reward_clip_stand_in" not in readme


def test_the_planner_refuses_what_training_refuses_under_its_engine(tiny_folder):
    """DMD2's GAN loss back-propagates through another ZeRO-3 engine: training refuses it under ZeRO-3, and so does
    the plan of it, before simulating anything (the same method check)."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.plan import plan

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("plan", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                         "model.max_sequence_length=16", "model.resolution=16", "distill=dmd2",
                                         "plan.engine=zero3", "plan.gpus=2"])
    with pytest.raises(UserError, match="distill.gan under DeepSpeed ZeRO-3.*plan.engine=zero2 or fsdp2"):
        plan(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["experiment=pixart_sigma_1024_dmd", "train.grad_accum=1"], "adamw_8bit under DeepSpeed"),  # its 8-bit AdamW
    (["train.grad_accum=2"], "train.grad_accum=2 under DeepSpeed")])
def test_the_planner_refuses_deepspeeds_rules_as_training_does(overrides, message):
    from pixsig_distill.config import _compose
    from pixsig_distill.plan import plan, refused_under

    cfg = _compose("plan", [*overrides, "plan.engine=zero3", "plan.gpus=8"])
    with pytest.raises(UserError, match=message):
        plan(cfg)
    # plan.fit never offers what training would refuse under the engine
    assert refused_under(cfg, {}, "zero2") and not refused_under(cfg, {}, "fsdp2")


def test_a_merged_lora_lists_no_lora_folder(tiny_folder, tmp_path):
    from hydra import compose, initialize_config_module

    from pixsig_distill.lora import add_lora, save_lora
    from pixsig_distill.merge_lora import merge_lora
    from pixsig_distill.teacher import load_pipeline

    adapter = save_lora(add_lora(load_pipeline(str(tiny_folder)).transformer, rank=2), tmp_path / "export" / "lora",
                        {"method": "lcm_lora", "num_inference_steps": 4, "original_inference_steps": 50,
                         "scheduler": "LCMScheduler", "guidance_scale": 1.0, "eval_steps": [1, 2, 4],
                         "lora": "lora"})  # as lcm_lora exports it
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("merge_lora", overrides=[f"base={tiny_folder}", f"lora={adapter}", f"out_dir={tmp_path / 'm'}"])
    merged = merge_lora(cfg)
    card = json.loads((merged / "pixsig_student.json").read_text())
    assert not (merged / "lora").exists() and "lora" not in card and card["merged_lora"] == str(adapter)
    assert "lora/" not in (merged / "README.md").read_text()


@pytest.mark.parametrize("guidance,sentence", [(4.5, "guidance scale: 4.5 (classifier-free guidance"),
                                               (1.0, "guidance scale: 1.0 (no classifier-free guidance")])
def test_the_card_says_whether_the_student_samples_with_guidance(guidance, sentence, tmp_path):
    from pixsig_distill.model_card import write_model_card

    (tmp_path / "pixsig_student.json").write_text(json.dumps(
        {"method": "finetune", "num_inference_steps": 20, "guidance_scale": guidance, "scheduler": "X"}))
    assert sentence in write_model_card(tmp_path).read_text()


def test_non_finite_gradients_blame_what_the_run_set():
    """A 1e30 reward weight overflows float32's gradients: the hint names it, and fp16 only in an fp16 run."""
    from pixsig_distill.config_checks import non_finite_remedy

    huge = {"distill.rewards.toy_clip.weight": 1e30, "distill.regression.weight": 0.25}
    assert non_finite_remedy(huge, "no").startswith("distill.rewards.toy_clip.weight=1e+30 scales its gradients")
    assert "fp16" not in non_finite_remedy({"distill.regression.weight": 0.25}, "no")
    assert "bf16 instead of fp16" in non_finite_remedy({}, "fp16")


def test_a_huge_reward_weight_stops_the_run_naming_the_weight(compose_train):
    from pixsig_distill.train import run

    with pytest.raises(UserError, match=r"non-finite .*\(distill.rewards.clip_stand_in.weight=1e\+30 scales") as err:
        run(compose_train(*SMALL_STAND_IN, "sizing_run=true", "distill.rewards.clip_stand_in.weight=1e30",
                          "train.max_steps=2", "train.log_every=2"))
    assert "learning rate" not in str(err.value) and "fp16" not in str(err.value)


def test_a_tiny_decoder_with_no_loss_is_refused_naming_its_weights(compose_train):
    from pixsig_distill.train import run

    with pytest.raises(UserError, match="pixel_weight, lpips_weight and adversarial_weight are all 0.*"
                                        "distill.pixel_weight=1"):
        run(compose_train("distill=tiny_decoder", "distill.pixel_weight=0"))


def test_a_decoder_export_given_as_a_student_is_named_as_one(compose_generate, tmp_path):
    from pixsig_distill.generate import generate

    decoder = tmp_path / "decoder_run" / "export"
    decoder.mkdir(parents=True)
    (decoder / "pixsig_decoder.json").write_text(json.dumps({"method": "tiny_decoder"}))
    with pytest.raises(UserError, match=f"'{decoder}' is a tiny decoder export .*vae={decoder}"):
        generate(compose_generate("prompt='a red circle'", f"student={decoder}"))
