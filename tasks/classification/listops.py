"""ListOps as in Long Range Arena (Tay et al. 2021; Nangia & Bowman 2018), generated offline.

An expression tree over the digits 0-9 with the operators MIN, MAX, MED (the median, truncated to an
integer as LRA's generator does) and SM (sum modulo 10), each taking 2..max_args arguments, nested up
to max_depth; written as LRA writes it, e.g. "[MAX 4 3 [MIN 2 3 ] 1 0 ]"; the label (10 classes) is
its value. `example(seed, min_len, max_len)` is a pure function of its arguments: it grows a tree from
a generator seeded by them (random leaves become operators) until the text's length (in bytes, the
byte tokenizer's tokens) reaches min_len, and retries if it overshot max_len.
"""
from __future__ import annotations

import random
import statistics

OPERATORS = {
    "MIN": min,
    "MAX": max,
    "MED": lambda xs: int(statistics.median(xs)),
    "SM": lambda xs: sum(xs) % 10,
}

VERSION = 1  # bump when an expression changes for the same arguments: cached sets are keyed by it


def _grow(rng: random.Random, min_len: int, max_len: int, max_depth: int, max_args: int):
    """Grow a tree by replacing random leaves (above max_depth) with operators over new leaves until
    its text is at least min_len long. Returns (tree, text length); the length may overshoot max_len."""
    def node(depth):
        return [rng.choice(list(OPERATORS)), [rng.randrange(10) for _ in range(rng.randint(2, max_args))], depth]

    root = node(1)
    length = len(root[0]) + 2 * len(root[1]) + 3  # "[OP " + digits joined by spaces + " ]"
    leaves = [(root, i) for i in range(len(root[1]))]
    while length < min_len:
        open_leaves = [k for k, (n, _) in enumerate(leaves) if n[2] < max_depth]
        if not open_leaves:
            break
        parent, i = leaves.pop(rng.choice(open_leaves))  # by position: equal-looking nodes are distinct
        child = node(parent[2] + 1)
        parent[1][i] = child
        leaves += [(child, j) for j in range(len(child[1]))]
        length += len(child[0]) + 2 * len(child[1]) + 2  # replaces a 1-character digit
    return root, length


def _as_tree(n):
    return n if isinstance(n, int) else (n[0], [_as_tree(c) for c in n[1]])


def value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    return OPERATORS[op]([value(a) for a in args])


def render(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    return f"[{op} " + " ".join(render(a) for a in args) + " ]"


def example(seed, min_len: int, max_len: int, max_depth: int = 10, max_args: int = 10,
            tries: int = 10_000) -> tuple[str, int]:
    """(expression text, label) with min_len <= len(text) <= max_len."""
    if min_len > max_len or max_len < 5:
        raise ValueError(f"ListOps lengths: need 5 <= max_len and min_len <= max_len, got {min_len}..{max_len}")
    rng = random.Random(f"listops-{seed}-{min_len}-{max_len}-{max_depth}-{max_args}")
    for _ in range(tries):
        grown, length = _grow(rng, min_len, max_len, max_depth, max_args)
        if min_len <= length <= max_len:
            tree = _as_tree(grown)
            text = render(tree)
            assert len(text) == length
            return text, value(tree)
    raise ValueError(f"no ListOps expression of length {min_len}..{max_len} in {tries} tries "
                     f"(max_depth={max_depth}, max_args={max_args})")
