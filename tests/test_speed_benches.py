"""`make bench-ttt` and `make bench-mamba` (bench/ttt_layer_speed.py, bench/mamba_scan_speed.py) at tiny shapes:
every implementation is timed forward and forward+backward, and the JSON holds each one's numbers and the ratios.
A check of the scripts, not a measurement."""
import json

import pytest

from bench import mamba_scan_speed, ttt_layer_speed


def rows_of(path):
    return json.loads(path.read_text())["rows"]


def test_ttt_layer_speed_times_both_implementations_in_both_scopes(tmp_path):
    assert ttt_layer_speed.main(["--d", "32", "--heads", "2", "--T", "32", "--batches", "1", "--ref-tokens", "16",
                                 "--repeats", "1", "--inner", "linear", "--results", str(tmp_path)]) == 0
    rows = rows_of(tmp_path / "bench" / "ttt_layer_speed.json")
    timed = {(r["scope"], r["impl"]): r for r in rows if "fwd_tokens_per_s" in r}
    assert set(timed) == {(s, i) for s in ("layer", "inner") for i in ("dual", "reference")}
    assert all(r["fwd_tokens_per_s"] > 0 and r["fwd_bwd_tokens_per_s"] > 0 for r in timed.values())
    for scope in ("layer", "inner"):
        ratio = next(r for r in rows if r["scope"] == scope and r["impl"] == "dual/reference")
        dual, ref = timed[scope, "dual"], timed[scope, "reference"]
        assert ratio["fwd_speedup"] == pytest.approx(dual["fwd_tokens_per_s"] / ref["fwd_tokens_per_s"])


def test_mamba_scan_speed_times_ours_and_the_references(tmp_path):
    assert mamba_scan_speed.main(["--L", "64", "--d-inner", "32", "--chunk", "32", "--repeats", "1",
                                  "--results", str(tmp_path)]) == 0
    rows = rows_of(tmp_path / "bench" / "mamba_scan_speed.json")
    timed = {(r["case"], r["impl"]) for r in rows if "fwd_s" in r}
    assert {("scan", "ours (chunked)"), ("scan", "selective_scan_ref"), ("ssd", "ours (chunked)"),
            ("ssd", "ssd_minimal_discrete")} <= timed
    # the C++ scan is timed, or its row says why it is unavailable
    assert ("scan", "ours (cpp)") in timed or any(r["impl"] == "ours (cpp)" and r.get("unavailable") for r in rows)
    assert all(r["fwd_speedup"] > 0 and r["fwd_bwd_speedup"] > 0 for r in rows if "fwd_speedup" in r)


@pytest.mark.parametrize("args,message", [(["--L", "100"], "multiple of --chunk"), (["--skip", "scans"], "--skip"),
                                          (["--batch", "0"], "positive")])
def test_mamba_scan_speed_refuses_shapes_the_references_cannot_run(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        mamba_scan_speed.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
