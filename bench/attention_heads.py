"""Where a trained Transformer's attention heads look on MQAR: the recall circuit, measured.

Recall in MQAR takes two heads in order (the induction circuit, Olsson et al. 2022): a previous-token
head at the value positions of the key-value region (it writes "my key was k" into each value) in one
layer, then, in a later layer, a head at the query (key k) that attends to the value whose previous
token was k. Per layer and head this reports, over MQAR examples at the run's ctx:

    prev@values    attention of each value position of the key-value region on the key just before it
    match@query    attention of each query position on the value of its key (the answer)
    values@query   attention of each query position on all the values of the key-value region (a head
                   that spreads it evenly guesses "one of the values in context")
    window@query   (transformer_conv only) attention of each query position on every position whose
                   width-k short conv sees both its key and that key's value: the value and the k - 2
                   positions after it. With the conv one head suffices: it can read the answer there.

    python -m bench.attention_heads RESULTS/runs/<sweep>/<run> [--examples 32]

Transformer runs only (the other architectures have no attention maps to read).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from architectures.transformer import Attention
from tasks.longqa import generators as gen


@torch.no_grad()
def attention_maps(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Causal attention probabilities of every layer, (B, H, T, T) each, for inputs x (B, T).

    Recomputed from each attention module's input (captured by a hook) with `Attention.rotated_qk`,
    the queries and keys its forward scores."""
    attns = [getattr(block, "attn", None) for block in model.blocks]
    if not all(isinstance(a, Attention) for a in attns):
        raise ValueError("attention maps need a transformer (every block with softmax attention)")
    inputs: list[torch.Tensor] = []
    hooks = [a.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for a in attns]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for attn, a in zip(attns, inputs):
        T = a.shape[1]
        q, k = attn.rotated_qk(a)  # (B, H, T, f)
        scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        maps.append(scores.masked_fill(future, float("-inf")).softmax(-1))
    return maps


def _positions(e: gen.Example) -> tuple[list[int], list[int], list[int]]:
    """Value positions of the key-value region, the query positions (each holds a key; its next token
    is scored) and, for each query, the position of its key's value."""
    n = e.meta["pairs"]
    key_at = {e.ids[i]: i for i in range(0, 2 * n, 2)}
    queries = [answer - 1 for answer in e.answer_pos]
    return list(range(1, 2 * n, 2)), queries, [key_at[e.ids[t]] + 1 for t in queries]


def head_report(maps: list[torch.Tensor], examples: list[gen.Example], conv_width: int = 0) -> list[dict]:
    """prev@values, match@query and values@query (module docstring) per layer and head, averaged
    over the examples (MQAR, as `gen.mqar` lays them out: k1 v1 ... kn vn, then the queries); with a
    short conv of width conv_width also window@query."""
    positions = [_positions(e) for e in examples]
    rows = []
    for layer, p in enumerate(maps):  # p (B, H, T, T), row t = the position that predicts ids[t + 1]
        for head in range(p.shape[1]):
            prev, match, values, window = [], [], [], []
            for b, (value_pos, queries, answers) in enumerate(positions):
                a = p[b, head]  # (T, T)
                prev += a[value_pos, [v - 1 for v in value_pos]].tolist()
                match += a[queries, answers].tolist()
                values += a[queries][:, value_pos].sum(-1).tolist()
                if conv_width:
                    window += [a[q, v:v + conv_width - 1].sum().item() for q, v in zip(queries, answers)]
            mean = lambda xs: sum(xs) / len(xs)
            rows.append({"layer": layer, "head": head, "prev@values": mean(prev),
                         "match@query": mean(match), "values@query": mean(values)})
            if conv_width:
                rows[-1]["window@query"] = mean(window)
    return rows


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from bench.config import model_config
    from bench.train import CHECKPOINT
    from tasks import build_task
    from tasks.longqa.task import to_tensors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a transformer run of TASK=mqar (with checkpoint.pt)")
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    if "mqar" not in cfg.task.mixture or float(cfg.task.mixture.mqar) <= 0:
        raise SystemExit(f"{args.run_dir} did not train on MQAR")
    task = build_task(cfg, int(cfg.ctx))
    model = task.build_model(model_config(cfg, task.vocab_size).cfg)
    state = torch.load(args.run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    examples = [task.mqar.example(int(cfg.ctx) + 1, task.mqar_pairs, f"heads-{i}") for i in range(args.examples)]
    x, _ = to_tensors(examples)
    print(f"{args.run_dir.name}: {args.examples} MQAR examples of {cfg.ctx} tokens, {task.mqar_pairs} pairs")
    conv = getattr(model.blocks[0], "conv", None)
    rows = head_report(attention_maps(model, x), examples, conv.width if conv is not None else 0)
    columns = [c for c in rows[0] if "@" in c]
    print(f"{'layer':>5} {'head':>4} " + " ".join(f"{c:>12}" for c in columns))
    for r in rows:
        print(f"{r['layer']:>5} {r['head']:>4} " + " ".join(f"{r[c]:>12.2f}" for c in columns))


if __name__ == "__main__":
    main()
