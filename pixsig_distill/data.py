"""Prompts and cached text embeddings.

Training never needs T5 in memory: `cache_text` runs T5 once over a prompt file and writes
safetensors shards (as the PixArt recipe precomputes T5 features); `CachedTextDataset` reads them.
Shards store the valid tokens only, back to back (`embeds` (N_tokens, D), `lengths` (N,)), so a
300-token budget costs nothing for short captions; items are re-padded to one length on read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .errors import UserError

MAX_PROMPT_CHARS = 2000  # far above any caption; a longer line means the file is not a prompt list


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines skipped. Bad files → UserError."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"prompt file '{path}' is a directory; pass a UTF-8 text file with one prompt per line")
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist; pass a UTF-8 text file with one prompt per line")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UserError(f"prompt file '{path}' is binary; pass a UTF-8 text file with one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file '{path}' is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' has no prompts; write one prompt per line")
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"prompt {number} of '{path}' has {len(prompt)} characters (limit {MAX_PROMPT_CHARS}); "
                            f"is this really a prompt file?")
    return prompts


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("empty prompt; give a non-empty prompt (or a prompt file with one prompt per line)")
    return prompts


class PromptDataset(Dataset):
    """Plain prompts (from a list or a file); the teacher encodes them on the fly."""

    def __init__(self, prompts: list[str] | None = None, prompt_file: str | None = None):
        self.prompts = check_prompts(list(prompts) if prompts is not None else read_prompt_file(prompt_file))

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt": self.prompts[i]}


# ---- cached T5 embeddings ------------------------------------------------------------------------

INDEX = "index.json"


def write_text_cache(out_dir: str | Path, prompts: list[str], encode, null: tuple[torch.Tensor, torch.Tensor],
                     shard_size: int = 1024, batch_size: int = 32, meta: dict | None = None, progress=None,
                     extras=None) -> Path:
    """Encode `prompts` with `encode(list[str]) -> (embeds, mask)` into safetensors shards.

    `extras(embeds, mask, first_index) -> {name: (B, ...) tensor}` adds per-prompt tensors to the shards
    (the teacher's noise → latents pairs for DMD's regression loss). The shards are written under
    temporary names and the index last, so a folder with an index is always complete.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # an old index must not vouch for shards this run is replacing
    shards, longest, dim, dtype = [], 1, None, None
    for start in range(0, len(prompts), shard_size):
        chunk = prompts[start:start + shard_size]
        tokens, lengths, extra = [], [], {}
        for b in range(0, len(chunk), batch_size):
            embeds, mask = encode(chunk[b:b + batch_size])
            for name, value in (extras(embeds, mask, start + b) if extras else {}).items():
                extra.setdefault(name, []).append(value.cpu())
            for e, m in zip(embeds, mask):
                n = int(m.sum())
                tokens.append(e[:n].cpu())
                lengths.append(n)
                longest, dim, dtype = max(longest, n), e.shape[-1], e.dtype
            if progress is not None:
                progress.update(len(chunk[b:b + batch_size]))
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {"embeds": torch.cat(tokens).contiguous(), "lengths": torch.tensor(lengths),
                   **{k: torch.cat(v).contiguous() for k, v in extra.items()}}
        _atomic_save(save_file, tensors, out / name, {"prompts": json.dumps(chunk)})
        shards.append({"file": name, "count": len(chunk)})
    null_embeds, null_mask = null
    n = int(null_mask[0].sum())
    _atomic_save(save_file, {"embeds": null_embeds[0, :n].cpu().contiguous()}, out / "null.safetensors", {})
    index = {"count": len(prompts), "dim": int(dim), "dtype": str(dtype), "max_length": longest, "shards": shards,
             **(meta or {})}
    tmp = out / f"{INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(out / INDEX)
    return out


def _atomic_save(save_file, tensors, path: Path, metadata):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # processes encoding the same folder at once do not collide
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


class CachedTextDataset(Dataset):
    """Reads a folder written by `write_text_cache`; items are padded to `max_length` tokens."""

    def __init__(self, folder: str | Path, max_length: int | None = None):
        self.folder = Path(folder).expanduser()
        index_file = self.folder / INDEX
        if not index_file.is_file():
            raise UserError(f"'{self.folder}' is not a complete text-embedding cache (no {INDEX}); "
                            f"create it with python -m pixsig_distill.cache_text")
        self.index = json.loads(index_file.read_text())
        self.max_length = max_length or self.index["max_length"]
        self.prompts, self.items = [], []  # items: (shard file, token offset, length, row in shard)
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            try:
                with safe_open(path, "pt") as f:
                    lengths = f.get_tensor("lengths").tolist()
                    self.prompts += json.loads(f.metadata()["prompts"])
                    self.extra_keys = [k for k in f.keys() if k not in ("embeds", "lengths")]
            except Exception as err:
                raise UserError(f"text-embedding shard '{path}' is missing or corrupt ({err}); "
                                f"re-create the cache with python -m pixsig_distill.cache_text") from None
            offset = 0
            for row, n in enumerate(lengths):
                self.items.append((path, offset, n, row))
                offset += n
        self._open = {}

    def __len__(self):
        return len(self.items)

    def _file(self, path):
        if path not in self._open:  # safe_open memory-maps: cheap to keep, and each worker keeps its own
            self._open[path] = safe_open(path, "pt")
        return self._open[path]

    def _pad(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(tokens.shape[0], self.max_length)
        embeds = tokens.new_zeros(self.max_length, tokens.shape[-1])
        embeds[:n] = tokens[:n]
        mask = torch.zeros(self.max_length, dtype=torch.long)
        mask[:n] = 1
        return embeds, mask

    def __getitem__(self, i):
        path, offset, n, row = self.items[i]
        f = self._file(path)
        embeds, mask = self._pad(f.get_slice("embeds")[offset:offset + n])
        item = {"prompt": self.prompts[i], "embeds": embeds, "mask": mask}
        for key in self.extra_keys:  # e.g. the teacher's noise and latents of a DMD regression pair
            item[key] = f.get_slice(key)[row:row + 1][0]
        return item

    def preview_rows(self, wanted: list[str]) -> list[int]:
        """Rows for training previews without T5: the `wanted` prompts that are in the cache, else the first
        len(wanted) cached prompts (put the preview prompts in the prompt file to preview exactly those)."""
        where: dict[str, int] = {}
        for row, prompt in enumerate(self.prompts):
            where.setdefault(prompt, row)
        rows = [where[p] for p in dict.fromkeys(wanted) if p in where]
        return rows or list(range(min(len(wanted), len(self))))

    def check_teacher(self, teacher) -> None:
        """Embeddings of another text encoder (another width) than the teacher's: refused in one line."""
        wanted = teacher.transformer.config.caption_channels
        if int(self.index["dim"]) != wanted:
            raise UserError(f"text cache '{self.folder}' holds {self.index['dim']}-wide embeddings (from "
                            f"{self.index.get('model', 'another model')}) but the teacher's transformer reads "
                            f"{wanted}-wide ones; re-create the cache with this teacher's model= "
                            f"(python -m pixsig_distill.cache_text)")

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prompt embedding (L, D) and mask (L,), for CFG without T5."""
        with safe_open(self.folder / "null.safetensors", "pt") as f:
            return self._pad(f.get_tensor("embeds"))
