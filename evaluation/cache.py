"""Resumable image generation: one PNG per (entry, prompt, seed), sharded across processes.

Layout: `<out_dir>/cache/<entry-key>/00000.png ...`, `entry.json` (what made the key) and
`manifest-<rank>.json` ({index: {prompt, seed, sha256}}), one manifest per process so that
processes never write the same file. A PNG is written under a temporary name and renamed, and
only then entered in the manifest (itself written to a temporary file and renamed), so an
interrupted run leaves at worst an image that no manifest vouches for: it is generated again.
On resume an image counts as done only if its manifest entry has the same prompt and seed and
the file's SHA-256 matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from pixsig_distill.faults import fault_point

from .prompts import ImageFiles


def entry_key(name: str, steps: int, settings: dict) -> str:
    """A readable folder name that changes whenever anything that shapes the images changes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "entry"
    return f"{slug}-{steps}step-{digest}"


def weights_fingerprint(folder: str | Path) -> str:
    """Size and mtime of a model folder's transformer weights: a retrained export gets new images."""
    folder = Path(folder)
    files = sorted(folder.glob("transformer/*.safetensors")) or sorted(folder.glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) or str(folder)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ImageCache:
    def __init__(self, folder: str | Path, settings: dict | None = None, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.manifest_path = self.folder / f"manifest-{rank}.json"
        self.mine = self._read(self.manifest_path)
        if settings is not None and rank == 0:
            _atomic_write(self.folder / "entry.json", json.dumps(settings, indent=1, default=str))

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # never written, or unreadable: trust nothing from it

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def done(self, prompts: list[str], seeds: list[int]) -> set[int]:
        """Indices whose image is complete and was made from the same prompt and seed."""
        manifest = {}
        for path in sorted(self.folder.glob("manifest-*.json")):
            manifest.update(self._read(path))
        ok = set()
        for key, record in manifest.items():
            i = int(key)
            if (i < len(prompts) and record.get("prompt") == prompts[i] and record.get("seed") == seeds[i]
                    and self.path(i).is_file() and _sha256(self.path(i)) == record.get("sha256")):
                ok.add(i)
        return ok

    def put(self, indices: list[int], images, prompts: list[str], seeds: list[int]) -> None:
        for i, image in zip(indices, images):
            tmp = self.folder / f".{i:05d}.png.tmp{os.getpid()}"
            Image.fromarray(image).save(tmp, format="PNG")
            tmp.replace(self.path(i))
            fault_point("image")  # tests/test_faults.py: an image no manifest vouches for is made again
            self.mine[str(i)] = {"prompt": prompts[i], "seed": seeds[i], "sha256": _sha256(self.path(i))}
        _atomic_write(self.manifest_path, json.dumps(self.mine))

    def files(self, n: int) -> ImageFiles:
        return ImageFiles([self.path(i) for i in range(n)])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def generate_cached(load_model, cache: ImageCache, prompts: list[str], seeds: list[int], steps: int,
                    guidance_scale: float | None, timesteps: list[int] | None, batch_size: int, accelerator,
                    desc: str, progress: bool = True) -> int:
    """Generate the images `cache` lacks, this process's share of them; returns how many it made.

    `load_model()` is called only if something is missing, so a finished entry costs no loading.
    Every process reads the cache before any writes to it (the barrier), so all agree on the work
    list; `split_between_processes` then gives each a contiguous slice of it.
    """
    from pixsig_distill.sampling import generate_images  # imports diffusers: only when there is something to do

    todo = sorted(set(range(len(prompts))) - cache.done(prompts, seeds))
    accelerator.wait_for_everyone()
    made = 0
    with accelerator.split_between_processes(todo) as mine:
        if mine:
            model = load_model()
            bar = tqdm(total=len(mine), desc=desc, disable=not (progress and accelerator.is_local_main_process))
            for start in range(0, len(mine), batch_size):
                chunk = mine[start:start + batch_size]
                images, _ = generate_images(model, [prompts[i] for i in chunk], [seeds[i] for i in chunk],
                                                     steps, guidance_scale, timesteps, batch_size, progress=False)
                cache.put(chunk, images, prompts, seeds)
                made += len(chunk)
                bar.update(len(chunk))
            bar.close()
    accelerator.wait_for_everyone()
    return made
