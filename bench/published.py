"""The published numbers of the TTT paper (Sun et al., arXiv 2407.04620), as data: results/published/*.csv
(results/published/README.md describes each file). Every row carries its source (e.g. "TTT v2 Table 1",
"v1 Fig 11") and its certainty: EXACT (printed in a table or the text) or APPROX (read off a figure), as
the transcription notes give them; nothing is interpolated.

    from bench.published import load
    load("table1")    # Table 1: the ablation from linear attention to TTT-Linear
    load("scaling")   # perplexity vs training FLOPs, Pile 2k and 8k, every architecture and size
    load("latency")   # forward time per token vs context, 1.3B on an A100
    load("token_index")  # perplexity by token index, Books 32k, FLOPs of Mamba 1.4B (v1 Fig 2 right)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "published"
CERTAINTIES = ("EXACT", "APPROX")

# name -> {column: dtype}, in file order; "source" and "certainty" end every file
SCHEMAS: dict[str, dict[str, str]] = {
    "table1": {"row": "int", "configuration": "str", "change": "str", "ppl": "float", "diff": "float",
               "size": "str", "data": "str", "ctx": "int", "source": "str", "certainty": "str"},
    "scaling": {"data": "str", "ctx": "int", "size": "str", "model_size": "str", "arch": "str", "label": "str",
                "ppl": "float", "train_flops": "float", "overlapping": "bool", "source": "str", "certainty": "str"},
    "latency": {"phase": "str", "ctx": "int", "arch": "str", "label": "str", "model_size": "str", "batch": "int",
                "hardware": "str", "seconds_per_token": "float", "overlapping": "bool", "source": "str",
                "certainty": "str"},
    "token_index": {"data": "str", "ctx": "int", "arch": "str", "label": "str", "model_size": "str", "position": "int",
                    "ppl": "float", "source": "str", "certainty": "str"},
}
OPTIONAL = {("table1", "diff")}  # may be empty (row 1 has no difference)


class PublishedDataError(ValueError):
    pass


def names() -> list[str]:
    return sorted(SCHEMAS)


def load(name: str) -> pd.DataFrame:
    """results/published/<name>.csv, its columns checked against SCHEMAS and typed; every row with a
    source and a certainty in CERTAINTIES. Raises PublishedDataError naming the file and the problem."""
    if name not in SCHEMAS:
        raise PublishedDataError(f"unknown published table {name!r}; available: {', '.join(names())}")
    path = PUBLISHED / f"{name}.csv"
    schema = SCHEMAS[name]
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != list(schema):
        raise PublishedDataError(f"{path}: columns {list(df.columns)}, expected {list(schema)}")
    for col, kind in schema.items():
        empty = df[col].str.strip() == ""
        if empty.any() and (name, col) not in OPTIONAL:
            raise PublishedDataError(f"{path}: empty {col!r} in rows {list(df.index[empty] + 2)} (line numbers)")
        try:
            if kind == "int":
                df[col] = df[col].astype(int)
            elif kind == "float":
                df[col] = pd.to_numeric(df[col].where(~empty), errors="raise").astype(float)
            elif kind == "bool":
                if not df[col].isin(["true", "false"]).all():
                    raise ValueError("expected true or false")
                df[col] = df[col] == "true"
        except ValueError as e:
            raise PublishedDataError(f"{path}: column {col!r} is not {kind}: {e}") from None
    bad = ~df["certainty"].isin(CERTAINTIES)
    if bad.any():
        raise PublishedDataError(f"{path}: certainty must be one of {CERTAINTIES}; "
                                 f"got {sorted(set(df['certainty'][bad]))}")
    return df
