"""`python -m pixsig_distill.demo`: the teacher and its students side by side in the browser (Gradio).

One prompt and one seed go to every model; each shows its image and the latency of that call (prompt →
image: T5, the sampler's steps, VAE decode). The teacher's steps and guidance are adjustable; students
sample with the recipe of their card. `student=` takes one export folder or a list; by default the demo
shows the teacher and every student export found under `outputs/train` (where the training commands
write). Gradio is an optional extra: `pip install "pixsig-distill[demo]"`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .config import build
from .console import entry_point
from .errors import UserError
from .model_card import STUDENT_CARD

DISPLAY = 256  # small images (the toy world's 32 px) are shown enlarged, pixel for pixel


@dataclass
class DemoModel:
    name: str
    model: object  # a Teacher-shaped sampler
    spec: object  # students.SamplerSpec
    is_teacher: bool = False


def find_students(root: str | Path = "outputs/train") -> list[Path]:
    """Every export folder (with a student card) under `root`, in name order."""
    root = Path(root)
    return sorted(card.parent for card in root.glob(f"**/export/{STUDENT_CARD}")) if root.is_dir() else []


def _student_list(value) -> list[Path] | None:
    if value is None:
        return None
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    return [Path(str(v)).expanduser() for v in values]


def load_models(cfg: DictConfig) -> list[DemoModel]:
    """The teacher and the students, each checked before anything is served: a bad folder is one line."""
    from .students import load_student, read_card, teacher_spec

    folders = _student_list(cfg.student)
    folders = find_students(cfg.students_root) if folders is None else folders
    for folder in folders:
        read_card(folder)  # one clear line for a folder that is not a student export
    if cfg.get("vae"):  # and for a folder that is not a tiny decoder, before any model loads
        from .decoders import load_decoder

        load_decoder(cfg.vae, torch.float32, "cpu")
    overrides = {"device": cfg.device, **({"torch_dtype": cfg.dtype} if cfg.dtype else {})}
    teacher = build(cfg.model, **overrides)
    name = Path(str(cfg.model.pretrained)).name
    models = [DemoModel("teacher" if name == "teacher" else f"teacher · {name}", teacher, teacher_spec(teacher), True)]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    for folder in folders:
        student, spec = load_student(folder, model_cfg, device=cfg.device, dtype=cfg.dtype)
        label = "/".join(folder.resolve().parts[-3:-1]) if folder.name == "export" else folder.name
        models.append(DemoModel(f"{spec.method} · {label}", student, spec))
    for m in models:  # T5 over the prompt's own tokens, not 300 padded ones: the same images (inference.py)
        m.model.trim_text = True
    if cfg.get("vae"):  # each model again, decoded by the tiny decoder (the same networks, shared)
        from .decoders import with_decoder

        models += [DemoModel(f"{m.name} + tiny decoder", with_decoder(m.model, cfg.vae), m.spec, m.is_teacher)
                   for m in list(models)]
    return models


def _display(image: np.ndarray) -> Image.Image:
    picture = Image.fromarray(image)
    if image.shape[0] < DISPLAY:
        picture = picture.resize((DISPLAY, DISPLAY), Image.NEAREST)
    return picture


def generate_all(models: list[DemoModel], prompt: str, seed: int, teacher_steps: int, teacher_guidance: float
                 ) -> list:
    """[image, latency line] per model, for one prompt and seed."""
    from .sampling import generate_images

    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("enter a prompt")
    out = []
    for m in models:
        if m.is_teacher:
            steps, guidance, timesteps = int(teacher_steps), float(teacher_guidance), None
        else:
            steps, guidance, timesteps = m.spec.num_inference_steps, m.spec.guidance_scale, m.spec.timesteps
        images, seconds = generate_images(m.model, [prompt], [int(seed)], steps, guidance, timesteps, 1,
                                          progress=False)
        out += [_display(images[0]), f"**{1000 * seconds:.1f} ms** · {steps} step{'s' if steps != 1 else ''}"
                f"{f', CFG {guidance:g}' if guidance > 1 else ''}"]
    return out


def build_app(models: list[DemoModel], examples: list[str], title: str = "pixsig-distill"):
    import gradio as gr

    teacher = next(m for m in models if m.is_teacher)
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nThe teacher and its distilled students, one prompt and one seed; the latency is "
                    f"that call's, prompt to image.")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=examples[0] if examples else "", scale=4)
            seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
        with gr.Row():
            steps = gr.Slider(1, 50, value=teacher.spec.num_inference_steps, step=1, label="teacher steps")
            guidance = gr.Slider(1.0, 10.0, value=teacher.spec.guidance_scale, step=0.5, label="teacher guidance")
            button = gr.Button("Generate", variant="primary")
        outputs = []
        with gr.Row():
            for m in models:
                with gr.Column(min_width=160):
                    outputs.append(gr.Image(label=m.name, type="pil", height=DISPLAY, format="png"))
                    outputs.append(gr.Markdown())
        if examples:
            gr.Examples([[e] for e in examples], inputs=[prompt])
        button.click(lambda p, s, n, g: generate_all(models, p, s, n, g), [prompt, seed, steps, guidance], outputs,
                     api_name="generate")
    return app


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.getaddrinfo(host, None)[0][0]
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port) -> int | None:
    """demo.port (null or 0: a free one, picked when the models are loaded) and demo.host, checked before minutes
    of model loading: a port that is in use, out of range or not a number, or a host that is not this machine's."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise UserError(f"demo.port={port!r} is not a port number; use an integer in 1..65535, or demo.port=null "
                        f"for a free one")
    try:
        family = socket.getaddrinfo(str(host), None)[0][0]
        with socket.socket(family) as s:
            s.bind((str(host), port or 0))
    except OSError as err:  # in use, privileged, or a host name that is not this machine's
        raise UserError(f"cannot serve on {host}:{port or 'any port'} ({err.strerror or err}); choose another "
                        f"demo.port (null: a free one) or demo.host (127.0.0.1, or 0.0.0.0 for every "
                        f"interface)") from None
    return port or None


def example_prompts(source: str | None, n: int = 8) -> list[str]:
    """n prompts spread over the set (a sorted caption list starts with n near-twins)."""
    from .prompts import load_prompts

    prompts = load_prompts(str(source)) if source else []
    return prompts[::max(1, len(prompts) // n)][:n]


def serve(cfg: DictConfig, block: bool = True):
    """Load the models, then serve the app; returns the app (already running when `block` is False)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('the demo needs Gradio: pip install "pixsig-distill[demo]"') from None
    del gradio
    port = check_port(cfg.demo.host, cfg.demo.port)
    models = load_models(cfg)
    print(f"{len(models)} models: " + ", ".join(m.name for m in models))
    app = build_app(models, example_prompts(cfg.examples))
    app.pixsig_models = len(models)
    port = port or free_port(cfg.demo.host)  # picked now: a port found free minutes ago may be taken since
    print(f"serving on http://{cfg.demo.host}:{port} (Ctrl+C to stop)", flush=True)
    app.launch(server_name=cfg.demo.host, server_port=int(port), share=bool(cfg.demo.share),
               prevent_thread_lock=not block, quiet=True)
    return app


main = entry_point("demo", serve)


if __name__ == "__main__":
    main()
