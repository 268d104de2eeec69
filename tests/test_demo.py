"""The web demo, driven as a user would: launched on a free local port and called through gradio_client."""

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from pixsig_distill.errors import UserError
from pixsig_distill.train import run

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed")


def _demo_cfg(tiny_folder, *overrides):
    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return compose("demo", overrides=["model=pixart_sigma_512", f"model.pretrained={tiny_folder}",
                                          "model.torch_dtype=float32", "model.max_sequence_length=16",
                                          "device=cpu", *overrides])


def test_demo_serves_teacher_and_student_side_by_side(compose_train, tiny_folder, tmp_path):
    from gradio_client import Client

    from pixsig_distill.demo import find_students, serve

    run(compose_train("train.max_steps=2", "distill.generator_optimizer.lr=1e-3", out_dir=tmp_path / "outputs" /
                      "train" / "dmd_tiny"))
    assert find_students(tmp_path / "outputs" / "train") == [tmp_path / "outputs" / "train" / "dmd_tiny" / "export"]
    app = serve(_demo_cfg(tiny_folder, f"students_root={tmp_path / 'outputs' / 'train'}", "examples=null"),
                block=False)
    try:
        assert app.server_name == "127.0.0.1"
        client = Client(app.local_url, verbose=False)
        result = client.predict("a red circle", 3, 4, 4.5, api_name="/generate")
        teacher, teacher_latency, student, student_latency = result
        a = np.asarray(Image.open(teacher).convert("RGB"), dtype=float)
        b = np.asarray(Image.open(student).convert("RGB"), dtype=float)
        assert a.shape == b.shape == (256, 256, 3)
        assert np.abs(a - b).mean() > 1  # two different models, two different images
        noise = np.random.default_rng(0).integers(0, 256, a.shape).astype(float)
        for image in (a, b):  # not noise: neighbouring pixels agree far more than in noise
            assert np.abs(np.diff(image, axis=0)).mean() < 0.5 * np.abs(np.diff(noise, axis=0)).mean()
        assert "ms" in teacher_latency and "4 steps" in teacher_latency and "1 step" in student_latency
    finally:
        app.close()


def test_a_bad_student_folder_is_one_line_before_serving(tiny_folder, tmp_path):
    from pixsig_distill.demo import load_models

    with pytest.raises(UserError, match="not a student export"):
        load_models(_demo_cfg(tiny_folder, f"student={tmp_path}"))
    with pytest.raises(UserError, match="does not exist"):
        load_models(_demo_cfg(tiny_folder, f"student=[{tmp_path / 'nope'}]"))


def test_the_page_in_a_real_browser(compose_train, tiny_folder, tmp_path):
    """scripts/demo_screenshot.py: headless Chromium types a prompt, clicks Generate, and screenshots the result."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("playwright", reason="playwright is not installed")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    run(compose_train("train.max_steps=2", out_dir=tmp_path / "outputs" / "train" / "dmd_tiny"))
    repo = Path(__file__).resolve().parents[1]
    shot = tmp_path / "demo.png"
    overrides = ["model=pixart_sigma_512", f"model.pretrained={tiny_folder}", "model.torch_dtype=float32",
                 "model.max_sequence_length=16", "device=cpu", f"students_root={tmp_path / 'outputs' / 'train'}"]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "demo_screenshot.py"), "--out", str(shot),
                           *overrides], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images" in proc.stdout and Image.open(shot).size[0] >= 1000
