"""`make check-kernels`: the Triton kernels (TTT's, Mamba-1's scan) compiled for sm_90 without a GPU (ptxas ships with triton), in a
subprocess without TRITON_INTERPRET (under the interpreter `triton.jit` gives functions that do not compile)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED_TRITON = re.search(r"^triton==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)


def check(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.kernel_compile_check", "--head-dims", "64", "--results",
                          str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads((tmp_path / "bench" / "kernel_compile_check.json").read_text())


def test_the_decode_kernels_compile_as_launched_without_spills(tmp_path):
    """Both TTT decode kernels as decode_step launches them, a token inside its mini-batch and the committing one,
    at head dims 64, 96 and 128: no spill stores. At a block of 128 TTT-Linear's reads W 64 rows at a time
    (decode_rows; the whole W spilled 368 B at f = 96 and 1204 B at 128), TTT-MLP's 16 hidden units at a time
    (tiles of 32 spilled 44 and 76 B at the commit)."""
    rows = check(tmp_path, "--only", "decode", "--head-dims", "64,96,128")
    assert {(r["kernel"], r["head_dim"]) for r in rows} == {
        (k, f) for k in ("linear decode", "linear decode commit", "mlp decode", "mlp decode commit")
        for f in (64, 96, 128)}
    assert all(r["status"] == "ok" and r["spill_store_bytes"] == 0 for r in rows), rows
    assert {r["num_warps"] for r in rows if r["head_dim"] == 64} == {8}, rows


@pytest.mark.slow  # a compiler's measurement behind launch settings, not the kernels' correctness: ptxas takes 10-25 s
def test_the_wide_linear_forward_reads_w_in_tiles_and_spills_nothing(tmp_path):
    """At head dim 96 and 128 (a block of 128) the TTT-Linear forward runs at 8 warps (WIDE_WARPS) and reads W from
    memory 16 rows at a time (WIDE_W_ROWS): ptxas spills nothing in either launch. With the 128 x 128 fp32 W whole
    in registers it spilled 220-248 B at 8 warps and 1.3-1.7 KB at 4 (Triton 3.7.1); --w-rows 128 compiles that."""
    rows = check(tmp_path, "--only", "linear forward", "--head-dims", "96,128")
    assert [(r["num_warps"], r["w_rows"], r["status"], r["spill_store_bytes"]) for r in rows] == [(8, 16, "ok", 0)] * 4
    whole = check(tmp_path / "whole", "--only", "linear forward", "--head-dims", "96,128", "--w-rows", "128")
    assert [(r["w_rows"], r["status"]) for r in whole] == [(128, "ok")] * 4, whole


@pytest.mark.slow  # a compiler's measurement behind a launch setting, not the kernels' correctness
def test_the_wide_mlp_forward_reads_32_hidden_units_per_tile_and_spills_nothing(tmp_path):
    """At head dim 96 and 128 the TTT-MLP prefill kernels read W1, b1, W2 32 hidden units at a time (hidden_tile:
    half of f = 64's 64): under our Triton the forward spills nothing in either launch, and under any Triton
    less than with tiles of 64 (--hidden-tile 64). Triton 3.7.1, the whole mini-batches' launch at f = 96 / 128:
    40 / 128 B with tiles of 64 (224 / 240 B with tiles of 64 and G2 and q kept in registers); 3.6.0 (`make
    test-kernels TRITON=3.6.0`): 32 / 80 B, against 208 / 212 B with tiles of 64 (252 / 268 B before)."""
    import triton

    rows = check(tmp_path, "--only", "mlp forward", "--head-dims", "96,128")
    assert [(r["hidden_tile"], r["status"]) for r in rows] == [(32, "ok")] * 4, rows
    wide = check(tmp_path / "64", "--only", "mlp forward", "--head-dims", "96,128", "--hidden-tile", "64")
    assert [(r["hidden_tile"], r["status"]) for r in wide] == [(64, "ok")] * 4, wide
    spills = [(r["spill_store_bytes"], w["spill_store_bytes"]) for r, w in zip(rows, wide)]
    assert all(s32 < s64 for s32, s64 in spills), spills
    if triton.__version__ == PINNED_TRITON:
        assert [s32 for s32, _ in spills] == [0] * 4, spills


@pytest.mark.slow  # a compiler's measurement behind launch settings, not the kernels' correctness
def test_the_wide_linear_backward_reads_w_in_tiles_at_one_stage_and_spills_a_fraction_of_w_whole(tmp_path):
    """At head dim 96 and 128 the TTT-Linear backward reads W and dW 16 rows at a time (WIDE_W_ROWS,
    _minibatch_backward_rows) at 1 pipelining stage (WIDE_STAGES), its reverse walk without hoisting loop
    invariants (disable_licm). Under our Triton its reverse walk and partial launch spill nothing; under any, under
    half of what the same launches spill with W whole at 3 stages, in under a quarter of their shared memory.
    Triton 3.7.1, reverse / partial at f = 96 and 128: 0 / 0 and 0 / 0 B against 264 / 48 and 568 / 456 B, 24 KB
    against 160 KB (104 / 0 and 56 / 0 B with the walk's invariants hoisted); 3.6.0: 12 / 0 and 0 / 4 B against
    416 / 220 and 564 / 568 B."""
    import triton

    launches = ("linear backward", "linear backward partial")
    rows = [r for r in check(tmp_path, "--only", "linear backward", "--head-dims", "96,128") if r["kernel"] in launches]
    assert [(r["w_rows"], r["num_stages"], r["status"]) for r in rows] == [(16, 1, "ok")] * 4, rows
    whole = [r for r in check(tmp_path / "whole", "--only", "linear backward", "--head-dims", "96,128", "--w-rows",
                              "128", "--num-stages", "3") if r["kernel"] in launches]
    assert [(r["kernel"], r["head_dim"], r["w_rows"]) for r in whole] == [
        (r["kernel"], r["head_dim"], 128) for r in rows], whole
    for tiled, w in zip(rows, whole):
        assert 2 * tiled["spill_store_bytes"] < w["spill_store_bytes"], (tiled, w)
        assert 4 * tiled["shared_bytes"] < w["shared_bytes"], (tiled, w)
    if triton.__version__ == PINNED_TRITON:
        assert [r["spill_store_bytes"] for r in rows] == [0] * 4, rows


def test_a_launch_variant_compiles_as_asked(tmp_path):
    """--num-stages compiles the prefill kernels without software pipelining, and the rows say so, and which
    Triton compiled them (this process's: `make check-kernels TRITON=3.6.0` puts another first on the path)."""
    import triton

    rows = check(tmp_path, "--only", "linear forward", "--num-stages", "1")
    assert [r["kernel"] for r in rows] == ["linear forward", "linear forward partial"]
    assert all((r["status"], r["num_warps"], r["num_stages"], r["triton"]) == ("ok", 4, 1, triton.__version__)
               for r in rows), rows


def test_the_forwards_spill_nothing(tmp_path):
    """At head dim 64 as the launchers compile them: both TTT forwards (both launches: the whole mini-batches and
    a trailing partial one) and TTT-MLP's decode keep everything in registers; so do Mamba-1's scan kernels
    (d_state 16) and the causal conv's (width 4), forward and backward."""
    rows = check(tmp_path, "--only", "linear forward,mlp forward,mlp decode,mamba scan,conv")
    assert {r["kernel"] for r in rows} == {"linear forward", "linear forward partial", "mlp forward",
                                          "mlp forward partial", "mlp decode", "mlp decode commit",
                                          "mamba scan forward", "mamba scan prefill", "mamba scan backward",
                                          "conv forward", "conv backward"}
    assert all(r["status"] == "ok" and r["spill_store_bytes"] == 0 for r in rows), rows


def test_a_ptxas_that_fails_is_an_error_with_its_message(monkeypatch, tmp_path):
    """Without a ptxas report there are no registers or spills to show: the row carries ptxas's message (Triton 3.9
    made PTX 9.4 for sm_90, which the bin/ptxas it also ships refused; _ptxas asks Triton which one it uses)."""
    from bench import kernel_compile_check as kc

    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\necho \"ptxas fatal   : Unsupported .version 9.4; current version is '8.8'\" >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setattr(kc, "_ptxas", lambda arch: str(fake))
    report = kc._ptxas_report(".version 9.4\n.target sm_90a\n", 90)
    assert report["registers"] is None and report["ptxas_ok"] is False
    assert "Unsupported .version 9.4" in report["error"] and str(fake) in report["error"]


def test_spill_sites_count_each_lines_spill_stores_from_the_listing(tmp_path):
    """nvdisasm's listing names a source line, then its instructions: every STL (a spill store, of any width)
    counts for the line named last, most stores first; LDL (a reload) and plain stores do not count. Each file is
    named from the root it lies in (Triton's package folder, this project's root)."""
    from bench import kernel_compile_check as kc

    listing = "\n".join([  # the kernel's source as another checkout's (a Triton cache hit): named from its root
        '\t//## File "/elsewhere/checkout/architectures/ttt/triton_mlp.py", line 56',
        "        /*0580*/                   STL.64 [R1], R4 ;",
        "        /*0590*/                   LDL R5, [R1+0x4] ;",
        '\t//## File "/x/site-packages/triton/language/standard.py", line 293',  # Triton's own
        "        /*05a0*/              @!P5 STL [R1+0x6c], R80 ;",
        "        /*05b0*/                   STL [R1+0x70], R81 ;",
        "        /*05c0*/                   STG.E [R2.64], R4 ;"])
    fake = tmp_path / "nvdisasm"
    fake.write_text(f"#!/bin/sh\ncat <<'END'\n{listing}\nEND\n")
    fake.chmod(0o755)
    assert kc.spill_sites(tmp_path / "k.cubin", fake, top=8) == [
        {"line": "triton/language/standard.py:293", "stores": 2},
        {"line": "architectures/ttt/triton_mlp.py:56", "stores": 1}]
    assert kc.spill_sites(tmp_path / "k.cubin", fake, top=1)[0]["stores"] == 2
    assert kc.spill_sites(tmp_path / "k.cubin", tmp_path / "missing", top=1).startswith("no ")


def test_a_kernel_that_spills_lists_where_and_one_that_does_not_lists_nothing(tmp_path):
    """--spill-sites N: under each kernel that spills (TTT-Linear's partial backward at f = 32, 48 B under our
    Triton), the source lines with its spill stores, lines of our kernels among them; none under one that spills
    nothing (the recompute launch)."""
    import triton

    rows = check(tmp_path, "--head-dims", "32", "--only", "linear backward recompute,linear backward partial",
                 "--spill-sites", "3")
    by_kernel = {r["kernel"]: r for r in rows}
    recompute, partial = by_kernel["linear backward recompute"], by_kernel["linear backward partial"]
    assert recompute["spill_store_bytes"] == 0 and "spill_sites" not in recompute, recompute
    if triton.__version__ == PINNED_TRITON:
        assert partial["spill_store_bytes"] > 0, partial
    if partial["spill_store_bytes"]:  # 48 B under 3.7.1 and 3.6.0
        sites = partial["spill_sites"]
        assert isinstance(sites, list) and 1 <= len(sites) <= 3 and all(s["stores"] > 0 for s in sites), sites
        assert any(s["line"].startswith("architectures/ttt/triton_linear.py:") for s in sites), sites


def test_ptxas_is_the_one_triton_assembles_with():
    from triton.backends.nvidia.compiler import get_ptxas

    from bench import kernel_compile_check as kc

    assert kc._ptxas(90) == get_ptxas(90).path and Path(kc._ptxas(90)).exists()


@pytest.mark.slow  # ptxas takes about 12 s over the MLP backward
def test_the_mlp_backward_fits_in_shared_memory_and_spills_less_than_half_of_before(tmp_path):
    """TTT-MLP's backward reads the inner weights a tile of hidden units at a time, so it fits in sm_90's shared
    memory (the one that held W1 and W2 whole asked for 262 KB, more than the 227 KB there are). With the sums it
    carries in memory and its loops' invariants not hoisted (disable_licm), under our Triton its whole mini-batches'
    launch spills under half of the 412 B it spilled before (188 B), the partial launch nothing (48 B before);
    Triton 3.6.0: 216 / 88 B against 564 / 36 B."""
    import triton

    rows = check(tmp_path, "--only", "mlp backward")
    assert [r["kernel"] for r in rows] == ["mlp backward", "mlp backward partial"]
    assert all(r["status"] == "ok" for r in rows), rows
    if triton.__version__ == PINNED_TRITON:
        assert 2 * rows[0]["spill_store_bytes"] < 412 and rows[1]["spill_store_bytes"] == 0, rows
