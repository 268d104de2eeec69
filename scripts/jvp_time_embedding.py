"""Does PixArt-Σ's time embedding (the DDPM timestep, 0…999, in a sinusoid) make sCM's JVP tangents explode?

    python scripts/jvp_time_embedding.py --out docs/results/consistency/jvp_time_embedding

SANA-Sprint found that its embedding of 1000·t made JVP gradients explode and fine-tuned its teacher to c_noise = t.
PixArt's embedding takes t(t̂), whose slope dt/dt̂ runs from 167 (t = 0) to 15,583 (t = 999). This measures, at TrigFlow
times t̂ along the schedule, the two terms of the tangent sCM needs, dN/dt̂ = ∂N/∂t̂ + ∂N/∂x_t · dx_t/dt̂ (sCM, Fig. 4
shows the same two terms), for N the network's ε channels:

- the toy teacher (the shipped weights, loaded as `model=toy` loads them), at its own samples x0 (20 DPM-Solver++
  steps, CFG 4.5), with the ODE direction dx_t/dt̂ = its guided TrigFlow velocity F (CFG 4.5);
- a PixArt-Σ 512 transformer at real width (hidden 1152, 16 heads, caption channels 4096) with `--layers` of 28
  layers, random weights, on a `--canvas` latent canvas, with x0 ~ N(0, I) and dx_t/dt̂ = cos t̂·z − sin t̂·x0.

Also: how fast the adaLN conditioning vector turns with t̂ (relative to its norm; x_t turns at about 1 per unit t̂),
the ε-parametrised velocity's tangent (F = (ε̂ − sin t̂·x_t)/cos t̂, its 1/cos t̂ blow-up near t = 999), the error of
finite differences against the exact JVP at several steps, and the cost of a JVP against a forward call. CPU only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_report import write_report  # noqa: E402
from trim_gain import cpu_name  # noqa: E402

from pixsig_distill.denoiser import Denoiser, trigflow_from_eps, trigflow_time  # noqa: E402
from pixsig_distill.jvp import ExactJVP, FiniteDifferenceJVP, forward_ad_attention, pixart_call  # noqa: E402

TIMESTEPS = [0, 25, 100, 200, 400, 600, 800, 900, 950, 990, 999]
FD_TIMESTEPS = [100, 400, 800, 999]
FD_STEPS = [1e-2, 3e-3, 1e-3, 5e-4, 3e-4, 1e-4, 3e-5]
NO_SIZE = {"resolution": None, "aspect_ratio": None}


def rms(x: torch.Tensor) -> float:
    """Per-element root mean square, averaged over the batch."""
    return float(x.flatten(1).pow(2).mean(1).sqrt().mean())


def per_sample(t_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t_hat.view(-1, *([1] * (x.ndim - 1)))


def toy_world(batch: int) -> dict:
    """The shipped toy teacher, its samples for held-out captions, and its guided velocity as the ODE direction."""
    from pixsig_distill.config import TOY_WEIGHTS
    from pixsig_distill.teacher import Teacher
    from pixsig_distill.toy.world import split_captions

    teacher = Teacher.from_pretrained(str(TOY_WEIGHTS / "teacher"), max_sequence_length=16, device="cpu")
    embeds, mask = teacher.encode_prompts(split_captions("heldout")[:batch])
    x0 = teacher.sample(embeds=embeds, mask=mask, generator=torch.Generator().manual_seed(0))
    denoiser = teacher.denoiser

    def velocity(x_t, t_hat):  # the guided teacher's TrigFlow F (CFG 4.5): sCM distillation's dx_t/dt̂
        with torch.no_grad():
            return denoiser.trigflow(x_t, t_hat, embeds, mask, guidance_scale=4.5)

    return {"name": "toy teacher (the shipped weights: 8 layers, hidden 192, 8×8 latents)",
            "denoiser": denoiser, "embeds": embeds, "mask": mask, "x0": x0, "velocity": velocity}


def real_width(batch: int, layers: int, canvas: int, tokens: int, pretrained: str | None = None) -> dict:
    """PixArt-Σ 512's transformer at real width and reduced depth, random weights; or, with `pretrained` (a
    diffusers folder or hub id holding transformer/), the real weights at full depth."""
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    from pixsig_distill.architectures import KNOWN
    from pixsig_distill.schedule import PIXART_SCHEDULER

    torch.manual_seed(0)
    config = {**KNOWN["PixArt-alpha/PixArt-Sigma-XL-2-512-MS"].transformer, "num_layers": layers,
              "sample_size": canvas}
    if pretrained:
        transformer = PixArtTransformer2DModel.from_pretrained(pretrained, subfolder="transformer")
        canvas, layers = transformer.config.sample_size, transformer.config.num_layers
    else:
        transformer = PixArtTransformer2DModel(**config)
    transformer = transformer.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, canvas, canvas, generator=g)
    noise = torch.randn(batch, 4, canvas, canvas, generator=g)

    def velocity(x_t, t_hat):  # the conditional velocity cos t̂·z − sin t̂·x0 (what a trained teacher's F estimates)
        return torch.cos(per_sample(t_hat, x0)) * noise - torch.sin(per_sample(t_hat, x0)) * x0

    schedule = DDPMScheduler.from_config({k: v for k, v in PIXART_SCHEDULER.items()
                                          if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    weights = f"the weights of {pretrained}" if pretrained else "random weights"
    denoiser = Denoiser(transformer, schedule.alphas_cumprod, 8, null_embedding=None, device=torch.device("cpu"))
    return {"name": f"Σ-512 real width, {layers} of 28 layers, {weights}, {canvas}×{canvas} latents",
            "denoiser": denoiser, "embeds": 0.1 * torch.randn(batch, tokens, 4096, generator=g),
            "mask": torch.ones(batch, tokens), "x0": x0, "noise": noise, "velocity": velocity}


def measure(world: dict, fd: bool) -> dict:
    denoiser, x0 = world["denoiser"], world["x0"]
    transformer, alphas = denoiser.transformer, denoiser.alphas_cumprod
    fn = pixart_call(denoiser, world["embeds"], world["mask"])
    exact = ExactJVP()
    noise = world.get("noise", torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    rows, fd_rows = [], []
    for t in TIMESTEPS:
        t_hat = trigflow_time(alphas, torch.full((x0.shape[0],), t))
        x_t = torch.cos(per_sample(t_hat, x0)) * x0 + torch.sin(per_sample(t_hat, x0)) * noise
        v = world["velocity"](x_t, t_hat)
        zero_x, zero_t, one = torch.zeros_like(x_t), torch.zeros_like(t_hat), torch.ones_like(t_hat)
        with torch.no_grad():
            out = fn(x_t, t_hat)
        time_term = exact(fn, (x_t, t_hat), (zero_x, one), networks=[transformer])
        x_term = exact(fn, (x_t, t_hat), (v, zero_t), networks=[transformer])

        def conditioning(u):  # adaLN-single's modulation vector (6 × hidden) at t(t̂)
            return transformer.adaln_single(denoiser.ddpm_time(u), NO_SIZE, batch_size=u.shape[0],
                                            hidden_dtype=torch.float32)[0]

        cond, cond_tangent = torch.func.jvp(conditioning, (t_hat,), (one,))

        def eps_velocity(x, u):  # an ε-parametrised network's TrigFlow F
            return trigflow_from_eps(x, fn(x, u), u)

        f_total = exact(eps_velocity, (x_t, t_hat), (v, one), networks=[transformer])
        rate = float(denoiser.ddpm_time_rate(t_hat[:1]))
        th = float(t_hat[0])
        rows.append({"t": t, "t_hat": th, "dt_dt_hat": rate, "cos_sin": math.cos(th) * math.sin(th),
                     "sana_dc_dt_hat": 1000 / (math.sin(th) + math.cos(th)) ** 2,
                     "out": rms(out), "time_term": rms(time_term), "x_term": rms(x_term),
                     "velocity": rms(v), "ratio": rms(time_term) / rms(x_term),
                     "scm_time_term": math.cos(th) * math.sin(th) * rms(time_term),
                     "per_timestep": rms(time_term) / rate,
                     "cond_rate": float((cond_tangent.norm(dim=1) / cond.norm(dim=1)).mean()),
                     "eps_F_total": rms(f_total)})
        if fd and t in FD_TIMESTEPS:  # sCM's rearranged tangent: cos t̂ sin t̂ · (dx_t/dt̂, 1)
            w = torch.cos(t_hat) * torch.sin(t_hat)
            tangents = (per_sample(w, x_t) * v, w)
            reference = exact(fn, (x_t, t_hat), tangents, networks=[transformer])
            for step in FD_STEPS:
                for scheme in ("central", "backward"):
                    approx = FiniteDifferenceJVP(step, scheme)(fn, (x_t, t_hat), tangents, value=out)
                    fd_rows.append({"t": t, "step": step, "scheme": scheme,
                                    "rel_error": float((approx - reference).norm() / reference.norm())})
    return {"model": world["name"], "batch": x0.shape[0], "rows": rows, "fd": fd_rows,
            "cost": cost(fn, x0, alphas, transformer)}


def cost(fn, x0, alphas, transformer, runs: int = 3) -> dict:
    """Median seconds of a forward call (fused attention), a forward call on the math attention, and an exact JVP."""
    t_hat = trigflow_time(alphas, torch.full((x0.shape[0],), 400))
    tangents = (torch.randn_like(x0), torch.ones_like(t_hat))

    def median(call):
        call()
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        forward = median(lambda: fn(x0, t_hat))
        with forward_ad_attention(transformer):
            forward_math = median(lambda: fn(x0, t_hat))
    jvp = median(lambda: ExactJVP()(fn, (x0, t_hat), tangents, networks=[transformer]))
    return {"forward_s": forward, "forward_math_s": forward_math, "jvp_s": jvp}


def markdown(result: dict) -> str:
    lines = [f"JVP tangents through PixArt-Σ's time embedding ({result['cpu']}, {result['threads']} threads, torch "
             f"{result['torch']}, float32). Norms are per-element RMS, mean over the batch. "
             "N: the network's ε channels; ∂N/∂t̂: the time term (tangent (0, 1)); ∂N/∂x·v: the latent term along the "
             "ODE direction v = dx_t/dt̂; ratio = time term / latent term. cond rate: ‖∂c/∂t̂‖/‖c‖ of adaLN's "
             "modulation vector c (x_t turns at ≈ 1 per unit t̂). ε-param. dF/dt̂: the total tangent of "
             "F = (N − sin t̂·x_t)/cos t̂. SANA dc/dt̂: its 1000·t_RF embedding's slope at the same t̂, for comparison "
             "(derived, not measured).", ""]
    for model in result["models"]:
        c = model["cost"]
        lines += [f"**{model['model']}**, batch {model['batch']} — forward {1000 * c['forward_s']:.0f} ms "
                  f"(fused attention), {1000 * c['forward_math_s']:.0f} ms (math attention), "
                  f"exact JVP {1000 * c['jvp_s']:.0f} ms "
                  f"({c['jvp_s'] / c['forward_s']:.1f}× the forward)", "",
                  "| t | t̂ | dt/dt̂ | SANA dc/dt̂ | ‖N‖ | ‖∂N/∂t̂‖ | ‖∂N/∂t‖ per timestep | ‖∂N/∂x·v‖ | ratio | "
                  "cos t̂ sin t̂·‖∂N/∂t̂‖ | cond rate | ε-param. ‖dF/dt̂‖ |", "|---" * 12 + "|"]
        for r in model["rows"]:
            lines.append(f"| {r['t']} | {r['t_hat']:.4f} | {r['dt_dt_hat']:.0f} | {r['sana_dc_dt_hat']:.0f} | "
                         f"{r['out']:.3f} | {r['time_term']:.3g} | {r['per_timestep']:.3g} | {r['x_term']:.3g} | "
                         f"{r['ratio']:.3g} | {r['scm_time_term']:.3g} | {r['cond_rate']:.3g} | "
                         f"{r['eps_F_total']:.3g} |")
        if model["fd"]:
            lines += ["", "Finite differences against the exact JVP, sCM's tangent cos t̂ sin t̂·(v, 1), relative "
                      "error (central / backward):", "",
                      "| step h | " + " | ".join(f"t = {t}" for t in FD_TIMESTEPS) + " |",
                      "|---|" + "---|" * len(FD_TIMESTEPS)]
            for step in FD_STEPS:
                cells = []
                for t in FD_TIMESTEPS:
                    pair = {r["scheme"]: r["rel_error"] for r in model["fd"] if r["t"] == t and r["step"] == step}
                    cells.append(f"{pair['central']:.1e} / {pair['backward']:.1e}")
                lines.append(f"| {step:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="layers of the real-width transformer (of 28)")
    parser.add_argument("--canvas", type=int, default=32, help="latent canvas of the real-width transformer")
    parser.add_argument("--tokens", type=int, default=32, help="text tokens of the real-width transformer")
    parser.add_argument("--models", default="toy,real", help="toy, real or both")
    parser.add_argument("--pretrained", default=None,
                        help="a real PixArt-Σ checkpoint (folder or hub id) instead of random real-width weights")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = []
    if "toy" in args.models:
        models.append(measure(toy_world(args.batch), fd=True))
    if "real" in args.models:
        world = real_width(min(args.batch, 2), args.layers, args.canvas, args.tokens, args.pretrained)
        models.append(measure(world, fd=False))
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "models": models}
    write_report(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
