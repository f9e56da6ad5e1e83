"""Long-context QA examples generated offline: pure functions of (config, seed), exact lengths.

Each generator returns an `Example`: token ids of the whole sequence (prompt + answer) of exactly the
requested length, and the positions of the answer tokens (the only ones scored). Text tasks use the
byte tokenizer (ids 0..255, 256 = EOS); MQAR uses its own symbols above the byte range.

    passkey            Mohtashami & Jaggi 2023: filler, "The pass key is NNNNN. Remember it." at a depth,
                       the question at the end; answer the number.
    niah_single        RULER-style needle "One of the special magic numbers for KEY is: VALUE." in a noise
                       haystack (repeated filler)
    niah_multikey      the same in a needle haystack: distractor needles with other keys
    niah_multivalue    several values for the one key; answer all of them, in order
    niah_multiquery    several keys, each with its value; answer every queried value
    variable_tracking  chains "VAR X = 12345", "VAR Y = VAR X", ... hidden in filler; answer every
                       variable holding the value, in chain order
    mqar               Zoology's multi-query associative recall: key-value pairs from disjoint symbol
                       halves, then queries of the keys; the value follows each query
    mqar_zoology       the same in Zoology's own layout and token space (its figure 2; TASK=mqar_zoology): a
                       vocabulary of its own (8192), keys and values from its two halves, zeros around the
                       queries, the value a label only
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

VERSION = 1  # bump when an example changes for the same (config, seed): cached sets are keyed by it
BYTE_VOCAB = 257  # bytes and EOS, tasks/lm/tokenizers.py
MQAR_KEYS = 256   # symbols for MQAR keys and, as many again, values: ids 257 .. 257 + 2 * 256
VOCAB = BYTE_VOCAB + 2 * MQAR_KEYS
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "eagle", "candle",
         "forest", "silver", "window", "garden", "rocket", "violet", "harbor", "meadow", "falcon")


@dataclass
class Example:
    task: str
    ids: list[int]            # the whole sequence, prompt then answer: exactly `length` tokens
    answer_pos: list[int]     # positions (into ids) of the answer tokens: each is predicted from ids[:pos]
    meta: dict = field(default_factory=dict)
    targets: list[int] | None = None  # the answer tokens when they are not ids[answer_pos] (mqar_zoology: the
                                      #   input there is 0, the value only a label); None: ids[answer_pos]

    @property
    def answer(self) -> list[int]:
        return list(self.targets) if self.targets is not None else [self.ids[p] for p in self.answer_pos]


def _b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _number(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _fill(n: int) -> list[int]:
    """Exactly n bytes of filler text."""
    unit = _b(FILLER)
    return (unit * (n // len(unit) + 1))[:n]


def _assemble(task: str, length: int, inserts: list[tuple[float, list[int]]], question: list[int],
              answer: list[int], meta: dict) -> Example:
    """Filler of exactly the right size with each insert placed at its depth (0 = start, 1 = just
    before the question), then the question and the answer: len(ids) == length."""
    body = length - len(question) - len(answer) - sum(len(x) for _, x in inserts)
    if body < 0:
        raise ValueError(f"{task}: length {length} is too short for its needles and question "
                         f"(needs at least {length - body})")
    cuts = sorted((min(max(d, 0.0), 1.0), x) for d, x in inserts)
    ids, used = [], 0
    for depth, x in cuts:
        upto = int(round(depth * body))
        ids += _fill(upto - used) + x if upto > used else x
        used = max(used, upto)
    ids += _fill(body - used)
    start = len(ids) + len(question)
    ids += question + answer
    assert len(ids) == length
    return Example(task, ids, list(range(start, start + len(answer))), meta)


def passkey(length: int, depth: float, seed: int) -> Example:
    rng = random.Random(f"passkey-{length}-{depth}-{seed}")
    key = _number(rng)
    needle = _b(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return _assemble("passkey", length, [(depth, needle)], _b("What is the pass key? The pass key is "),
                     _b(key), {"depth": depth, "key": key})


def _needle(key: str, value: str) -> list[int]:
    return _b(f"One of the special magic numbers for {key} is: {value}. ")


def _niah_question(key: str) -> list[int]:
    return _b(f"What are all the special magic numbers for {key} mentioned in the text? The special magic "
              f"numbers for {key} are: ")


def niah(length: int, depth: float, seed: int, variant: str = "single", n_distractors: int = 3,
         n_values: int = 2, n_queries: int = 2) -> Example:
    """RULER's needle-in-a-haystack variants (module docstring); the scored needle sits at `depth`,
    distractor / extra needles at depths drawn from the seed."""
    rng = random.Random(f"niah-{variant}-{length}-{depth}-{seed}")
    keys = []
    while len(keys) < 1 + max(n_distractors, n_queries):
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    if variant == "single":
        v = _number(rng, 7)
        return _assemble("niah_single", length, [(depth, _needle(keys[0], v))], _niah_question(keys[0]),
                         _b(v + "."), {"depth": depth})
    if variant == "multikey":
        v = _number(rng, 7)
        inserts = [(depth, _needle(keys[0], v))] + [(rng.random(), _needle(k, _number(rng, 7)))
                                                     for k in keys[1:1 + n_distractors]]
        return _assemble("niah_multikey", length, inserts, _niah_question(keys[0]), _b(v + "."), {"depth": depth})
    if variant == "multivalue":
        vs = [_number(rng, 7) for _ in range(n_values)]
        depths = [depth] + sorted(rng.random() for _ in vs[1:])
        order = sorted(range(n_values), key=lambda i: depths[i])  # the answer lists values in text order
        inserts = [(depths[i], _needle(keys[0], vs[i])) for i in range(n_values)]
        return _assemble("niah_multivalue", length, inserts, _niah_question(keys[0]),
                         _b(", ".join(vs[i] for i in order) + "."), {"depth": depth})
    if variant == "multiquery":
        qk = keys[:n_queries]
        vs = [_number(rng, 7) for _ in qk]
        inserts = [(depth if i == 0 else rng.random(), _needle(k, v)) for i, (k, v) in enumerate(zip(qk, vs))]
        question = _b(f"What are the special magic numbers for {', '.join(qk)}? They are: ")
        return _assemble("niah_multiquery", length, inserts, question, _b(", ".join(vs) + "."), {"depth": depth})
    raise ValueError(f"unknown NIAH variant {variant!r}; available: single, multikey, multivalue, multiquery")


def variable_tracking(length: int, seed: int, hops: int = 4) -> Example:
    """One chain of `hops` assignments spread through filler (in order); the answer names every
    variable of the chain."""
    rng = random.Random(f"vt-{length}-{hops}-{seed}")
    names = []
    while len(names) < hops:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    value = _number(rng)
    lines = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, hops)]
    depths = sorted(rng.random() for _ in lines)
    question = _b(f"Find all variables that are assigned the value {value} in the text above. Answer: ")
    return _assemble("variable_tracking", length, [(d, _b(x)) for d, x in zip(depths, lines)], question,
                     _b(" ".join(names) + "."), {"depth": depths[0], "hops": hops})


def mqar(length: int, n_pairs: int, seed: int, power: float = 0.5, n_symbols: int = MQAR_KEYS) -> Example:
    """Zoology's MQAR layout: k1 v1 k2 v2 ... kn vn, then a query region in which every key is asked once
    (in random order) at distinct slots drawn with a power-law preference for short gaps
    (weight (slot + 1)^-power); each query is the key followed by its value (scored). Unused
    positions of the query region hold EOS (256). Keys and values are drawn from the first n_symbols
    of their ranges (a smaller alphabet is learnt in fewer steps; Zoology's quick examples use 64)."""
    slots = (length - 2 * n_pairs) // 2  # a query takes two positions: the key, then its value
    if not n_pairs <= n_symbols <= MQAR_KEYS or n_pairs > slots:
        raise ValueError(f"mqar: {n_pairs} pairs need 4 x pairs <= length ({length}) and pairs <= symbols "
                         f"({n_symbols}) <= {MQAR_KEYS}")
    rng = random.Random(f"mqar-{length}-{n_pairs}-{seed}" + ("" if n_symbols == MQAR_KEYS else f"-{n_symbols}"))
    keys = rng.sample(range(n_symbols), n_pairs)
    values = [rng.randrange(n_symbols) for _ in keys]
    k_id = lambda k: BYTE_VOCAB + k
    v_id = lambda v: BYTE_VOCAB + MQAR_KEYS + v
    ids = [t for k, v in zip(keys, values) for t in (k_id(k), v_id(v))]
    free, chosen = list(range(slots)), []
    for _ in range(n_pairs):  # weighted sampling without replacement
        slot = rng.choices(free, weights=[(s + 1) ** -power for s in free])[0]
        free.remove(slot)
        chosen.append(slot)
    tail, answer_pos = [256] * (length - len(ids)), []
    for slot, i in sorted(zip(chosen, rng.sample(range(n_pairs), n_pairs))):
        tail[2 * slot], tail[2 * slot + 1] = k_id(keys[i]), v_id(values[i])
        answer_pos.append(len(ids) + 2 * slot + 1)
    ids += tail
    assert len(ids) == length
    return Example("mqar", ids, answer_pos, {"pairs": n_pairs})


ZOOLOGY_VOCAB = 8192  # Zoology's MQAR vocabulary (figure 2)


def mqar_zoology(length: int, n_pairs: int, seed, vocab: int = ZOOLOGY_VOCAB, power_a: float = 0.01) -> Example:
    """Zoology's `multiquery_ar` (zoology/data/multiquery_ar.py, figure 2's settings: random_non_queries
    false), one example of `length` tokens (the model reads length - 1 of them, as `to_tensors` cuts):

        k1 v1 k2 v2 ... kn vn | 0 .. 0 k_a 0 .. 0 k_b 0 ...      keys from 1 .. vocab/2 - 1, values from
                                                                 vocab/2 .. vocab - 1, each distinct
    The query region has (length - 1 - 2n) // 2 slots of two tokens; the n slots are drawn without
    replacement with probability proportional to a i^(a - 1) for slot i = 1, 2, ... (power_a a = 0.01:
    nearly 1 / i, early slots first), key j of the key-value region taking the j-th slot drawn. At a queried
    key the label is its value; the input after it stays 0 (`targets`). Token 0 fills every other
    position; the sequence is a pure function of (length, n_pairs, seed, vocab, power_a)."""
    context = 2 * n_pairs
    slots = (length - 1 - context) // 2
    if n_pairs < 1 or n_pairs > slots or n_pairs >= vocab // 2:
        raise ValueError(f"mqar_zoology: {n_pairs} pairs need 4 x pairs <= length - 1 ({length - 1}) and "
                         f"pairs < vocab / 2 ({vocab // 2})")
    rng = random.Random(f"mqar-zoology-{length}-{n_pairs}-{seed}-{vocab}-{power_a}")
    keys = rng.sample(range(1, vocab // 2), n_pairs)
    values = rng.sample(range(vocab // 2, vocab), n_pairs)
    ids = [t for k, v in zip(keys, values) for t in (k, v)] + [0] * (length - context)
    # weighted sampling without replacement (Efraimidis & Spirakis 2006): the n slots with the largest
    # log(u) / w, in that order, are distributed as n successive draws, np.random.choice's order
    score = lambda s: math.log(1.0 - rng.random()) / (power_a * (s + 1) ** (power_a - 1))
    drawn = sorted(range(slots), key=score, reverse=True)[:n_pairs]
    answer_pos = []
    for k, slot in zip(keys, drawn):  # key j of the key-value region takes the j-th slot drawn
        ids[context + 2 * slot] = k
        answer_pos.append(context + 2 * slot + 1)
    order = sorted(range(n_pairs), key=lambda j: answer_pos[j])
    assert len(ids) == length
    return Example("mqar", ids, [answer_pos[j] for j in order], {"pairs": n_pairs, "format": "zoology"},
                   targets=[values[j] for j in order])
