"""The training methods the shared tests run, in one place.

Every shipped `conf/distill/<name>.yaml` has an entry here under its own name (tests/test_method_registry.py fails
otherwise). Each shared check (`CHECKS`) runs every entry unless the entry says why not (`skips`: which test covers
it instead, or why nothing does); `runs` holds a check's own options for an entry. A new method's entry runs every
check by default. Variants of a shipped method (a LoRA one, say) run only the checks their `runs` names.

Nothing here copies a method's facts: the names of the networks a check compares come from the method's
`checkpoint_modules()` (`networks`), the learning rate a tolerance is scaled by from its composed config
(`learning_rate`).

Overrides may name the test's data as `{folder}` (a captioned image folder), `{bank}` (its encoded cache) and
`{cache}` (a text cache of the training prompts); each test fills in its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKS = {
    "grad_accum": "tests/test_grad_accum.py: two micro-batches give the update of one double batch",
    "resume_after_kill": "tests/test_faults.py: killed mid-run and rerun, the uninterrupted run's checkpoint",
    "ddp": "tests/test_multiprocess.py: two DDP processes hold the same weights, and the checkpoint is theirs",
    "fsdp2": "tests/test_fsdp.py: FSDP2 on two processes matches one process and resumes with its moments",
    "deepspeed": "tests/test_deepspeed_methods.py: ZeRO on two processes matches one process",
    "real_width": "tests/test_real_width.py: trains at PixArt-Σ 512's widths, exports, stock diffusers samples it",
}

STEP2, TMP4 = "step-0000002", ".tmp-step-0000004"
IMAGES = ("data=images", "data.folder={folder}", "data.cache_dir={bank}")
GAN_IMAGES = ("distill/gan/real_images=folder", "distill.gan.real_images.folder={folder}",
              "distill.gan.real_images.cache_dir={bank}")


@dataclass(frozen=True)
class Case:
    distill: str                                        # conf/distill/<distill>.yaml
    fast: tuple[str, ...] = ()                          # what keeps a tiny run cheap, in every check
    data: tuple[str, ...] = ()                          # its training data, if not the prompts (e.g. IMAGES)
    runs: dict = field(default_factory=dict)            # check → options: overrides, and the check's own keys
    skips: dict = field(default_factory=dict)           # check → why it does not run here
    variant: bool = False                               # runs only the checks in `runs`

    def options(self, check: str) -> dict | None:
        """The options of `check` for this case, or None when it does not run it."""
        if check not in CHECKS:
            raise KeyError(f"unknown check {check!r}; the checks are {sorted(CHECKS)}")
        if check in self.skips or (self.variant and check not in self.runs):
            return None
        return {"overrides": (), **self.runs.get(check, {})}

    def _given(self, check: str | None) -> list[str]:
        own = self.options(check)["overrides"] if check is not None else ()
        return [f"distill={self.distill}", *self.data, *self.fast, *own]

    def overrides(self, check: str | None, **places) -> list[str]:
        """The `train` overrides of this case in `check`: the method, its data, its fast settings, the check's own
        (None: no check's), with the test's data folders filled in."""
        return [o.format(**places) for o in self._given(check)]

    def needs_images(self, check: str) -> bool:
        """Does this case read a captioned image folder in `check` (its data, or a GAN's real images)?"""
        return any("{folder}" in o or "{bank}" in o for o in self._given(check))


METHODS: dict[str, Case] = {
    "dmd": Case("dmd", runs={
        "grad_accum": {"overrides": ("distill.fake_updates_per_step=2",)},
        # killed while writing checkpoint 4 (its .tmp folder complete but for the rename), then killed again in the
        # first step after resuming from checkpoint 2, then finished by a command of its own
        "resume_after_kill": {"faults": [("checkpoint:2", [STEP2], [TMP4]), ("step:1", [STEP2], [TMP4])],
                              "last_in_subprocess": True},
        "fsdp2": {"resume_on_one_process": True},  # the gathered states resume on another process count
        "real_width": {"overrides": ("distill.fake_updates_per_step=1",), "real_canvas": True},
    }, skips={
        "ddp": "tests/test_multiprocess.py::test_two_processes_stay_in_sync_and_resume_after_a_crash",
        "deepspeed": "tests/test_deepspeed.py (ZeRO-2 killed and resumed, ZeRO-3)",
    }),
    "dmd_lora": Case("dmd", variant=True, runs={
        "grad_accum": {"overrides": ("distill.fake_updates_per_step=2", "distill.generator.lora_rank=4",
                                     "distill.fake_score.lora_rank=4")},
        "real_width": {"overrides": ("distill.fake_updates_per_step=1", "distill.fake_score.lora_rank=8",
                                     "distill.generator.lora_rank=8", "distill.ema_device=cpu")},
    }),
    "dmd2": Case("dmd2", fast=("distill.timesteps=[999,499]",), runs={
        # 4 steps with a LoRA fake score: backward simulation and the GAN terms split into micro-batches too
        "grad_accum": {"overrides": ("distill.fake_updates_per_step=2", "distill.timesteps=[999,749,499,249]",
                                     "distill.gan.real_images.n=16", "distill.fake_score.lora_rank=4",
                                     "distill.gan.generator_weight=0.5", "distill.gan.discriminator_weight=0.5")},
        # ZeRO-3 refuses the GAN; more paths where float32 sums differ (the chain's sub-batches, the GAN terms)
        "deepspeed": {"overrides": GAN_IMAGES, "stage": "zero2", "real_launcher": True, "loose_tolerance": True},
    }, skips={
        "resume_after_kill": "tests/test_dmd2.py::test_two_step_run_resumes_exactly (resumed from a checkpoint)",
        "ddp": "tests/test_multiprocess.py::test_dmd2_under_ddp_matches_one_process",
        "fsdp2": "tests/test_fsdp.py::test_fsdp2_runs_dmd2_as_one_process_does",
        "real_width": "tests/test_real_width.py::test_sigma_512_dmd2_with_an_image_folder_lora_fake_score_and_"
                      "checkpointing",
    }),
    "lcm": Case("lcm", fast=("distill.pair_steps=2",), runs={
        "resume_after_kill": {"faults": [("step:3", [STEP2], [])]},  # killed in step 3, after checkpoint 2
        "deepspeed": {"stage": "zero3"},
        "real_width": {"overrides": ("distill.pair_steps=1",), "decode_pixels": True},
    }, skips={
        "fsdp2": "tests/test_fsdp.py::test_fsdp2_runs_lcm_with_bf16_and_gradient_checkpointing",
    }),
    "lcm_lora": Case("lcm_lora", fast=("distill.pair_steps=2",), runs={
        "resume_after_kill": {"overrides": ("distill.lora_rank=4",),  # killed while writing checkpoint 4
                              "faults": [("checkpoint:2", [STEP2], [TMP4])]},
        "real_width": {"overrides": ("distill.pair_steps=1", "distill.lora_rank=8")},
    }, skips={
        "deepspeed": "tests/test_deepspeed_methods.py::test_zero3_bf16_checkpoints_keep_the_fp32_masters (killed, "
                     "resumed)",
    }),
    "scm": Case("scm", fast=("distill.pair_steps=2",), runs={
        "fsdp2": {"overrides": ("distill.jvp=exact",)},  # forward-mode AD through FSDP2's gathering hooks
        # ZeRO-3's parameter hooks have no forward-mode AD (the exact JVP is refused there in one line): the default
        # finite-difference tangent, from plain forwards
    }, skips={
        "ddp": "rcm's case (the same student under DDP); this one's FSDP2 case runs DDP's data path too",
        "real_width": "rcm's case (experiment=pixart_sigma_512_rcm: this student, its JVP and export, at real width)",
    }),
    # the DMD term switches on after a one-step warm-up: every check sees both phases (and resumes across the switch)
    "rcm": Case("rcm", fast=("distill.pair_steps=2", "distill.tangent_warmup_steps=1"), runs={
        "deepspeed": {"stage": "zero2", "overrides": ("distill.jvp=exact",)},  # the exact JVP where ZeRO-3 refuses it
        # its 512-px recipe (bf16, checkpointing, the 4-step chain, 4 fake-score updates) on prompts, a full export
        "real_width": {"overrides": ("experiment=pixart_sigma_512_rcm", "data=toy", "model.load_text_encoder=true",
                                     "distill.full_pipeline_export=true", "distill.pair_steps=1",
                                     "distill.tangent_warmup_steps=1")},
    }, skips={
        "fsdp2": "scm's case shards the same student (the exact JVP through FSDP2's hooks); dmd's the fake score",
    }),
    "finetune": Case("finetune", data=IMAGES, skips={
        "grad_accum": "not run (suite time): its micro-batches are sliced as the distillations' are",
        "resume_after_kill": "tests/test_finetune.py::test_finetune_resumes_exactly (resumed from a checkpoint)",
        "ddp": "tests/test_fsdp.py::test_fsdp2_fine_tunes_as_one_process_does (FSDP2 runs DDP's data path too)",
        "fsdp2": "tests/test_fsdp.py::test_fsdp2_fine_tunes_as_one_process_does",
        "deepspeed": "not run (suite time): finetune_lora runs its method under ZeRO-3",
        "real_width": "not run (suite time): its network and export are DMD's and LCM's (a teacher copy)",
    }),
    "finetune_lora": Case("finetune_lora", data=IMAGES, runs={"deepspeed": {"stage": "zero3"}}, skips={
        "grad_accum": "not run (suite time): its micro-batches are sliced as the distillations' are",
        "resume_after_kill": "tests/test_finetune.py::test_finetune_resumes_exactly (finetune, resumed from a "
                             "checkpoint)",
        "ddp": "not run (suite time): finetune under FSDP2 and this under ZeRO-3 cover its multi-process path",
        "fsdp2": "LoRA under FSDP2: lcm_lora's case",
        "real_width": "not run (suite time): LoRA at real width is lcm_lora's and dmd_lora's case",
    }),
    "tiny_decoder": Case("tiny_decoder", skips={
        "grad_accum": "not run (suite time): its micro-batches are sliced as the distillations' are",
        "resume_after_kill": "not run (suite time): its networks and optimizers go through the loop's checkpoints "
                             "like every method's",
        "ddp": "not run (suite time)",
        "fsdp2": "refused in one line (tests/test_end_to_end_speed.py::test_tiny_decoder_refuses_what_it_cannot_run_"
                 "in_one_line)",
        "deepspeed": "ZeRO-3 and its GAN under ZeRO-2 refused in one line (tests/test_end_to_end_speed.py); "
                     "ZeRO-2 without the GAN not run",
        "real_width": "tests/test_real_width.py::test_tiny_decoder_recipe_at_real_width",
    }),
}


def cases(check: str) -> list[str]:
    """The entries `check` runs, in registry order."""
    return [name for name, case in METHODS.items() if case.options(check) is not None]


# ---- facts read from the method itself --------------------------------------------------------------------

def networks(cfg) -> list[str]:
    """The networks a run of `cfg` checkpoints: its method's `checkpoint_modules()`, built as the planner builds
    it (weightless, from the config alone: no data is read)."""
    from pixsig_distill.config import build
    from pixsig_distill.fake_step import shape_only_teacher
    from pixsig_distill.plan_config import plannable

    cfg = plannable(cfg)
    teacher, _ = shape_only_teacher(cfg.model)
    return sorted(build(cfg.distill, teacher=teacher).checkpoint_modules())


def optimizer_keys(cfg) -> list[str]:
    """The `distill.*` keys of the optimizers a method is built with (config nodes with a `lr`)."""
    return [key for key, node in cfg.distill.items()
            if hasattr(node, "keys") and "_target_" in node and "lr" in node]


def learning_rate(cfg) -> float:
    """The largest learning rate of the method's optimizers: how far one step can move a weight."""
    return max(float(cfg.distill[key].lr) for key in optimizer_keys(cfg))


def image_folder(model_cfg, root) -> dict:
    """A captioned image folder and its encoded cache for the model of `model_cfg`, made before a launch (the
    launched runs load no T5): the `{folder}` and `{bank}` of the overrides."""
    from hydra.utils import instantiate

    from pixsig_distill.real_images import encode_image_folder
    from test_finetune import write_folder

    folder, bank = write_folder(root / "images", n=8), root / "bank"
    encode_image_folder(instantiate(model_cfg), folder, cache_dir=bank)
    return {"folder": folder, "bank": bank}
