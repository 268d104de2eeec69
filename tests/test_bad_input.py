"""Bad input at every entry point (train, generate, cache_text, make_pairs, merge_lora, evaluation.leaderboard):
one clear line, a non-zero exit, and nothing left behind that a later run would trust.

Most cases call the entry function in this process and expect a one-line `UserError` (which every `main` turns
into `error: ...` on stderr and exit code 2); config errors that Hydra itself reports go through the `main`
wrappers; a handful run as commands, each a process of its own (forked from preloaded imports,
tests/launching.py). Pickles offered as weights or checkpoints are refused without being
unpickled: `torch.load` and `pickle.load(s)` fail the test if called, and each pickle here would create a marker
file if it ever were unpickled. (Cases already covered elsewhere are not repeated: test_config.py,
test_generate.py, test_text_cache.py, test_teacher.py, test_lcm.py, test_evaluation.py.)
"""

import json
import pickle
import shutil
import sys
from pathlib import Path

import launching
import pytest
from hydra import compose, initialize_config_module

from pixsig_distill.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MAINS = {"train": "pixsig_distill.train", "generate": "pixsig_distill.generate",
         "cache_text": "pixsig_distill.cache_text", "make_pairs": "pixsig_distill.make_pairs",
         "merge_lora": "pixsig_distill.merge_lora", "leaderboard": "evaluation.leaderboard", "plan": "pixsig_distill.plan"}
TRUSTED_OUTPUT = ("*.safetensors", "*.png", "index.json", "leaderboard.json", "pixsig_student.json", "config.yaml",
                  "latency.json", "train_summary.json", "adapter_config.json")


class _Bomb:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _write_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"weight": _Bomb(marker)}))
    return path


class Files:
    """Broken models, prompt files, adapters and exports, made once for the module."""

    def __init__(self, root: Path, tiny_folder: Path):
        self.root, self.tiny = root, tiny_folder
        self.marker = root / "UNPICKLED"  # must never exist
        prompts = {"empty": b"", "binary": b"\x00\x01\x02\xff\xfe binary", "long_lines": b"x" * 10_000 + b"\n",
                   "non_utf8": "caf\u00e9 au lait\n".encode("latin-1")}
        self.prompt = {}
        for name, content in prompts.items():
            self.prompt[name] = root / f"prompts_{name}.txt"
            self.prompt[name].write_bytes(content)
        self.prompt["missing"] = root / "no_such_prompts.txt"
        self.prompt["directory"] = root
        self.good_prompts = root / "prompts.txt"
        self.good_prompts.write_text("a red circle\na blue square\n")

        self.model = {"missing": root / "no_such_model"}
        self.model["no_vae"] = self._copy("no_vae")
        shutil.rmtree(self.model["no_vae"] / "vae")
        self.model["truncated"] = self._copy("truncated")
        weights = next((self.model["truncated"] / "transformer").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
        self.model["pickled"] = self._pickled(self._copy("pickled"))

        # Student exports: full pipeline with pickled weights; transformer-only with pickled weights; a corrupt card.
        card = {"method": "dmd", "t_bar": 400, "num_inference_steps": 1, "timesteps": [400], "guidance_scale": 1.0,
                "scheduler": "DDPMScheduler"}
        self.student_full = self._pickled(self._copy("student_full"))
        (self.student_full / "pixsig_student.json").write_text(json.dumps({**card, "full_pipeline": True}))
        self.student_transformer = root / "student_transformer"
        shutil.copytree(tiny_folder / "transformer", self.student_transformer / "transformer")
        shutil.copytree(tiny_folder / "scheduler", self.student_transformer / "scheduler")
        self._pickled(self.student_transformer)
        (self.student_transformer / "pixsig_student.json").write_text(json.dumps({**card, "full_pipeline": False}))
        self.student_bad_card = root / "student_bad_card"
        self.student_bad_card.mkdir()
        (self.student_bad_card / "pixsig_student.json").write_text('{"method": "dmd", ')

        # Checkpoint folders offered to resume=.
        self.resume_pickles = root / "resume_pickles"
        for name in ("generator.pt", "optimizer.bin", "state.pkl"):
            _write_pickle(self.resume_pickles / name, self.marker)
        (self.resume_pickles / "state.json").write_text('{"step": 2}')
        self.resume_file = _write_pickle(root / "checkpoint.pt", self.marker)
        self.resume_empty = root / "resume_empty"
        self.resume_empty.mkdir()

        # LoRA adapters for merge_lora: a good one, and broken copies.
        from pixsig_distill.lora import add_lora, save_lora
        from pixsig_distill.teacher import load_pipeline

        transformer = load_pipeline(str(tiny_folder)).transformer
        self.lora = save_lora(add_lora(transformer, rank=2), root / "lora",
                              {"method": "lcm_lora", "num_inference_steps": 4, "original_inference_steps": 50})
        self.lora_bad = {}
        for name in ("pickled", "bad_card", "truncated"):
            folder = self.lora_bad[name] = root / f"lora_{name}"
            shutil.copytree(self.lora, folder)
        (self.lora_bad["pickled"] / "adapter_model.safetensors").unlink()
        _write_pickle(self.lora_bad["pickled"] / "adapter_model.bin", self.marker)
        (self.lora_bad["bad_card"] / "pixsig_lora.json").write_bytes(b"\xff\xfe{not json")
        weights = self.lora_bad["truncated"] / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])

    def _copy(self, name: str) -> Path:
        folder = self.root / f"model_{name}"
        shutil.copytree(self.tiny, folder)
        return folder

    def _pickled(self, folder: Path) -> Path:
        """Replace the transformer's safetensors weights by a pickle with the same role."""
        for weights in (folder / "transformer").glob("*.safetensors"):
            weights.unlink()
        _write_pickle(folder / "transformer" / "diffusion_pytorch_model.bin", self.marker)
        return folder


@pytest.fixture(scope="module")
def files(tiny_folder, tmp_path_factory):
    return Files(tmp_path_factory.mktemp("bad_input"), tiny_folder)


@pytest.fixture
def never_unpickle(monkeypatch, files):
    """Any call to torch.load / pickle.load(s) during the test fails it."""
    calls = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return fail

    import torch.serialization

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
    yield calls
    assert calls == [] and not files.marker.exists()


# ---- the entry points, in this process ---------------------------------------------------------------

TINY_MODEL = ["model=pixart_sigma_512", "model.torch_dtype=float32", "model.max_sequence_length=16",
              "model.resolution=16"]


@pytest.fixture
def base(files, tiny_train_args):
    return lambda entry, out: _base(entry, files, out, tiny_train_args)


def _base(entry: str, files: Files, out: Path, tiny_train_args) -> list[str]:
    """The overrides of a working command of `entry` on the tiny model, writing to `out`."""
    tiny = [*TINY_MODEL, f"model.pretrained={files.tiny}", "device=cpu", f"out_dir={out}"]
    if entry == "train":
        return tiny_train_args(out)
    if entry in ("generate", "cache_text"):
        return tiny
    if entry == "make_pairs":
        return [*tiny, "max_pairs=2", "num_inference_steps=2"]
    if entry == "merge_lora":
        return [f"base={files.tiny}", f"lora={files.lora}", f"out_dir={out}"]
    if entry == "leaderboard":
        return [*tiny, "n_samples=2", "batch_size=2", "teacher_steps=[1]", "latency.enabled=false",
                "eval.metrics=[]", "eval.real_row=false", "progress=false"]
    raise ValueError(entry)


def _entry(entry: str):
    """The function behind the command (what its `main` calls)."""
    module = __import__(MAINS[entry], fromlist=["_"])
    return getattr(module, "run" if entry in ("train", "leaderboard") else entry)


def _pickled_student_entry(files):
    return (f"entries=[{{name: s, method: dmd, path: '{files.student_full}'}}]")


P = "prompt='a red circle'"
# The one-line message each kind of bad prompt file / model folder must produce, whatever the entry point.
PROMPT_FILE_ERRORS = {"empty": "has no prompts", "binary": "is binary", "long_lines": "10000 characters",
                      "non_utf8": "not UTF-8", "missing": "does not exist", "directory": "is a directory"}
MODEL_FOLDER_ERRORS = {"no_vae": "lacks vae", "truncated": "could not load model", "missing": "does not exist",
                       "pickled": "holds pickle weights"}


def _prompt_cases(entry, overrides, kinds):
    """`entry`'s cases for these bad prompt files; `overrides(path)` names the file on the command line."""
    return {f"{entry}-prompts-{k}": (entry, lambda f, k=k: overrides(f.prompt[k]), PROMPT_FILE_ERRORS[k])
            for k in kinds}


def _model_cases(entry, overrides, kinds, label="model"):
    return {f"{entry}-{label}-{k}": (entry, lambda f, k=k: overrides(f.model[k]), MODEL_FOLDER_ERRORS[k])
            for k in kinds}


# (entry, overrides given the Files, the message it must raise)
CASES = {
    # train: values (t_bar also in test_config.py, through validate only)
    "train-t_bar-0": ("train", lambda f: ["t_bar=0"], "t_bar=0 is out of range"),
    "train-t_bar-1000": ("train", lambda f: ["t_bar=1000"], "t_bar=1000 is out of range"),
    "train-t_bar-neg": ("train", lambda f: ["t_bar=-5"], "t_bar=-5 is out of range"),
    "train-t_bar-abc": ("train", lambda f: ["t_bar=abc"], "t_bar='abc' is not an integer"),
    "train-steps-0": ("train", lambda f: ["train.max_steps=0"], "train.max_steps=0 is out of range"),
    "train-steps-neg": ("train", lambda f: ["train.max_steps=-3"], "train.max_steps=-3 is out of range"),
    "train-batch-abc": ("train", lambda f: ["train.batch_size=abc"], "train.batch_size='abc' is not an integer"),
    "train-accum-0": ("train", lambda f: ["train.grad_accum=0"], "train.grad_accum=0 is out of range"),
    "train-seed-neg": ("train", lambda f: ["seed=-1"], "seed=-1 is out of range"),
    # train: files
    **_prompt_cases("train", lambda path: ["data=prompts", f"data.source={path}"], PROMPT_FILE_ERRORS),
    **_model_cases("train", lambda path: [f"model.pretrained={path}"], MODEL_FOLDER_ERRORS),
    "train-cached-missing": ("train", lambda f: ["data=cached", f"data.folder={f.root / 'no_cache'}"],
                             "not a complete text-embedding cache"),
    "train-resume-pickles": ("train", lambda f: [f"resume={f.resume_pickles}"], "holds pickle files"),
    "train-resume-file": ("train", lambda f: [f"resume={f.resume_file}"], "is a file"),
    "train-resume-empty": ("train", lambda f: [f"resume={f.resume_empty}"], "not a complete checkpoint folder"),
    # generate (steps 0/-3, n_images 0, empty prompt, missing files: test_generate.py)
    "generate-steps-abc": ("generate", lambda f: [P, "steps=abc"], "steps='abc' is not an integer"),
    "generate-n_images-abc": ("generate", lambda f: [P, "n_images=abc"], "n_images='abc' is not an integer"),
    "generate-batch-0": ("generate", lambda f: [P, "batch_size=0"], "batch_size=0 is out of range"),
    "generate-seed-abc": ("generate", lambda f: [P, "seed=abc"], "seed='abc' is not an integer"),
    "generate-guidance-abc": ("generate", lambda f: [P, "guidance_scale=abc"], "guidance_scale='abc' is not a"),
    "generate-guidance-neg": ("generate", lambda f: [P, "guidance_scale=-1"], "guidance_scale=-1 is out of range"),
    "generate-dtype": ("generate", lambda f: [P, "dtype=float8"], "unknown dtype 'float8'"),
    "generate-both-prompts": ("generate", lambda f: [P, f"prompts={f.good_prompts}"], "not both"),
    **_prompt_cases("generate", lambda path: [f"prompts={path}"], ("empty", "binary", "long_lines", "non_utf8")),
    **_model_cases("generate", lambda path: [P, f"model.pretrained={path}"], ("no_vae", "truncated", "pickled")),
    "generate-student-pickled": ("generate", lambda f: [P, f"student={f.student_full}"], "holds pickle weights"),
    "generate-student-transformer-pickled": ("generate", lambda f: [P, f"student={f.student_transformer}"],
                                             "holds pickle weights"),
    "generate-student-bad-card": ("generate", lambda f: [P, f"student={f.student_bad_card}"], "is corrupt"),
    # cache_text (a missing prompt file: test_text_cache.py)
    **_prompt_cases("cache_text", lambda path: [f"prompts={path}"], ("empty", "binary", "long_lines", "non_utf8")),
    "cache_text-shard-0": ("cache_text", lambda f: ["shard_size=0"], "shard_size=0 is out of range"),
    "cache_text-batch-abc": ("cache_text", lambda f: ["batch_size=abc"], "batch_size='abc' is not an integer"),
    **_model_cases("cache_text", lambda path: [f"model.pretrained={path}"], ("no_vae", "truncated")),
    # make_pairs
    "make_pairs-steps-0": ("make_pairs", lambda f: ["num_inference_steps=0"], "num_inference_steps=0 is out of range"),
    "make_pairs-steps-neg": ("make_pairs", lambda f: ["num_inference_steps=-2"], "num_inference_steps=-2 is out of"),
    "make_pairs-steps-abc": ("make_pairs", lambda f: ["num_inference_steps=abc"], "is not an integer"),
    "make_pairs-max-0": ("make_pairs", lambda f: ["max_pairs=0"], "max_pairs=0 is out of range"),
    "make_pairs-seed-abc": ("make_pairs", lambda f: ["seed=abc"], "seed='abc' is not an integer"),
    "make_pairs-guidance-abc": ("make_pairs", lambda f: ["guidance_scale=abc"], "guidance_scale='abc' is not a"),
    "make_pairs-shard-0": ("make_pairs", lambda f: ["shard_size=0"], "shard_size=0 is out of range"),
    **_prompt_cases("make_pairs", lambda path: [f"prompts={path}"], ("binary", "non_utf8", "missing")),
    "make_pairs-model-pickled": ("make_pairs", lambda f: [f"model.pretrained={f.model['pickled']}"],
                                 "holds pickle weights"),
    # merge_lora
    "merge_lora-no-out": ("merge_lora", lambda f: ["out_dir=null"], "no out_dir="),
    "merge_lora-lora-missing": ("merge_lora", lambda f: [f"lora={f.root / 'no_lora'}"], "not a peft LoRA folder"),
    "merge_lora-lora-pickled": ("merge_lora", lambda f: [f"lora={f.lora_bad['pickled']}"], "not a peft LoRA folder"),
    "merge_lora-lora-bad-card": ("merge_lora", lambda f: [f"lora={f.lora_bad['bad_card']}"], "is corrupt"),
    "merge_lora-lora-truncated": ("merge_lora", lambda f: [f"lora={f.lora_bad['truncated']}"], "are corrupt"),
    "merge_lora-steps-0": ("merge_lora", lambda f: ["num_inference_steps=0"], "num_inference_steps=0 is out of"),
    "merge_lora-steps-abc": ("merge_lora", lambda f: ["num_inference_steps=abc"], "is not an integer"),
    "merge_lora-steps-64": ("merge_lora", lambda f: ["num_inference_steps=64"], "exceeds the adapter's 50-step"),
    "merge_lora-dtype": ("merge_lora", lambda f: ["torch_dtype=float8"], "unknown dtype 'float8'"),
    **_model_cases("merge_lora", lambda path: [f"base={path}"], MODEL_FOLDER_ERRORS, label="base"),
    # leaderboard (entries, steps, n_samples=0, empty and missing prompt files: test_evaluation.py)
    **_prompt_cases("leaderboard", lambda path: [f"prompts={path}"], ("binary", "long_lines", "non_utf8")),
    "leaderboard-n-abc": ("leaderboard", lambda f: ["n_samples=abc"], "n_samples='abc' is not an integer"),
    "leaderboard-seed-neg": ("leaderboard", lambda f: ["seed=-1"], "seed=-1 is out of range"),
    "leaderboard-batch-0": ("leaderboard", lambda f: ["batch_size=0"], "batch_size=0 is out of range"),
    "leaderboard-latency-mode": ("leaderboard", lambda f: ["latency.modes=[fast]"], "latency.modes has"),
    "leaderboard-model-truncated": ("leaderboard", lambda f: [f"model.pretrained={f.model['truncated']}"],
                                    "could not load model"),
    "leaderboard-student-pickled": ("leaderboard", lambda f: ["teacher_steps=[]", _pickled_student_entry(f)],
                                    "holds pickle weights"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing_trusted(case, files, base, tmp_path, never_unpickle):
    entry, overrides, message = CASES[case]
    out = tmp_path / "out"
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose(entry, overrides=base(entry, out) + overrides(files))
    with pytest.raises(UserError, match=message) as err:
        _entry(entry)(cfg)
    assert "\n" not in str(err.value)
    left = [p for pattern in TRUSTED_OUTPUT for p in out.rglob(pattern)] if out.exists() else []
    assert left == [], left
    assert not out.with_name(out.name + ".tmp").exists()


# ---- config errors Hydra reports, through the `main` wrappers ------------------------------------

HYDRA_CASES = [
    *[(entry, ["model=nope"], "model=nope is not a config option. Available options in 'model': pixart_alpha_1024, "
                              "pixart_alpha_512, pixart_sigma_1024, pixart_sigma_512, toy")
      for entry in ("train", "generate", "cache_text", "make_pairs", "leaderboard")],
    ("train", ["distill=nope"], "distill=nope is not a config option. Available options in 'distill': dmd, dmd2, "
                                "finetune, finetune_lora, lcm, lcm_lora"),
    ("train", ["train.max_step=3"], "unknown key 'train.max_step' for train; did you mean train.max_steps?"),
    ("generate", ["n_image=3"], "unknown key 'n_image' for generate; did you mean n_images?"),
    ("leaderboard", ["num_sample=3"], "unknown key 'num_sample' for leaderboard; did you mean n_samples?"),
    ("train", ["t_bar=["], "cannot parse the override 't_bar=['"),
    # a run folder named after its overrides, pasted as a value: the fix is to quote it
    ("generate", ["student=outputs/train/dmd2_toy/distill.timesteps=[999,499]/export"],
     "cannot parse the override 'student=outputs/train/dmd2_toy/distill.timesteps=[999,499]/export': its value has "
     "characters Hydra reads as syntax; quote it: 'student=\"outputs/train/dmd2_toy/distill.timesteps=[999,499]/export\"'"),
    ("merge_lora", ["model=toy"], "Could not override 'model'"),
    # a `???` the chosen options need, unset: named before anything is built
    ("train", ["distill=dmd2", "distill/gan/real_images=folder"],
     "distill.gan.real_images.folder has no value and the chosen options need one; set it: "
     "distill.gan.real_images.folder=..."),
    ("train", ["distill=finetune", "data=images"], "data.folder has no value"),
    # a range particular to a setting is the one named, not a generic "give an integer >= 0" that 0 fails too
    ("train", ["train.max_steps=-1"], "train.max_steps=-1 is out of range; use an integer >= 1"),
    ("leaderboard", ["n_samples=-3"], "n_samples=-3 is out of range; use at least 2 images per row"),
    ("plan", ["plan.gpus=-1"], "plan.gpus=-1; give the number of devices"),
    ("generate", ["n_images=-2"], "n_images=-2 is out of range; use an integer >= 1"),
    # a launch config is read by `accelerate launch` only: on the command itself it would run one fp32 process
    ("train", ["+accelerate=deepspeed_zero2"], "+accelerate=deepspeed_zero2 is a launch config, which train does not "
                                                "read (it would run one process and record the config's); launch with "
                                                "it: accelerate launch --config_file "),
    ("plan", ["+accelerate=fsdp2_full_shard"], "+accelerate=fsdp2_full_shard is a launch config, which plan does not "
                                                "read (it would run one process and record the config's); a plan takes "
                                                "the engine and the device count instead: plan.engine="),
    # a setting the chosen method does not take: one line naming the options that do, not Hydra's TypeError dump
    ("train", ["distill=lcm", "+distill/rewards=toy_clip"], "distill.rewards is not a setting of distill=lcm (LCM); "
                                                             "drop it, or choose distill=dmd or dmd2, which take it"),
    # a random-weight stand-in trains nothing useful: refused unless the run says it only measures the recipe
    ("train", ["experiment=pixart_sigma_512_dmd_reward"], "distill.rewards.clip_stand_in.reward is CLIPRewardStandIn, "
                                                          "a stand-in with random weights"),
    # accelerate has no fp16 autocast on the CPU: the run would be float32 under an fp16 card
    ("train", ["train.mixed_precision=fp16", "device=cpu"], "train.mixed_precision=fp16 on the CPU"),
]


@pytest.mark.parametrize("entry,argv,message", HYDRA_CASES, ids=[f"{e}-{' '.join(a)}" for e, a, _ in HYDRA_CASES])
def test_config_errors_from_the_command_line_are_one_line(entry, argv, message, monkeypatch, capsys, tmp_path):
    module = __import__(MAINS[entry], fromlist=["main"])
    monkeypatch.setattr(sys, "argv", [entry, *argv, f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["train", "generate", "cache_text", "make_pairs", "leaderboard"])
def test_an_unwritable_output_folder_is_one_line_before_anything_loads(entry, monkeypatch, capsys, tmp_path):
    """A folder under an existing file, and one under /proc: refused before Hydra creates it (exit 2)."""
    module = __import__(MAINS[entry], fromlist=["main"])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    key = "hydra.run.dir" if entry == "generate" else "out_dir"  # generate writes into Hydra's run folder
    for folder, why in ((blocker / "run", "is a file, or lies under one"), (Path("/proc/pixsig/run"), "")):
        monkeypatch.setattr(sys, "argv", [entry, f"{key}={folder}"])
        with pytest.raises(SystemExit) as exit_:
            module.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {key}='{folder}' cannot be created or written") and why in err, err


def test_old_key_spellings_still_work_with_a_deprecation_line(monkeypatch, capsys, tmp_path):
    module = __import__(MAINS["generate"], fromlist=["main"])
    monkeypatch.setattr(sys, "argv", ["generate", f"prompt_file={tmp_path / 'missing.txt'}", "num_images=2",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert lines[0] == f"warning: prompt_file= is deprecated; use prompts= (read as prompts={tmp_path / 'missing.txt'})"
    assert lines[1].startswith("warning: num_images= is deprecated; use n_images=")
    assert lines[2].startswith("error: prompt file") and "does not exist" in lines[2]  # read as prompts=


# ---- a representative handful as commands: processes of their own (forked, tests/launching.py) -------------------

def _command(module: str, args: list[str], cwd: Path):
    return launching.python_m(module, *args, f"hydra.run.dir={cwd / 'hydra'}", cwd=cwd)


COMMANDS = {
    "train-truncated-model": ("train", lambda f: [f"model.pretrained={f.model['truncated']}"], "could not load model"),
    "train-resume-pickles": ("train", lambda f: [f"resume={f.resume_pickles}"], "holds pickle files"),
    "generate-pickled-student": ("generate", lambda f: [P, f"student={f.student_transformer}"],
                                 "holds pickle weights"),
    "cache_text-binary-prompts": ("cache_text", lambda f: [f"prompts={f.prompt['binary']}"], "is binary"),
    "make_pairs-non-utf8-prompts": ("make_pairs", lambda f: [f"prompts={f.prompt['non_utf8']}"], "not UTF-8"),
    "merge_lora-truncated-adapter": ("merge_lora", lambda f: [f"lora={f.lora_bad['truncated']}"], "are corrupt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMMANDS))
def test_bad_input_on_the_command_line(case, files, base, tmp_path):
    entry, overrides, message = COMMANDS[case]
    out = tmp_path / "out"
    result = _command(MAINS[entry], base(entry, out) + overrides(files), tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert message in lines[-1], lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not files.marker.exists()  # no pickle was unpickled, in the process that was offered one
    left = [p for pattern in TRUSTED_OUTPUT for p in out.rglob(pattern)] if out.exists() else []
    assert left == [], left


# ---- silently wrong, round 3: now refused in one line -----------------------------------------------------

def test_a_few_step_student_is_refused_as_a_teacher_and_a_fine_tune_is_not(tmp_path):
    import json

    from pixsig_distill.teacher import refuse_few_step_student

    student = tmp_path / "dmd_export"
    student.mkdir()
    (student / "pixsig_student.json").write_text(json.dumps({"method": "dmd", "num_inference_steps": 1,
                                                             "guidance_scale": 1.0, "teacher": "PixArt/teacher"}))
    with pytest.raises(UserError, match="is a 1-step dmd student .* model.pretrained=PixArt/teacher"):
        refuse_few_step_student(str(student))
    finetune = tmp_path / "finetune_export"
    finetune.mkdir()
    (finetune / "pixsig_student.json").write_text(json.dumps({"method": "finetune", "num_inference_steps": 20,
                                                              "guidance_scale": 4.5}))
    refuse_few_step_student(str(finetune))  # samples like a teacher: welcome


def test_a_null_caption_in_metadata_is_refused(tmp_path):
    import json

    from PIL import Image

    from pixsig_distill.real_images import read_captioned_folder

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.png", "text": None}]))
    with pytest.raises(UserError, match="line 2: the caption of 'b.png' is not text"):
        read_captioned_folder(tmp_path)


def test_the_planner_refuses_a_schedule_that_train_refuses(tiny_folder):
    from hydra import compose, initialize_config_module

    from pixsig_distill.plan import plan

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        cfg = compose("plan", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                         "model.max_sequence_length=16", "model.resolution=16", "distill=dmd2",
                                         "distill.timesteps=[200,400]"])
    with pytest.raises(UserError, match="decreasing order"):
        plan(cfg)


def _plan_config(tiny_folder, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return compose("plan", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                          "model.max_sequence_length=16", "model.resolution=16", *overrides])


@pytest.mark.parametrize("method", ["finetune", "finetune_lora"])
def test_the_planner_plans_a_finetune(method, tiny_folder):
    """Caption dropout used to branch on a drawn value, which fake tensors do not have."""
    from pixsig_distill.plan import plan

    report = plan(_plan_config(tiny_folder, f"distill={method}", "data=images"))
    assert report["step"]["peak"] > report["step"]["params"] > 0


@pytest.mark.parametrize("override,message", [("plan.depths=[]", "two different transformer depths"),
                                              ("plan.depths=[2,2]", "two different transformer depths"),
                                              ("plan.depths=[0,1]", "two different transformer depths"),
                                              ("plan.out=/proc/plan.json", "cannot be written")])
def test_bad_planner_options_are_one_line_before_simulating(override, message, tiny_folder):
    from pixsig_distill.plan import plan

    with pytest.raises(UserError, match=message):
        plan(_plan_config(tiny_folder, override))


def test_the_demo_checks_its_port_before_loading_models():
    import socket

    from pixsig_distill.demo import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="not available|cannot serve"):
            check_port("127.0.0.1", taken.getsockname()[1])
    for bad in ("abc", 70000, -1, True):
        with pytest.raises(UserError, match="not a port number"):
            check_port("127.0.0.1", bad)
    with pytest.raises(UserError, match="cannot serve"):
        check_port("no-such-host.invalid", None)
    assert check_port("127.0.0.1", None) is None and check_port("127.0.0.1", 0) is None  # a free one, later


def test_resume_falls_back_to_the_intact_earlier_checkpoint(tmp_path, caplog):
    import torch

    from pixsig_distill.checkpoint import resolve_resume, save_checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(root, step, {"generator": {"w": torch.full((64,), float(step))}}, {}, {}, keep=2)
    weights = root / "step-0000004" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a damaged newest checkpoint
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", root) == root / "step-0000002"
    assert "step-0000004 is damaged" in caplog.text
    weights = root / "step-0000002" / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(UserError, match="every checkpoint .* is damaged.*resume=never"):
        resolve_resume("auto", root)


# ---- image folders: content-keyed caches, decoding, text encodings -------------------------------------------

@pytest.fixture
def tiny_teacher(compose_train):
    from pixsig_distill.config import build

    return build(compose_train().model)


def _folder(tmp_path, n=3):
    from test_finetune import write_folder

    return write_folder(tmp_path / "images", n=n)


def test_an_image_edited_in_place_at_the_same_size_is_encoded_again(tiny_teacher, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from pixsig_distill.data import CachedTextDataset
    from pixsig_distill.real_images import encode_image_folder

    folder = _folder(tmp_path)
    path = folder / "000.png"
    pixels = np.asarray(Image.open(path)).copy()
    Image.fromarray(pixels).save(path, compress_level=0)  # stored uncompressed: the size depends on the shape only
    first, size = encode_image_folder(tiny_teacher, folder), path.stat().st_size
    pixels[..., 0] = 255 - pixels[..., 0]  # another image, edited in place ...
    Image.fromarray(pixels).save(path, compress_level=0)
    assert path.stat().st_size == size  # ... at the same byte size
    second = encode_image_folder(tiny_teacher, folder)
    assert second != first
    old, new = CachedTextDataset(first)[0]["latents"], CachedTextDataset(second)[0]["latents"]
    assert not torch.equal(old, new)


def test_images_decode_to_the_colours_a_viewer_shows(tmp_path):
    import numpy as np
    from PIL import Image

    from pixsig_distill.real_images import to_rgb

    gray16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-gray at 16 bits
    gray16.save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert abs(int(np.asarray(to_rgb(image))[0, 0, 0]) - 128) <= 1  # not clipped to white
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent: the background shows, white
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == [255, 255, 255]
    half = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")
    assert np.asarray(to_rgb(half))[0, 0, 0] in (127, 128)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_a_corrupt_data_stream_is_skipped_and_counted(tiny_teacher, tmp_path, caplog):
    import logging

    from PIL import Image

    from pixsig_distill.data import CachedTextDataset
    from pixsig_distill.real_images import encode_image_folder

    folder = _folder(tmp_path)
    Image.open(folder / "001.png").convert("RGB").resize((64, 64)).save(folder / "001.jpg", quality=95)
    data = (folder / "001.jpg").read_bytes()
    (folder / "001.jpg").write_bytes(data[:len(data) // 2])  # the header verifies; the data stops halfway
    (folder / "001.png").unlink()
    with caplog.at_level(logging.WARNING):
        cache = encode_image_folder(tiny_teacher, folder)
    assert "skipped 1 unreadable images of 3 (e.g. 001.jpg" in caplog.text
    assert len(CachedTextDataset(cache)) == 2


@pytest.mark.parametrize("case,message", [
    ("captions_latin1", "is not UTF-8 text"), ("metadata_latin1", "is not UTF-8 text"),
    ("metadata_bad_json", "metadata.jsonl, line 2: not JSON"), ("unwritable_cache", "data.cache_dir=DIR")])
def test_bad_caption_files_and_cache_folders_are_one_line(case, message, tiny_teacher, tmp_path):
    import json

    from pixsig_distill.real_images import encode_image_folder

    folder, cache_dir = _folder(tmp_path), None
    if case == "captions_latin1":
        (folder / "captions.txt").write_bytes("caf\u00e9\n".encode("latin-1") * 3)
    elif case.startswith("metadata"):
        (folder / "captions.txt").unlink()
        lines = [json.dumps({"file_name": f"{i:03d}.png", "text": "a red circle"}) for i in range(3)]
        if case == "metadata_bad_json":
            lines[1] = lines[1][:-1]
        text = "\n".join(lines) + "\n"
        (folder / "metadata.jsonl").write_bytes(text.encode() if case == "metadata_bad_json" else
                                                 text.replace("circle", "caf\u00e9").encode("latin-1"))
    else:
        cache_dir = "/proc/pixsig-cache"  # cannot be created, even by root
    with pytest.raises(UserError, match=message):
        encode_image_folder(tiny_teacher, folder, cache_dir=cache_dir)


def test_a_text_cache_of_another_text_encoder_is_refused(tiny_teacher, tmp_path):
    import torch

    from pixsig_distill.data import CachedTextDataset, write_text_cache

    def encode(prompts):  # a text encoder 3 wide, unlike the teacher's
        return torch.ones(len(prompts), 4, 3), torch.ones(len(prompts), 4, dtype=torch.long)

    cache = write_text_cache(tmp_path / "cache", ["a red circle"], encode, encode([""]),
                             meta={"model": "some/other-model"})
    with pytest.raises(UserError, match="3-wide embeddings .*some/other-model.* reads 32-wide"):
        CachedTextDataset(cache).check_teacher(tiny_teacher)


def test_a_changed_config_on_a_finished_run_is_refused(compose_train, tmp_path):
    from pixsig_distill.train import run

    run(compose_train("train.max_steps=2"))
    card = (tmp_path / "run" / "export" / "pixsig_student.json").read_text()
    with pytest.raises(UserError, match=r"other settings \(.*t_bar: 400 → 200\).*resume=never"):
        run(compose_train("train.max_steps=2", "t_bar=200"))
    assert (tmp_path / "run" / "export" / "pixsig_student.json").read_text() == card  # nothing re-exported
    # What a resume may change: its length, logging, memory savers, the device (model.device follows it)
    summary = run(compose_train("train.max_steps=3", "train.log_every=1", "train.gradient_checkpointing=true",
                                "device=cpu"))
    assert summary["finished"] and summary["step"] == 3
    summary = run(compose_train("train.max_steps=2", "t_bar=200", "resume=never"))
    assert summary["finished"]
