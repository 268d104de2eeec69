"""The memory and FLOP planner: fake tensors, no weights, the same config as `train`."""

import launching
import pytest
import torch

from pixsig_distill.errors import UserError
from pixsig_distill.fake_step import simulate_step
from pixsig_distill.plan import plan
from pixsig_distill.threads import share_of_cores


@pytest.fixture
def compose_plan(tiny_folder):
    from hydra import compose, initialize_config_module

    def _compose(*overrides):
        base = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                "model.max_sequence_length=16", "model.resolution=16", "train.batch_size=2", "device=cpu",
                "eval=none"]
        if not any(o.startswith("distill=") for o in overrides):
            base.append("distill.fake_updates_per_step=1")  # DMD: one fake-score update is enough to plan a step
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("plan", overrides=base + list(overrides))
    return _compose


def _real_tracked_peak(cfg):
    """The same step on real tensors, under the same tracker: the planner must agree with it."""
    from accelerate import Accelerator

    from pixsig_distill.config import build
    from pixsig_distill.fake_step import _memory_tracker

    teacher = build(cfg.model)
    method = build(cfg.distill, teacher=teacher)
    method.prepare(Accelerator(cpu=True))
    n = cfg.train.batch_size
    batch = {"embeds": torch.randn(n, 16, 32), "mask": torch.ones(n, 16, dtype=torch.long),
             "latents": torch.randn(teacher.latent_shape(n)), "prompt": ["p"] * n}
    null = torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.long)
    teacher.set_null_embedding(*null)
    modules = [teacher.transformer, teacher.vae, teacher.pipe.text_encoder, *method.models.values(),
               *method.checkpoint_modules().values()]
    held = [t for m in modules for k, v in vars(m).items() if isinstance(v, dict) and not k.startswith("_")
            for t in v.values() if isinstance(t, torch.Tensor)]
    tracker = _memory_tracker()
    tracker.track_external(*modules, *method.optimizers.values(), *held, batch["embeds"], batch["latents"],
                           batch["mask"], *null)
    with tracker:
        for step in range(2):
            method.train_step(batch, torch.Generator().manual_seed(step))
    peak = tracker.get_tracker_snapshot("peak")
    return peak[next(iter(peak))]["Total"]


@pytest.mark.parametrize("overrides", [["train.gradient_checkpointing=true"], ["distill=lcm"],
                                       ["distill.fake_score.lora_rank=4", "distill.generator.lora_rank=4"],
                                       ["distill=dmd2", "distill.fake_updates_per_step=1", "distill.gan.real_images.n=8"]],
                         ids=["dmd_checkpointing", "lcm", "dmd_lora", "dmd2_gan"])
def test_fake_step_predicts_the_real_steps_peak(overrides, compose_plan):
    cfg = compose_plan(*overrides)
    predicted = simulate_step(cfg).peak
    assert abs(predicted / _real_tracked_peak(cfg) - 1) < 0.05


def test_extrapolation_from_two_depths_equals_simulating_every_layer(compose_plan, tmp_path):
    from pixsig_distill.fake_step import predict_step
    from pixsig_distill.testing import tiny_pipeline

    folder = tmp_path / "four_layers"
    tiny_pipeline(num_layers=4).save_pretrained(folder, safe_serialization=True)
    cfg = compose_plan(f"model.pretrained={folder}")
    exact, layers = predict_step(cfg, exact=True)
    extrapolated, _ = predict_step(cfg, depths=(1, 2))
    assert layers == 4
    assert abs(extrapolated.peak / exact.peak - 1) < 0.02 and abs(extrapolated.flops / exact.flops - 1) < 0.02


def test_memory_options_change_the_prediction_the_right_way(compose_plan):
    full = simulate_step(compose_plan())
    lora = simulate_step(compose_plan("distill.fake_score.lora_rank=4"))
    assert lora.params < full.params and lora.optimizer < full.optimizer
    eight_bit = simulate_step(compose_plan("distill.generator_optimizer._target_=pixsig_distill.optim.adamw_8bit",
                                           "distill.fake_optimizer._target_=pixsig_distill.optim.adamw_8bit"))
    assert 0.2 < eight_bit.optimizer / full.optimizer < 0.3  # 2 bytes of state per parameter instead of 8
    ema_on_cpu = simulate_step(compose_plan("distill.ema_device=cpu"))
    assert ema_on_cpu.other < full.other and ema_on_cpu.peak < full.peak


def test_plan_report_says_it_is_a_prediction_and_uses_the_real_architecture(compose_plan, capsys):
    report = plan(compose_plan("model.pretrained=PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "model.resolution=512",
                               "model.max_sequence_length=300", "model.load_text_encoder=false",
                               "train.batch_size=1", "plan.gpu=h100"))
    out = capsys.readouterr().out
    assert out.startswith("PREDICTED") and report["prediction"] and report["layers"] == 28
    # Three float32 networks of 611M parameters (generator, fake score, EMA) + the teacher: > 8 GiB of weights.
    assert 8 * 2**30 < report["step"]["params"] + report["step"]["other"] < 12 * 2**30
    assert report["gpu"]["latency_teacher_s"] > report["gpu"]["latency_1_step_s"] > 0


def test_tiny_decoder_and_trimmed_prompts_shrink_their_parts_of_the_predicted_latency():
    """Σ-512 by shape: the tiny decoder's part is far below the VAE's and 32 prompt tokens shrink T5's part (down to
    reading its weights) and, a little, the transformer's cross-attention; the config's plan.vae/prompt_tokens count."""
    from hydra import compose, initialize_config_module

    from pixsig_distill.plan import GPUS
    from pixsig_distill.plan_latency import format_generation, generation_report

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("plan", overrides=["model=pixart_sigma_512", "eval=none", "plan.gpu=h100",
                                         "model.pretrained=PixArt-alpha/PixArt-Sigma-XL-2-512-MS"])
    g = generation_report(cfg, GPUS["h100"])
    full, lean = g["latency_1_step_parts_s"], g["lean_1_step"]["latency_1_step_parts_s"]
    assert g["decoder"] == "full" and g["prompt_tokens"] is None and g["padded_tokens"] == 300
    assert g["latency_1_step_s"] == pytest.approx(sum(full.values()))  # the old key: the sum of its parts
    assert lean["vae"] < full["vae"] / 5 and lean["text_encoder"] < full["text_encoder"]
    assert lean["transformer"] < full["transformer"] and g["lean_1_step"]["prompt_tokens"] == 32
    assert g["lean_1_step"]["parts"]["vae"]["flops"] < g["parts"]["vae"]["flops"] / 10
    assert "text_encoder" in g["lean_1_step"]["memory_bound"]  # T5 over 32 tokens: its 9.5 GB of weights
    lines = format_generation(g)
    assert "roofline PREDICTION" in lines[0] and "T5 over 300 padded tokens" in lines[0]
    assert any("with the tiny decoder and 32-token prompts" in line for line in lines)
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("plan", overrides=["model=pixart_sigma_512", "eval=none", "plan.vae=tiny",
                                         "plan.prompt_tokens=32",
                                         "model.pretrained=PixArt-alpha/PixArt-Sigma-XL-2-512-MS"])
    configured = generation_report(cfg, GPUS["h100"])
    assert "lean_1_step" not in configured and configured["decoder"] == "tiny"
    assert configured["latency_1_step_s"] == pytest.approx(g["lean_1_step"]["latency_1_step_s"])


@pytest.mark.parametrize("override,message", [
    ("plan.vae=small", "plan.vae='small'; use full"), ("plan.prompt_tokens=0", "plan.prompt_tokens=0; give"),
    ("plan.prompt_tokens=many", "plan.prompt_tokens='many'; give"), ("plan.prompt_tokens=true", "=True; give"),
    ("plan.prompt_tokens=17", "more than this model's max_sequence_length=16")])
def test_bad_generation_options_are_one_line(override, message, compose_plan):
    with pytest.raises(UserError, match=message) as raised:
        plan(compose_plan(override, "plan.gpu=h100"))
    assert "\n" not in str(raised.value)


def test_plan_cli_bad_gpu_is_one_line(tmp_path):
    done = launching.python_m("pixsig_distill.plan", "plan.gpu=tpu", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: plan.gpu='tpu'; use one of h100, h200, a100, l40s, 4090 (or null for memory only)"]


def test_eight_bit_adam_without_cuda_is_one_line():
    from pixsig_distill.optim import adamw_8bit

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="runs on CUDA GPUs only"):
        adamw_8bit([torch.nn.Parameter(torch.zeros(2))])


def test_threads_share_the_cores():
    assert share_of_cores(2, 1, 0.0) == 2          # alone: every core
    assert share_of_cores(2, 1, 1.0) == 1          # another job keeps one core busy
    assert share_of_cores(2, 1, 3.0) == 1          # never fewer than one
    assert share_of_cores(16, 4, 0.0) == 4         # a launch of 4 processes


def test_dmd2_plans_with_a_folder_it_never_reads_and_names_what_it_leaves_out(compose_plan, capsys):
    """DMD2's real images are shapes to the planner (the folder need not exist); the few-step chain, which branches
    on its draws, is planned as one step and said so."""
    one_update = "distill.fake_updates_per_step=1"  # for time: each further fake-score update repeats the first
    one = plan(compose_plan("distill=dmd2", "distill/gan/real_images=folder", "distill.gan.real_images.folder=/nowhere",
                            one_update))
    four = plan(compose_plan("distill=dmd2", "distill.timesteps=[999,749,499,249]", one_update))
    assert not one["notes"] and "4-step generator's chain (backward simulation) is not simulated" in four["notes"][0]
    dmd = plan(compose_plan(one_update))
    # the GAN head's parameters and its real-image forwards cost more than DMD's step at the same settings
    assert one["step"]["params"] > dmd["step"]["params"] and one["step"]["flops"] > dmd["step"]["flops"]


def test_a_reward_model_is_planned_with_its_weights_and_its_pass(compose_plan):
    """Reward-guided DMD: the planner counts the reward model a term holds (its frozen weights) and the decode and
    reward forward/backward in the generator's update."""
    from pixsig_distill.methods.rewards import CLIPRewardStandIn

    small = ["distill.rewards.clip_stand_in.reward.layers=2", "+distill.rewards.clip_stand_in.reward.width=64",
             "+distill.rewards.clip_stand_in.reward.heads=2", "+distill.rewards.clip_stand_in.reward.image_size=28"]
    plain = simulate_step(compose_plan())
    rewarded = simulate_step(compose_plan("+distill/rewards=clip_stand_in", *small))
    reward_bytes = 4 * sum(p.numel() for p in CLIPRewardStandIn(64, 2, 2, 14, 28).parameters())
    assert rewarded.params - plain.params == pytest.approx(reward_bytes, rel=0.01)
    assert rewarded.flops > plain.flops and rewarded.peak > plain.peak


def test_the_real_reward_models_are_planned_at_their_real_size(compose_plan):
    """hpsv2, pickscore and imagereward: a plan builds each at its published size on the meta device (their paths
    stay unset, no file is read) and notes it. (That each runs on fake tensors: tests/test_reward_models.py.)"""
    from pixsig_distill.config import build
    from pixsig_distill.plan_config import plan_notes, plannable

    cfg = compose_plan("+distill/rewards=[hpsv2,pickscore,imagereward]")
    planned = {name: build(node.reward) for name, node in plannable(cfg).distill.rewards.items()}
    assert {name: sum(p.numel() for p in reward.parameters()) for name, reward in planned.items()} == {
        "hpsv2": 986_109_441, "pickscore": 986_109_441, "imagereward": 446_206_689}  # CLIP ViT-H-14; BLIP ViT-L + BERT
    assert all(p.device.type == "meta" for reward in planned.values() for p in reward.parameters())
    assert sum("planned at its real size" in note for note in plan_notes(cfg)) == 3


def test_the_reward_recipes_plan_at_real_size():
    """experiment=pixart_sigma_512_dmd_reward (2 steps, the HPSv2-sized stand-in) plans without any folder."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("plan", overrides=["experiment=pixart_sigma_512_dmd_reward", "plan.gpu=h100",
                                         "distill.rewards.clip_stand_in.reward.layers=4",
                                         "distill.fake_updates_per_step=1"])  # for time
    report = plan(cfg)
    assert report["gpu"]["name"] and report["step"]["params"] > 0
    assert any("2-step generator's chain" in note for note in report["notes"])


def test_sharding_engines_split_what_they_should(compose_plan, capsys):
    """On N devices: DDP adds gradient buckets; ZeRO-2 splits gradients and optimizer state and adds DeepSpeed's
    fp32 masters and gradients, split; FSDP2 also splits the prepared networks' parameters, less two gathered
    blocks; ZeRO-3 splits them too but under DeepSpeed's default limits keeps them gathered (2.3 times their bytes),
    under lower limits only what they let it hold; one device is the one-device plan. (Validated against 2-process CPU runs by scripts/validate_plan.py:
    docs/scaling.md.)"""
    from pixsig_distill.sharding import per_device

    report = plan(compose_plan("plan.gpus=4", "plan.engine=fsdp2"))
    step, device = report["step"], report["per_device"]
    assert f"on 4 devices with fsdp2: {device['peak'] / 2**30:.2f} GiB per device" in capsys.readouterr().out
    assert device["sharded_networks"] == ["fake_score", "generator"] and 0 < device["unit_bytes"] < device["sharded_bytes"]
    sharded = {"bytes": device["sharded_bytes"], "unit": device["unit_bytes"], "networks": device["sharded_networks"],
               "trained_fp32": 0.8 * device["sharded_bytes"]}
    moment = {**step, "grads": 1e6, "optimizer": 2e6, "peak": step["peak"] + 3e6}  # a moment holding both
    peaks = {engine: per_device(moment, sharded, engine, 4, "no")["peak"]
             for engine in ("ddp", "zero2", "zero3", "fsdp2")}
    assert peaks["fsdp2"] < moment["peak"] < peaks["ddp"] == moment["peak"] + 1e6
    assert peaks["fsdp2"] == pytest.approx(moment["peak"] - 0.75 * (3e6 + sharded["bytes"]) + 2 * sharded["unit"])
    masters = 2 * sharded["trained_fp32"] / 4  # fp32 master weights and gradients, split 4 ways
    assert peaks["zero2"] == pytest.approx(moment["peak"] - 0.75 * 3e6 + masters)
    assert peaks["zero3"] == pytest.approx(peaks["zero2"] - 0.75 * sharded["bytes"] + 2.3 * sharded["bytes"])
    assert per_device(moment, sharded, "zero3", 8, "bf16")["gathered"] == pytest.approx(1.15 * sharded["bytes"])
    # live-parameter limits below the networks' size: less gathered, and less than ZeRO-2 holds
    params = sharded["bytes"] / 4
    limits = {"stage3_max_live_parameters": 0.05 * params, "stage3_max_reuse_distance": 0.05 * params,
              "stage3_prefetch_bucket_size": 0.05 * params}
    lean = per_device(moment, sharded, "zero3", 4, "no", limits)
    assert lean["gathered"] == pytest.approx(2.3 * 0.1 * sharded["bytes"]) and lean["peak"] < peaks["zero2"]
    for engine in ("zero2", "zero3", "fsdp2"):
        assert per_device(moment, sharded, engine, 1, "no")["peak"] == moment["peak"]
        assert per_device(moment, sharded, engine, 8, "no")["peak"] < peaks[engine]  # more devices, less on each
    assert device["peak"] < step["peak"]  # the plan: sharding the tiny DMD's two networks over 4 devices pays


def test_zero3_is_planned_with_its_configs_limits_and_says_when_it_saves_nothing(compose_plan, tmp_path):
    """The tiny networks are far inside the shipped limits (deepspeed_zero3.json): ZeRO-3 holds them gathered and
    the plan says it saves nothing over ZeRO-2; a DeepSpeed JSON with limits below them plans less than ZeRO-2."""
    import json

    shipped = plan(compose_plan("plan.gpus=2", "plan.engine=zero3"))
    assert any("no less than ZeRO-2" in note and "stage3_max_live_parameters" in note for note in shipped["notes"])
    small = tmp_path / "zero3.json"
    small.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 100,
                                                       "stage3_prefetch_bucket_size": 100}}))
    lean = plan(compose_plan("plan.gpus=2", "plan.engine=zero3", f"plan.deepspeed_config={small}"))
    assert lean["per_device"]["peak"] < lean["per_device"]["zero2_peak"] < shipped["per_device"]["peak"]
    assert not any("no less than ZeRO-2" in note for note in lean["notes"])
    with pytest.raises(UserError, match="plan.deepspeed_config=.* is not a readable DeepSpeed JSON"):
        plan(compose_plan("plan.gpus=2", "plan.engine=zero3", f"plan.deepspeed_config={tmp_path / 'none.json'}"))


@pytest.mark.parametrize("override,message", [("plan.gpus=0", "plan.gpus=0"), ("plan.engine=zero4", "one of ddp")])
def test_bad_sharding_options_are_one_line(override, message, compose_plan):
    with pytest.raises(UserError, match=message):
        plan(compose_plan(override))


def test_fit_names_the_cheapest_savers_and_the_largest_batch_and_they_train(compose_plan, compose_train, monkeypatch,
                                                                             capsys, tmp_path):
    """plan.fit on a device a little too small for the step as configured: savers are added cheapest first until
    batch 1 fits, the largest batch that fits is found, and the printed overrides train."""
    import pixsig_distill.plan as planner
    from pixsig_distill.train import run

    as_is = plan(compose_plan("train.batch_size=1"))["per_device"]["peak"]
    small = planner.GPU("a small test device", 0.999 * as_is / planner.FIT_SHARE / 2**30, 1e12, 1e11)
    monkeypatch.setitem(planner.GPUS, "small", small)
    advice = plan(compose_plan("plan.fit=small"))["fit"]
    assert advice["fits"] and advice["savers"] and advice["peak"] <= advice["budget_bytes"]
    assert advice["savers"][0] in ("bf16 autocast", "gradient checkpointing (≈ +30 % step time)")
    assert "8-bit" not in " ".join(advice["savers"])  # cheaper ones were enough here
    pasted = advice["overrides"]
    assert pasted[-1] == f"train.batch_size={advice['batch_size']}" and advice["batch_size"] >= 1
    assert "paste: " + " ".join(pasted) in capsys.readouterr().out
    summary = run(compose_train(*pasted, "train.max_steps=2", out_dir=tmp_path / "fitted"))
    assert summary["finished"]
