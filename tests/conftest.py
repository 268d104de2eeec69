import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# The README's test install skips pip's bytecode compilation (--no-compile: pip compiles every file of every package,
# one at a time, for half the install's time); Python compiles a module when it is first imported and caches that.
# With PYTHONDONTWRITEBYTECODE set it would cache nothing, and each of the suite's ~50 Python processes would compile
# torch, diffusers and transformers again (about 15 s each).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# pytest-xdist workers (pyproject: -n 2) share the cores: each takes its share, and so do the processes it starts
# (threads.py: two processes with a thread per core each ran 50× slower than one with one thread). Set before
# torch (and with it numpy's OpenBLAS, which sizes its thread pool once, at import) is imported: the evaluation's
# bootstrap runs thousands of small eigvalsh calls (test_lcm's toy run: 45 s alone, 330 s beside another worker
# while each worker's pool had 2 threads).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(_threads)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(_threads, torch.get_num_threads()))


# The longest files first (docs/tests.md): xdist hands out whole files (--dist loadfile), and a long file handed out
# last keeps one worker busy while the other has nothing left to do.
LONGEST_FIRST = ["test_plan.py", "test_real_width.py", "test_deepspeed_methods.py", "test_fsdp.py", "test_deepspeed.py",
                 "test_faults.py", "test_multiprocess.py", "test_bad_input.py", "test_learning.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file stays in one piece


@pytest.fixture(scope="session")
def tiny_pipe():
    from pixsig_distill.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder (safetensors), as users get from the hub."""
    folder = tmp_path_factory.mktemp("tiny_sigma")
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_train_overrides(tiny_folder, out_dir) -> list[str]:
    """The `train` overrides that shrink a run to the tiny random model and a few CPU steps (also used
    on the command line by the subprocess tests)."""
    return ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
            "model.max_sequence_length=16", "model.resolution=16", f"out_dir={out_dir}",
            "train.max_steps=4", "train.batch_size=2", "train.log_every=2", "train.sample_every=4",
            "train.ckpt_every=2", "device=cpu", "eval=none"]


@pytest.fixture
def compose_train(tiny_folder, tmp_path):
    """Compose the real `train` config, shrunk to the tiny random model and a few CPU steps."""
    from hydra import compose, initialize_config_module

    def _compose(*overrides, out_dir=None):
        base = tiny_train_overrides(tiny_folder, out_dir or tmp_path / "run")
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return _compose


@pytest.fixture
def tiny_train_args(tiny_folder):
    """`tiny_train_overrides` for the tiny folder: out_dir → the command-line overrides of a tiny run."""
    return lambda out_dir: tiny_train_overrides(tiny_folder, out_dir)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision, device): give every test its own."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def no_log_file_outlives_its_test():
    """A command's `main()` called in the test process leaves Hydra's job log (`<job>.log` in the run folder) on the
    root logger, as Hydra does for the one job of a process. The test's folder is deleted when it passes; a later
    test's first log record would then reopen that file (after a later Hydra job closed it) and fail."""
    import logging

    before = set(logging.root.handlers)
    yield
    for handler in [h for h in logging.root.handlers if isinstance(h, logging.FileHandler) and h not in before]:
        logging.root.removeHandler(handler)
        handler.close()


@pytest.fixture
def compose_generate(tiny_folder, tmp_path):
    """Compose the real `generate` config for the tiny random model on the CPU."""
    from hydra import compose, initialize_config_module

    def _compose(*overrides):
        base = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                "model.max_sequence_length=16", "model.resolution=16", f"out_dir={tmp_path / 'gen'}", "device=cpu"]
        with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
            return compose("generate", overrides=base + list(overrides))
    return _compose
