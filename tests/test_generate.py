import json

import launching
import pytest

from pixsig_distill.errors import UserError
from pixsig_distill.generate import generate
from pixsig_distill.train import run


def test_teacher_generation_writes_images_grid_and_latency(compose_generate, tmp_path):
    report = generate(compose_generate("prompt='a red circle'", "n_images=3", "steps=2", "batch_size=2"))
    assert report["method"] == "teacher" and report["images"] == 3 and report["ms_per_image"] > 0
    assert len(list((tmp_path / "gen" / "images").glob("*.png"))) == 3
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert json.loads((tmp_path / "gen" / "latency.json").read_text())["steps"] == 2


def test_batch_size_does_not_change_images(compose_generate, tmp_path):
    import numpy as np
    from PIL import Image

    generate(compose_generate("prompt='a red circle'", "n_images=3", "steps=2", "batch_size=1"))
    one = [np.array(Image.open(p)) for p in sorted((tmp_path / "gen" / "images").glob("*.png"))]
    generate(compose_generate("prompt='a red circle'", "n_images=3", "steps=2", "batch_size=3"))
    three = [np.array(Image.open(p)) for p in sorted((tmp_path / "gen" / "images").glob("*.png"))]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(one, three))


def test_dmd_student_generation(compose_generate, compose_train, tmp_path):
    run(compose_train(out_dir=tmp_path / "dmd"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    report = generate(compose_generate(f"student={tmp_path / 'dmd' / 'export'}", f"prompts={prompts}",
                                       "n_images=2"))
    assert report["method"] == "dmd" and report["steps"] == 1 and report["images"] == 4
    with pytest.raises(UserError, match="fixed timesteps .* use steps=1"):
        generate(compose_generate(f"student={tmp_path / 'dmd' / 'export'}", "prompt=x", "steps=4"))


@pytest.mark.parametrize("overrides,message", [
    (["prompt=''"], "empty prompt"), ([], "no prompt"), (["prompt=x", "steps=0"], "steps=0"),
    (["prompt=x", "steps=-3"], "steps=-3"), (["prompt=x", "n_images=0"], "n_images=0"),
    (["prompts=/nonexistent/prompts.txt"], "does not exist"),
    (["prompt=x", "student=/nonexistent/export"], "does not exist"),
])
def test_bad_input(compose_generate, overrides, message):
    with pytest.raises(UserError, match=message):
        generate(compose_generate(*overrides))


def test_cli_error_is_one_line(tmp_path):
    result = launching.python_m("pixsig_distill.generate", "prompt=x", "steps=0", f"out_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: steps=0")
