import os
import subprocess
import sys
from pathlib import Path

import launching
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from pixsig_distill.errors import UserError
from pixsig_distill.config import validate_train_config as validate

CONF = Path(__file__).resolve().parents[1] / "pixsig_distill" / "conf"


def _compose(*overrides):
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return compose("train", overrides=["out_dir=/tmp/unused", *overrides])


@pytest.mark.parametrize("model", [p.stem for p in (CONF / "model").glob("*.yaml")])
def test_every_model_config_composes(model):
    cfg = _compose(f"model={model}")
    assert cfg.model._target_ == "pixsig_distill.teacher.Teacher.from_pretrained"
    assert cfg.model.pretrained


def test_common_keys_exist_with_documented_defaults():
    cfg = _compose("distill=dmd", "t_bar=400")
    assert cfg.t_bar == 400 and cfg.seed == 0 and cfg.resume == "auto"
    assert cfg.distill.timesteps == [400]  # DMD reads the top-level key
    assert cfg.train.max_steps > 0
    assert cfg.model.pretrained.endswith("toy/weights/teacher")  # the embedded default


def test_pixart_dmd_experiment_holds_the_reference_recipe_and_command_line_wins():
    from omegaconf import OmegaConf

    cfg = _compose("experiment=pixart_sigma_512_dmd", "data.folder=/cache", "t_bar=600")
    assert cfg.model.pretrained == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS" and not cfg.model.load_text_encoder
    assert cfg.distill.real_guidance_scale == 3.0 and cfg.distill.fake_updates_per_step == 1
    assert cfg.distill.generator_optimizer.lr == cfg.distill.fake_optimizer.lr == 1e-6
    assert cfg.distill.ema_decay == 0.9999 and cfg.distill.regression.weight == 0.25
    assert OmegaConf.is_missing(cfg.distill.regression.pairs, "folder")  # the user's teacher pairs
    assert cfg.distill.timesteps == [600] and cfg.data.folder == "/cache"
    assert _compose().distill.real_guidance_scale == 1.0  # the toy default is untouched


def test_pixart_dmd2_experiment_needs_its_folders_to_train_but_not_to_plan():
    from omegaconf import OmegaConf

    from pixsig_distill.config import compose_error

    cfg = _compose("experiment=pixart_sigma_512_dmd2")
    assert cfg.distill._target_ == "pixsig_distill.methods.dmd.DMD" and cfg.distill.name == "dmd2"
    assert list(cfg.distill.timesteps) == [999, 749, 499, 249]
    assert cfg.distill.gan.real_images._target_ == "pixsig_distill.real_images.image_folder_latents"
    assert cfg.distill.fake_score.lora_rank == 64 and cfg.train.gradient_checkpointing
    assert OmegaConf.is_missing(cfg.distill.gan.real_images, "folder") and OmegaConf.is_missing(cfg.data, "folder")
    for experiment in ("pixart_sigma_512_dmd2", "pixart_sigma_512_dmd", "pixart_sigma_1024_dmd"):
        assert "has no value" in compose_error("train", [f"experiment={experiment}"])
        assert compose_error("plan", [f"experiment={experiment}"], needs_values=False) is None  # reads no data


def test_real_model_configs_point_at_the_hub():
    assert _compose("model=pixart_sigma_512").model.pretrained == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
    assert _compose("model=pixart_sigma_1024").model.pretrained == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert _compose("model=pixart_alpha_1024").model.pretrained == "PixArt-alpha/PixArt-XL-2-1024-MS"
    for name in ("pixart_sigma_1024", "pixart_alpha_1024"):  # the resolution comes from the transformer
        assert _compose(f"model={name}").model.resolution is None
    alpha = _compose("model=pixart_alpha_512").model
    assert alpha.pretrained == "PixArt-alpha/PixArt-XL-2-512x512" and alpha.max_sequence_length == 120


def test_data_configs_instantiate():
    dataset = instantiate(_compose("data=toy").data)
    assert len(dataset) > 1000 and dataset[0]["prompt"].startswith("a ")


@pytest.mark.parametrize("override,message", [
    ("t_bar=0", "out of range"), ("t_bar=1000", "out of range"), ("t_bar=-5", "out of range"),
    ("t_bar=abc", "not an integer"), ("t_bar=4.5", "not an integer"), ("train.max_steps=0", "out of range"),
    ("train.batch_size=-1", "out of range"), ("train.mixed_precision=fp8", "mixed_precision"),
    ("train.lr_schedule.name=cosin", "lr_schedule.name='cosin'; use one of constant"),
    ("train.lr_schedule.warmup_steps=10", "name=constant, which has no warm-up"),
])
def test_bad_values_are_rejected_with_one_line(override, message):
    with pytest.raises(UserError, match=message) as err:
        validate(_compose(override))
    assert "\n" not in str(err.value)


def _cli(*args, env=None):
    return launching.python_m("pixsig_distill.train", *args, env=env)  # forked: the errors, not the start-up


def test_cli_unknown_group_option_lists_choices(tmp_path):
    result = _cli("model=nope", f"out_dir={tmp_path}")
    assert result.returncode != 0
    assert "Available options" in result.stderr and "pixart_sigma_512" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("distill=nope", f"out_dir={tmp_path}")
    assert result.returncode != 0 and "dmd" in result.stderr


def test_cli_bad_t_bar_is_one_line(tmp_path):
    result = _cli("t_bar=1000", f"out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: t_bar=1000 is out of range")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_out_dir_holds_everything_and_the_default_folder_follows_the_command_line(tmp_path):
    """out_dir=X puts Hydra's own files in X too, so no stray folder appears under ./outputs. (A bad resume= path is
    refused inside the job, after Hydra made its folder; a bad value, before it.)"""
    missing = f"resume={tmp_path / 'no_checkpoint'}"
    given = launching.python_m("pixsig_distill.train", missing, f"out_dir={tmp_path / 'mine'}", cwd=tmp_path)
    assert given.returncode == 2 and "no_checkpoint" in given.stderr
    assert (tmp_path / "mine" / ".hydra").is_dir() and not (tmp_path / "outputs").exists()
    default = launching.python_m("pixsig_distill.train", missing, "seed=7", cwd=tmp_path)
    assert default.returncode == 2
    assert (tmp_path / "outputs" / "train" / "dmd_toy" / "seed=7" / ".hydra").is_dir()


def test_installed_wheel_finds_its_configs(tmp_path):
    """Build a wheel, install it (no deps) into a folder, import it from elsewhere and compose train."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("pixsig_distill-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=600)
    code = ("import pixsig_distill, sys\n"
            "assert 'site' in pixsig_distill.__file__, pixsig_distill.__file__\n"
            "from hydra import compose, initialize_config_module\n"
            "with initialize_config_module('pixsig_distill.conf', version_base='1.3'):\n"
            "    cfg = compose('train', overrides=['distill=dmd', 't_bar=400', 'out_dir=x'])\n"
            "print(cfg.distill._target_, cfg.t_bar, cfg.model.pretrained)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pixsig_distill.methods.dmd.DMD 400" in result.stdout
    assert (Path(result.stdout.split()[-1]) / "model_index.json").is_file()  # the toy teacher ships inside
