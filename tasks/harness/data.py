"""The local lm-eval tasks' data: JSON-lines files generated from the suite's own held-out text and
long-context generators, once per machine (TTT_BENCH_CACHE/harness/), then read by lm-eval through
`custom_dataset: !function data.<name>` in the task YAML files next to this one.

Every set is a pure function of its parameters and a fixed seed, built from the validation plays of
conf/data/shakespeare.yaml (never seen in training) or from tasks/longqa/generators.py.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # lm-eval imports this file by path, outside the package
    sys.path.insert(0, str(_ROOT))

from tasks.cache import cache_dir, config_hash  # noqa: E402

VERSION = 1  # bump when a generated example changes


def held_out_plays() -> list:
    """The validation documents of the Shakespeare data config (the plays no run trains on)."""
    from omegaconf import OmegaConf

    from tasks.lm.data import load_corpus

    return load_corpus(OmegaConf.load(_ROOT / "conf" / "data" / "shakespeare.yaml")).val


def _verse_lines(text: str) -> list[tuple[int, str]]:
    """(offset, line) of spoken lines: not headings, speaker names or stage directions; 20-80 characters."""
    out, offset = [], 0
    for line in text.split("\n"):
        body = line.rstrip()
        if 20 <= len(body) <= 80 and not body.startswith(("#", "**", "_", "[")):
            out.append((offset, line + "\n"))
        offset += len(line) + 1
    return out


def build_shakespeare_mc(n: int = 100, context_chars: int = 400, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Which line comes next? The 400 characters of a held-out play before a spoken line, the true line and
    three spoken lines from elsewhere in the held-out plays (multiple choice, acc and acc_norm)."""
    rng = random.Random(f"shakespeare_mc-{seed}")
    docs = held_out_plays()
    pool = [(d.text, off, line) for d in docs for off, line in _verse_lines(d.text) if off >= context_chars]
    picks = rng.sample(range(len(pool)), n)
    rows = []
    for i in picks:
        text, off, line = pool[i]
        distractors = []
        while len(distractors) < n_choices - 1:
            other = pool[rng.randrange(len(pool))][2]
            if other != line and other not in distractors:
                distractors.append(other)
        choices = distractors[:]
        label = rng.randrange(n_choices)
        choices.insert(label, line)
        rows.append({"context": text[off - context_chars:off], "choices": choices, "label": label})
    return rows


def build_shakespeare_lastword(n: int = 100, context_chars: int = 400, seed: int = 0) -> list[dict]:
    """LAMBADA-style: a held-out passage that ends a spoken line with a word of 4+ letters; predict that
    word (loglikelihood: perplexity, and acc = the word is the greedy continuation)."""
    rng = random.Random(f"shakespeare_lastword-{seed}")
    docs = held_out_plays()
    pool = []
    for d in docs:
        for off, line in _verse_lines(d.text):
            words = line.rstrip().split(" ")
            last = words[-1]
            if off >= context_chars and len(words) > 3 and last.isalpha() and len(last) >= 4:
                end = off + len(line.rstrip()) - len(last)  # the passage stops just before the word
                pool.append({"text": d.text[end - context_chars:end], "word": last})
    return [pool[i] for i in rng.sample(range(len(pool)), n)]


def build_shakespeare_rolling(chars: int = 6000) -> list[dict]:
    """Whole held-out scenes, the first `chars` characters of each of the first two scenes of every
    held-out play: scored by loglikelihood_rolling (bits per byte, word and byte perplexity), so
    documents longer than a run's context go through its recurrent state or in windows."""
    rows = []
    for d in held_out_plays():
        scenes = d.text.split("### SCENE")[1:3]
        rows += [{"page": f"### SCENE{s}"[:chars]} for s in scenes]
    return rows


def build_passkey(length: int = 1024, depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0), per_depth: int = 4) -> list[dict]:
    """The passkey prompt of tasks/longqa (filler, the key at a depth, the question at the end) as text;
    the model generates the 5-digit key (generate_until, exact match)."""
    from tasks.longqa import generators

    rows = []
    for depth in depths:
        for seed in range(per_depth):
            ex = generators.passkey(length, depth, 10_000 + seed)  # seeds apart from training's
            rows.append({"prompt": bytes(ex.ids[:ex.answer_pos[0]]).decode("utf-8"),
                         "answer": bytes(ex.answer).decode("utf-8"), "depth": depth})
    return rows


BUILDERS = {"shakespeare_mc": build_shakespeare_mc, "shakespeare_lastword": build_shakespeare_lastword,
            "shakespeare_rolling": build_shakespeare_rolling, "passkey": build_passkey}


def jsonl_path(name: str, **params) -> Path:
    """Generate the set once (atomically) and return its JSON-lines file."""
    root = cache_dir()
    root = (root.parent if root is not None else Path.home() / ".cache" / "ttt-bench") / "harness"
    path = root / f"{name}-{config_hash({'name': name, 'version': VERSION, **params})}.jsonl"
    if not path.exists():
        rows = BUILDERS[name](**params)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # renamed into place: readers see the whole file or none
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    return path


def _dataset(name: str, **params):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(jsonl_path(name, **params)))})


# lm-eval calls these with the task's metadata (version, ...) as keyword arguments
def shakespeare_mc(**_):
    return _dataset("shakespeare_mc")


def shakespeare_lastword(**_):
    return _dataset("shakespeare_lastword")


def shakespeare_rolling(**_):
    return _dataset("shakespeare_rolling")


def passkey(**_):
    return _dataset("passkey")
