"""Compile every Triton kernel (TTT's, Mamba-1's scan, the causal conv) for a GPU architecture without a GPU, and
report what ptxas says: registers per thread, spilled bytes, shared memory. Catches compile errors and resource
blow-ups on machines that have no GPU (the interpreter tests check the math, not what the compiler makes of it).

    python -m bench.kernel_compile_check [--arch 90] [--head-dims 32,64,96,128] [--precision ieee] [--num-warps 8]
                                         [--num-stages 1] [--w-rows 128] [--hidden-tile 64] [--spill-sites 8]
    make check-kernels [ARGS="--only 'mlp backward' --head-dims 64 --spill-sites 8"]

The kernels as the launchers compile them (triton_linear.LAUNCH: TF32 products, warps per kernel,
pipelining stages, rows of W per tile; triton_mlp.hidden_tile: hidden units per tile); --precision /
--num-warps / --num-stages / --w-rows / --hidden-tile compile a variant. --spill-sites N assembles with line info
and lists, under each kernel that spills, the N source lines with the most spill stores (nvdisasm's listing): where
to look when a change makes ptxas spill.
Exits 1 when a kernel fails to compile or asks for more shared memory than the GPU has.

Needs the `triton` package only (it ships ptxas); must not run under TRITON_INTERPRET.
Writes RESULTS/bench/kernel_compile_check.json.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.results import atomic_write_json

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90 (H100 / H200)


def _signature(fn, consts: dict) -> dict:
    """Pointers (capitalised names) fp32 except TTT's q/k/v/out bf16, eps fp32, the rest i32, constexprs."""
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "OUT"):
            sig[n] = "*bf16"
        elif n in ("T", "H") or not n[:1].isupper():
            sig[n] = "fp32" if n == "eps" else "i32"
        else:
            sig[n] = "*fp32"
    return sig


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles for `arch` with: which of the ones it ships (bin/ptxas, bin/ptxas-blackwell)
    takes its PTX differs between versions (Triton 3.9's PTX for sm_90 is 9.4, newer than its bin/ptxas reads)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # a Triton without get_ptxas: the one it ships
        import triton.backends.nvidia as nv

        return str(Path(nv.__file__).parent / "bin" / "ptxas")


def _ptxas_report(ptx: str, arch: int, sites: int = 0) -> dict:
    """ptxas's registers and spill stores; sites > 0 adds the `sites` source lines with the most spill stores."""
    ptxas = _ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
                              *(["-lineinfo"] if sites else []), str(src), "-o", str(cubin)],
                             capture_output=True, text=True)
        text = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill_st = re.search(r"(\d+) bytes spill stores", text)
        report = {"registers": int(regs.group(1)) if regs else None,
                  "spill_store_bytes": int(spill_st.group(1)) if spill_st else None, "ptxas_ok": res.returncode == 0}
        if res.returncode != 0 or regs is None:
            report["error"] = f"{ptxas}: {text.strip()[-400:]}"
        elif sites and report["spill_store_bytes"]:
            report["spill_sites"] = spill_sites(cubin, Path(ptxas).parent / "nvdisasm", sites)
    return report


def spill_sites(cubin: Path, nvdisasm: Path, top: int) -> list[dict] | str:
    """The `top` source lines with the most spill stores (STL instructions) in a cubin assembled with -lineinfo,
    read from nvdisasm's listing (Triton ships it beside ptxas): [{"line": "architectures/ttt/triton_mlp.py:56",
    "stores": 5}]. The listing names the innermost line only: a line inside an inlined helper counts there, and one
    of Triton's own (triton/language/standard.py:293 is tl.sum's reduce) is a reduction somewhere in the kernel.
    A message instead when nvdisasm cannot tell."""
    if not nvdisasm.exists():
        return f"no {nvdisasm}"
    res = subprocess.run([str(nvdisasm), "-gi", "-c", str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        return f"{nvdisasm}: {res.stderr.strip()[-300:]}"
    stores, line = Counter(), "(no line info)"
    for text in res.stdout.splitlines():
        if m := re.search(r'//## File "([^"]+)", line (\d+)', text):
            line = f"{_short_path(m.group(1))}:{m.group(2)}"
        elif re.search(r"\bSTL(\.\w+)*\b", text):
            stores[line] += 1
    return [{"line": where, "stores": n} for where, n in stores.most_common(top)]


@functools.cache  # a listing names the same few files thousands of times
def _short_path(path: str) -> str:
    """A source file as a reader finds it: Triton's from its package folder (triton/language/...), this project's
    relative to its root. By its longest tail that is a file there: Triton's cache may hold a kernel compiled from
    the same source in another checkout, with that checkout's paths."""
    import triton

    parts = Path(path).parts
    for root in (Path(triton.__file__).resolve().parents[1], Path(__file__).resolve().parents[1]):
        for i in range(1, len(parts)):
            if (root / Path(*parts[i:])).is_file():
                return str(Path(*parts[i:]))
    return path


def compile_one(fn, consts: dict, arch: int, num_warps: int, num_stages: int = 3, sites: int = 0) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, consts),
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:
        return {"status": "compile failed", "error": f"{type(e).__name__}: {e}"[:500]}
    row = {"status": "ok", "shared_bytes": k.metadata.shared, **_ptxas_report(k.asm["ptx"], arch, sites)}
    if "error" in row:  # Triton compiled it, but there is no ptxas report of its registers and spills
        row["status"] = "ptxas failed"
    elif row["shared_bytes"] > SHARED_LIMIT:
        row["status"] = f"too much shared memory ({row['shared_bytes']} > {SHARED_LIMIT})"
    return row


def kernels(f: int, launch, hidden_tile: int | None = None) -> list[tuple[str, object, dict, int, int]]:
    """(name, kernel, constexprs, num_warps, num_stages) as the launchers compile them: prefill kernels under the
    given launch settings (triton_linear.Launch), both decode kernels at triton_linear.decode_warps and Triton's
    default 3 stages, each as a token inside its mini-batch compiles it and as the last one, which commits the
    update ("... decode commit"). The prefill kernels run a trailing partial mini-batch in a launch
    of its own (PARTIAL), compiled apart: "... partial"; TTT-Linear's backward recomputes each group's states
    in a launch of its own too: "linear backward recompute". hidden_tile: hidden units per tile of the TTT-MLP
    prefill kernels (default: triton_mlp.hidden_tile)."""
    from architectures.ttt import triton_linear as lin
    from architectures.ttt import triton_mlp as mlp

    bf = lin._block(f)
    common = {"F": f, "BF": bf, "MB": 16, "PREC": launch.precision}
    mlp_common = {**common, "BT": hidden_tile or mlp.hidden_tile(f)}
    setting = lambda inner, direction: (launch.warps(inner, direction, f), launch.stages(inner, direction, f))
    decode, mlp_decode = {"F": f, "BF": bf}, {"F": f, "BF": bf, "BT": mlp.hidden_tile(f, decode=True)}
    fwd, fwd_partial = {"PARTIAL": False, "SAVE": True}, {"PARTIAL": True, "SAVE": True}
    w_rows = {"W_ROWS": launch.rows(f)}  # TTT-Linear's forward and backward: rows of W per tile
    mlp_bwd, mlp_bwd_partial = {"PARTIAL": False, "AFTER_PARTIAL": True}, {"PARTIAL": True, "AFTER_PARTIAL": False}
    lin_bwd = {phase: {"PHASE": phase, "FIRST": phase == "partial"} for phase in ("reverse", "recompute", "partial")}
    return [
        ("linear forward", lin._fwd_kernel, {**common, **fwd, **w_rows}, *setting("linear", "fwd")),
        ("linear forward partial", lin._fwd_kernel, {**common, **fwd_partial, **w_rows}, *setting("linear", "fwd")),
        ("linear backward", lin._bwd_kernel, {**common, **lin_bwd["reverse"], **w_rows}, *setting("linear", "bwd")),
        ("linear backward recompute", lin._bwd_kernel, {**common, **lin_bwd["recompute"], **w_rows},
         *setting("linear", "bwd")),
        ("linear backward partial", lin._bwd_kernel, {**common, **lin_bwd["partial"], **w_rows},
         *setting("linear", "bwd")),
        ("linear decode", lin._decode_kernel, {**decode, "ROWS": lin.decode_rows(bf), "COMMIT": False},
         lin.decode_warps(bf), 3),
        ("linear decode commit", lin._decode_kernel, {**decode, "ROWS": lin.decode_rows(bf), "COMMIT": True},
         lin.decode_warps(bf), 3),
        ("mlp forward", mlp._fwd_kernel, {**mlp_common, **fwd}, *setting("mlp", "fwd")),
        ("mlp forward partial", mlp._fwd_kernel, {**mlp_common, **fwd_partial}, *setting("mlp", "fwd")),
        ("mlp backward", mlp._bwd_kernel, {**mlp_common, **mlp_bwd}, *setting("mlp", "bwd")),
        ("mlp backward partial", mlp._bwd_kernel, {**mlp_common, **mlp_bwd_partial}, *setting("mlp", "bwd")),
        ("mlp decode", mlp._decode_kernel, {**mlp_decode, "COMMIT": False}, lin.decode_warps(bf), 3),
        ("mlp decode commit", mlp._decode_kernel, {**mlp_decode, "COMMIT": True}, lin.decode_warps(bf), 3),
    ]


def mamba_kernels(d_state: int = 16) -> list[tuple[str, object, dict, int, int]]:
    """Mamba-1's selective scan (triton_scan.py) as its launcher compiles it, at the papers' d_state 16: the
    forward that keeps the segment states (training) and the one that does not (prefill), and the backward."""
    import triton

    from architectures.mamba import triton_scan as ts

    common = {"N": d_state, "BLOCK_N": triton.next_power_of_2(d_state), "BLOCK_D": ts.BLOCK_D, "SEG": ts.SEG}
    return [
        ("mamba scan forward", ts._scan_forward, {**common, "HAS_H0": False, "KEEP": True}, ts.NUM_WARPS, 3),
        ("mamba scan prefill", ts._scan_forward, {**common, "HAS_H0": True, "KEEP": False}, ts.NUM_WARPS, 3),
        ("mamba scan backward", ts._scan_backward, common, ts.NUM_WARPS, 3),
    ]


def conv_kernels(width: int = 4) -> list[tuple[str, object, dict, int, int]]:
    """The causal depthwise conv (architectures/triton_conv.py) as its launchers compile it, at the papers' width 4,
    summing in fp32."""
    import triton.language as tl

    from architectures import triton_conv as tc

    common = {"K": width, "BLOCK_T": tc.BLOCK_T, "BLOCK_C": tc.BLOCK_C, "ACC": tl.float32}
    return [("conv forward", tc._conv_forward, common, tc.FORWARD_WARPS, 3),
            ("conv backward", tc._conv_backward, {**common, "KP": width}, tc.BACKWARD_WARPS, 3)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.kernel_compile_check", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--head-dims", default="32,64,96,128")
    p.add_argument("--precision", default=None, help="tf32 | ieee (default: the launchers', triton_linear.LAUNCH)")
    p.add_argument("--num-warps", type=int, default=None,
                   help="every prefill kernel (default: the launchers', per kernel)")
    p.add_argument("--num-stages", type=int, default=None, help="every prefill kernel (default: the launchers')")
    p.add_argument("--w-rows", type=int, default=None,
                   help="rows of W the TTT-Linear forward holds at a time (default: the launchers', Launch.rows)")
    p.add_argument("--hidden-tile", type=int, default=None, choices=(16, 32, 64, 128),
                   help="hidden units per tile of the TTT-MLP prefill kernels (default: triton_mlp.hidden_tile)")
    p.add_argument("--only", default="", help="comma list of kernel names (substrings), e.g. 'linear,mlp forward'")
    p.add_argument("--spill-sites", type=int, default=0, metavar="N",
                   help="under each kernel that spills, the N source lines with the most spill stores (STL)")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: this compiles the kernels for the GPU", file=sys.stderr)
        return 2
    from dataclasses import replace

    from architectures.ttt.triton_linear import LAUNCH

    launch = replace(LAUNCH, precision=args.precision or LAUNCH.precision, num_warps=args.num_warps or LAUNCH.num_warps,
                     num_stages=args.num_stages or LAUNCH.num_stages, w_rows=args.w_rows or LAUNCH.w_rows)
    import triton

    print(f"[ttt-bench] triton {triton.__version__} ({Path(triton.__file__).parent}), compiling for sm_{args.arch}",
          flush=True)
    rows = []
    todo = [(f, k) for f in (int(x) for x in args.head_dims.split(",")) for k in kernels(f, launch, args.hidden_tile)]
    todo += [(None, k) for k in mamba_kernels() + conv_kernels()]  # no head dim: one compile each
    for f, (name, fn, consts, num_warps, num_stages) in todo:
        if args.only and not any(s.strip() and s.strip() in name for s in args.only.split(",")):
            continue
        row = {"kernel": name, "head_dim": f, "arch": f"sm_{args.arch}", "triton": triton.__version__,
               "precision": consts.get("PREC"), "num_warps": num_warps, "num_stages": num_stages,
               "w_rows": consts.get("W_ROWS"), "hidden_tile": consts.get("BT")}
        t0 = time.perf_counter()
        row.update(**compile_one(fn, consts, args.arch, num_warps, num_stages, args.spill_sites),
                   compile_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        shape = f"f={f:4d}" if f else f"N={consts['N']:4d}" if "N" in consts else f"k={consts['K']:4d}"
        print(f"[ttt-bench] {name:25s} {shape} sm_{args.arch}: {row['status']:10s} "
              f"regs={row.get('registers')} spill_stores={row.get('spill_store_bytes')}B "
              f"shared={row.get('shared_bytes')}B  ({row['compile_s']} s)", flush=True)
        if row["status"] != "ok" and "error" in row:
            print(f"[ttt-bench]   {row['error']}", flush=True)
        if "spill_sites" in row:
            sites = row["spill_sites"]
            listed = ", ".join(f"{s['line']} ({s['stores']})" for s in sites) if isinstance(sites, list) else sites
            print(f"[ttt-bench]   spill stores by source line: {listed}", flush=True)
    atomic_write_json(Path(args.results) / "bench" / "kernel_compile_check.json", rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
