"""Every export describes itself: a README.md model card whose snippet runs in stock diffusers."""

import re

import numpy as np
import yaml

from pixsig_distill.train import run


def test_card_front_matter_facts_and_a_snippet_that_runs(compose_train, tmp_path, monkeypatch):
    summary = run(compose_train("train.max_steps=2", out_dir=tmp_path / "run"))
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert "dmd" in front["tags"] and front["base_model"]
    assert "T̄ = 400" in card and "## Training" in card and "steps: 2" in card and "wall time" in card
    assert (tmp_path / "run" / "export" / "samples.png").is_file() and "![samples](samples.png)" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "model card snippet", "exec"), namespace)  # noqa: S102  (our own card)
    image = np.asarray(namespace["image"])
    assert image.shape == (16, 16, 3) and image.std() > 0 and (tmp_path / "sample.png").is_file()
    assert summary["finished"]
    # ... and it draws what the evaluation draws for that prompt and seed (the card says it reproduces them)
    from pixsig_distill.inference import load_for_inference
    from pixsig_distill.model_card import EXAMPLE_PROMPT
    from pixsig_distill.sampling import generate_images

    cfg = compose_train()
    model, spec = load_for_inference(cfg.model, str(tmp_path / "run" / "export"), "cpu")
    ours, _ = generate_images(model, [EXAMPLE_PROMPT], [0], spec.num_inference_steps, spec.guidance_scale,
                              spec.timesteps, progress=False)
    difference = np.abs(ours[0].astype(int) - image.astype(int))
    assert difference.mean() < 0.5 and difference.max() <= 4  # float rounding (the random tiny VAE amplifies it)
    other, _ = generate_images(model, [EXAMPLE_PROMPT], [0], 1, 1.0, [200], progress=False)  # another recipe
    assert np.abs(other[0].astype(int) - image.astype(int)).mean() > 5


def test_card_carries_the_evaluation_and_the_teachers_license(tmp_path, tiny_folder):
    from pixsig_distill.model_card import teacher_license

    assert teacher_license("PixArt-alpha/PixArt-Sigma-XL-2-512-MS") == "openrail++"
    assert teacher_license(str(tiny_folder)) is None  # unknown: no licence line rather than a guessed one
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a teacher\n")
    assert teacher_license(str(tmp_path)) == "mit"
