"""Which model a set of weights is: a content hash, so that a training objective and an evaluation can tell whether
they read the same model.

A figure computed with a model that the student's objective also read (a CLIP-based reward scored by a CLIP-based
metric) is not independent evidence of the student's quality. Rewards record the identities of the models they read
in the export's card (`objective_models`); scorers name the models they read; the evaluation compares the two by
identity, not by name, so a copied or renamed checkpoint is still recognised.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(path: str | Path) -> str:
    """sha256 (16 hex digits) of a weights file, or of a folder's weight files in name order."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weights under {path}")
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(_file_digest(str(f.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]
