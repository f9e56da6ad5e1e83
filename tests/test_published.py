"""results/published/: every CSV loads with its schema, every row has a source and a certainty, and the
numbers are the transcription notes' (paper_numbers.md, parsed cell by cell in the slow tier, which needs
the notes; a few key numbers are checked always)."""
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from bench import published
from bench.published import PublishedDataError

ROOT = Path(__file__).resolve().parent.parent
# the transcription notes the CSVs were entered from: TTT_BENCH_NOTES, else shared/ beside or inside the repo
NOTES = [Path(os.environ["TTT_BENCH_NOTES"])] if os.environ.get("TTT_BENCH_NOTES") else [
    p / "notes" / "paper_numbers.md" for p in (ROOT / "shared", ROOT.parent / "shared")]


@pytest.mark.parametrize("name", published.names())
def test_every_table_loads_with_source_and_certainty(name):
    df = published.load(name)
    assert len(df) > 0
    assert (df["source"].str.strip() != "").all()
    assert df["certainty"].isin(published.CERTAINTIES).all()


def test_key_numbers():
    t1 = published.load("table1").set_index("row")
    assert list(t1["ppl"]) == [15.91, 15.23, 15.23, 15.27, 14.05, 12.35, 11.99, 11.09]
    assert (t1["certainty"] == "EXACT").all() and pd.isna(t1.loc[1, "diff"]) and t1.loc[6, "diff"] == -1.70
    # each diff is the step between rows, as printed
    assert (t1["ppl"].diff().round(2)[1:] == t1["diff"][1:]).all()
    s = published.load("scaling").set_index(["ctx", "size", "arch"])
    assert len(s) == 2 * 4 * 6 and (s["certainty"] == "APPROX").all()
    assert s.loc[(2048, "125M", "ttt_linear"), ["ppl", "train_flops"]].tolist() == [11.09, 1.3e18]  # = Table 1 row 8
    assert s.loc[(8192, "1.3B", "transformer"), ["ppl", "train_flops"]].tolist() == [5.87, 3.2e20]
    assert s.loc[(2048, "350M", "mamba"), "overlapping"] and s.loc[(2048, "350M", "mamba"), "model_size"] == "370M"
    lat = published.load("latency").set_index(["ctx", "arch"])
    assert lat.loc[(32768, "transformer"), "seconds_per_token"] == 3.45e-5
    assert lat.loc[(8192, "ttt_linear"), "seconds_per_token"] == 1.91e-5


def test_arch_names_are_registered():
    import architectures

    for name in ("scaling", "latency", "token_index"):
        assert set(published.load(name)["arch"]) <= set(architectures.names())


def test_a_bad_file_is_named_with_its_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(published, "PUBLISHED", tmp_path)
    good = (ROOT / "results" / "published" / "table1.csv").read_text()
    (tmp_path / "table1.csv").write_text(good.replace(",EXACT\n", ",\n", 1))
    with pytest.raises(PublishedDataError, match="empty 'certainty'"):
        published.load("table1")
    (tmp_path / "table1.csv").write_text(good.replace(",EXACT\n", ",GUESS\n", 1))
    with pytest.raises(PublishedDataError, match="certainty must be one of"):
        published.load("table1")
    with pytest.raises(PublishedDataError, match="unknown published table"):
        published.load("table2")


# -- against the notes, cell by cell -----------------------------------------------------------

def notes() -> str:
    for p in NOTES:
        if p.exists():
            return p.read_text()
    pytest.fail(f"paper_numbers.md not found (looked in {', '.join(map(str, NOTES))}); these slow-tier checks "
                f"compare results/published with it: set TTT_BENCH_NOTES=<path to paper_numbers.md>")


def md_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after the line that starts with `heading` (header row dropped)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


def num(cell: str) -> float:
    return float(cell.replace("**", "").replace("~", "").replace("−", "-").replace("+", "").strip())


@pytest.mark.slow
def test_table1_equals_the_notes():
    rows = md_table(notes(), "## 1. Table 1")
    t1 = published.load("table1")
    assert len(rows) == len(t1) == 8
    for cells, (_, r) in zip(rows, t1.iterrows()):
        assert int(cells[0]) == r["row"]
        assert cells[1].startswith(r["configuration"].split(" [")[0]) or r["configuration"] in cells[1]
        assert cells[2].replace("**", "") == r["change"]
        assert num(cells[3]) == r["ppl"]
        assert (cells[4] == "–" and pd.isna(r["diff"])) or num(cells[4]) == r["diff"]
        assert cells[5].startswith(r["source"])  # row 8 adds a remark after "; "


@pytest.mark.parametrize("ctx,heading", [(2048, "### 2a."), (8192, "### 2b.")])
@pytest.mark.slow
def test_scaling_equals_the_notes(ctx, heading):
    text = notes()
    header = next(line for line in text[text.index(heading):].splitlines() if line.startswith("|"))
    labels = [c.strip() for c in header.strip("|").split("|")][1:-1]  # between "size" and "source"
    s = published.load("scaling")
    s = s[s["ctx"] == ctx].set_index(["size", "label"])
    cells = 0
    for row in md_table(text, heading):
        size, values = row[0], row[1:-1]
        for label, cell in zip(labels, values):
            ppl, flops = cell.split("@")
            got = s.loc[(size, label)]
            assert (got["ppl"], got["train_flops"]) == (num(ppl), float(flops)), (size, label)
            assert got["overlapping"] == ppl.strip().startswith("~")
            cells += 1
    assert cells == len(s) == 24


@pytest.mark.slow
def test_latency_equals_the_notes():
    rows = md_table(notes(), "**v1 Fig 3")
    lat = published.load("latency").set_index(["ctx", "label"])
    assert len(rows) * 3 == len(lat) == 15
    for ctx, *values, source in rows:
        for label, cell in zip(["Transformer", "Mamba", "TTT-Linear"], values):
            got = lat.loc[(int(ctx.rstrip("k")) * 1024, label)]
            assert got["seconds_per_token"] == pytest.approx(num(cell) * 1e-5, rel=1e-12)
            assert got["overlapping"] == cell.startswith("~") and source.startswith(got["source"])


@pytest.mark.slow
def test_token_index_equals_the_notes():
    """v1 Fig 2 right: "@256: 10.03 / 9.82 / 9.87; @1k: ..." (TF finetune / Mamba / TTT-Linear)."""
    row = next(line for line in notes().splitlines() if line.startswith("| v1 Fig 2-right"))
    points = re.findall(r"@(\d+)(k?): ([\d.]+) / ([\d.]+) / ([\d.]+)", row)
    got = published.load("token_index").set_index(["position", "label"])
    assert len(points) * 3 == len(got) == 18 and (got["certainty"] == "APPROX").all()
    for n, k, *values in points:
        for label, value in zip(["TF finetune", "Mamba", "TTT-Linear"], values):
            assert got.loc[(int(n) * (1024 if k else 1), label), "ppl"] == float(value)
