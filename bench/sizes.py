"""`make sizes`: what each architecture is at a size and context: dimensions, parameters, FLOPs, state.

    python -m bench.sizes --size 125m --ctx 2k [--match flops|params|flops,params] [--vocab 32000]
                          [--arch all] [--profile cpu] [--task lm] [--results results] [-- overrides ...]

Sizes, contexts and match rules take comma lists; every combination is a block of the table. The
table is printed and written to RESULTS/sizes.csv. Each model is the one `make sweep` would train:
its config composed as the run composes it (bench/config.py: the profile, the task's budget and any
override apply; MATCH defaults to the profile's). The counts are architectures/accounting.py's (a
multiply-add = 2 FLOPs, attention causal-halved, training = 3 x forward); the widths are
architectures/sizing.py's. `token_budget` is the run's training tokens (the same for every
architecture: matched FLOPs per token then means matched training compute; empty where the task
sets its budget in examples x epochs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from architectures.sizing import MATCH_RULES, REFERENCE_ARCH, Sized, SizingError
from bench.config import (UsageError, compose_all, default_ladder, group_options, model_config, parse_archs,
                          parse_choice, parse_ctx, parse_list)
from bench.results import atomic_write_text
from bench.train import run_tokens

BYTE_VOCAB = 257  # tasks/lm's byte tokenizer: what `make sweep` trains with on the embedded data
COLUMNS = ["arch", "size", "ctx", "match", "vocab", "layers", "d_model", "heads", "params", "non_embedding_params",
           "fwd_flops_per_token", "train_flops_per_token", "state_size", "token_budget",
           "ffn_dim", "d_inner", "flops_vs_ref", "params_vs_ref"]


def token_budget(cfg, sized: Sized) -> int | None:
    """The training tokens the run of `cfg` trains (bench/train.py: run_tokens), None where the task sets its
    budget itself (examples x epochs)."""
    return None if cfg.trainer.get("tokens") is None else run_tokens(cfg, sized.reference.train_flops)[0]


def size_rows(archs: list[str], sizes: list[str], ctxs: list[int], matches: list[str] | None, vocab: int,
              profile: str = "cpu", task: str = "lm", overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (size, ctx, match, arch); matches None: the profile's match rule."""
    archs = sorted(archs, key=lambda a: (a != REFERENCE_ARCH, a))  # the reference first
    points = [(size, ctx, match, arch) for size in sizes for ctx in ctxs for match in (matches or [None])
              for arch in archs]
    configs = compose_all([f"arch={arch}", f"size={size}", f"ctx={ctx}", f"profile={profile}", f"task={task}",
                           *([f"match={match}"] if match else []), *overrides] for size, ctx, match, arch in points)
    rows = []
    for cfg in configs:
        sized = model_config(cfg, vocab)
        rows.append({**sized.row(), "size": str(cfg.size.name), "ctx": int(cfg.ctx), "token_budget": token_budget(cfg, sized)})
    return pd.DataFrame(rows, columns=COLUMNS)


def format_table(df: pd.DataFrame) -> str:
    """Human units: parameters in millions, FLOPs per token in MFLOPs, state in thousands of numbers."""
    out = pd.DataFrame({
        "arch": df["arch"], "size": df["size"], "ctx": df["ctx"], "match": df["match"], "vocab": df["vocab"],
        "layers": df["layers"], "d_model": df["d_model"],
        "heads": df["heads"].map(lambda h: "-" if pd.isna(h) else str(int(h))),
        "ffn|d_inner": [str(int(f)) if not pd.isna(f) else str(int(i)) if not pd.isna(i) else "-"  # ffn=false: none
                        for f, i in zip(df["ffn_dim"], df["d_inner"])],
        "params(M)": (df["params"] / 1e6).map("{:.2f}".format),
        "non-emb(M)": (df["non_embedding_params"] / 1e6).map("{:.2f}".format),
        "fwd MFLOP/tok": (df["fwd_flops_per_token"] / 1e6).map("{:.2f}".format),
        "train MFLOP/tok": (df["train_flops_per_token"] / 1e6).map("{:.2f}".format),
        "vs ref": df["flops_vs_ref"].map("{:.3f}".format),
        "params vs ref": df["params_vs_ref"].map("{:.3f}".format),
        "state(k)": (df["state_size"] / 1e3).map("{:.1f}".format),
        "tokens": df["token_budget"].map(lambda n: "-" if pd.isna(n) else f"{int(n):,}"),
    })
    return out.to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make sizes", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="", help="conf/size names, comma list (default: the profile's ladder)")
    p.add_argument("--ctx", default="2k", help="2k, 32k, ... comma list")
    p.add_argument("--match", default="", help="flops | params | flops,params (default: the profile's)")
    p.add_argument("--vocab", default=str(BYTE_VOCAB),
                   help=f"vocabulary size (default {BYTE_VOCAB}: the byte tokenizer; 32000: Llama-2, the paper's)")
    p.add_argument("--arch", default="all", help="a name, a comma list, or 'all'")
    p.add_argument("--profile", default="cpu", help="cpu | smoke | paper: the runs' profile")
    p.add_argument("--task", default="lm", help="the runs' task (its budget may change the models, e.g. no FFN)")
    p.add_argument("--results", default="results", help="output root: writes RESULTS/sizes.csv")
    p.add_argument("overrides", nargs="*", help="free Hydra overrides, as `make sweep` takes them")
    args = p.parse_args(argv)
    try:
        archs = parse_archs(args.arch)
        profile = parse_choice("PROFILE", args.profile, group_options("profile"))
        task = parse_choice("TASK", args.task, group_options("task"))
        sizes = (parse_list("SIZE", args.size, group_options("size")) if args.size
                 else default_ladder(task, profile))
        ctxs = [parse_ctx(c) for c in args.ctx.split(",") if c.strip()] or [parse_ctx("")]
        matches = parse_list("MATCH", args.match, list(MATCH_RULES)) if args.match.strip() else None
        if not args.vocab.isdigit() or int(args.vocab) <= 0:
            raise UsageError(f"VOCAB must be a positive integer; got {args.vocab!r}")
        df = size_rows(archs, sizes, ctxs, matches, int(args.vocab), profile, task, tuple(args.overrides))
    except (UsageError, SizingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(df))
    print("params: analytic (tests check them against the built models); FLOPs per token: a multiply-add = 2, "
          "attention causal-halved, train = 3 x fwd; state: numbers kept per sequence to decode at ctx; "
          "vs ref: train FLOPs (params) / the size's Transformer's")
    out = Path(args.results).expanduser().resolve() / "sizes.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, df.to_csv(index=False))
    print(f"[ttt-bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
