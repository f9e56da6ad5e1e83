"""Our Mamba selective scan and Mamba-2 SSD against mamba-ssm's pure-PyTorch references, forward and
forward+backward, on this machine's CPU.

    python -m bench.mamba_scan_speed [--L 2048 --d-inner 1536 --batch 1 --ref-repeats 1]
    make bench-mamba

  scan   architectures/mamba/scan.py selective_scan, both of ours: the chunked two-level scan with its
         hand-written backward (backend=torch) and the C++ scan (backend=cpp, cpu_scan.py; reported as
         unavailable where it cannot be built), vs mamba_ssm selective_scan_ref (a Python loop over tokens),
         d_state 16, delta_softplus, D and z
  ssd    architectures/mamba/ssd.py ssd_chunked vs mamba_ssm ssd_minimal_discrete (the SSD paper's
         listing), heads of 64, d_state 128, chunk 256

Both sides compute in fp32 on the same inputs; the ratio of each pair comes from one run of this script.
The reference's backward re-allocates its (B, D, L, N) tensors once per token (autograd through its
per-token indexing): at L=2048 it takes about 7.5 minutes on 2 cores, the whole script about 8. It is
timed --ref-repeats times (default once).
mamba-ssm's CPU install lacks its CUDA extension; an empty `selective_scan_cuda` module lets the
references import (a benchmark-only shim, as in the tests). Writes RESULTS/bench/mamba_scan_speed.json.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

from architectures.mamba import cpu_scan
from architectures.mamba.scan import selective_scan
from architectures.mamba.ssd import ssd_chunked
from bench.results import atomic_write_json, device_name
from bench.timing import time_forward_and_backward


def references():
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref, ssd_minimal_discrete


def fwd_and_fwd_bwd(call, leaves, repeats: int, warmup: bool) -> dict:
    fwd_s, fwd_bwd_s = time_forward_and_backward(call, leaves, repeats, warmup)
    return {"fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s}


def scan_case(L: int, D: int, N: int, B: int):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    x = {"u": r(B, L, D), "delta": 0.5 * r(B, L, D), "A": -torch.rand(D, N, generator=g) * 4, "B": r(B, L, N),
         "C": r(B, L, N), "D": r(D), "z": r(B, L, D), "delta_bias": 0.5 * r(D)}
    return {k: v.requires_grad_() for k, v in x.items()}


def ssd_case(L: int, D: int, N: int, B: int, P: int = 64):
    g = torch.Generator().manual_seed(0)
    H = D // P
    x = {"x": torch.randn(B, L, H, P, generator=g), "a": -torch.rand(B, L, H, generator=g),
         "B": torch.randn(B, L, 1, N, generator=g), "C": torch.randn(B, L, 1, N, generator=g)}
    return {k: v.requires_grad_() for k, v in x.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--d-inner", type=int, default=1536)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of ours (median)")
    p.add_argument("--ref-repeats", type=int, default=1,
                   help="timed calls of selective_scan_ref (median; minutes each at L=2048); the SSD listing,\n"
                        "a matter of milliseconds, is timed --repeats times like ours")
    p.add_argument("--chunk", type=int, default=256, help="SSD chunk size (both sides)")
    p.add_argument("--skip", default="", help="comma list of cases to skip: scan, ssd")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    L, D, B = args.L, args.d_inner, args.batch
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"scan", "ssd"}:
        p.error(f"--skip takes scan, ssd; got {args.skip!r}")
    if min(L, D, B, args.chunk) < 1:
        p.error("--L, --d-inner, --batch and --chunk must be positive")
    if "ssd" not in skip and L % args.chunk:
        p.error(f"--L ({L}) must be a multiple of --chunk ({args.chunk}): the SSD reference works in whole chunks")
    selective_scan_ref, ssd_minimal_discrete = references()
    print(f"device: {device_name('cpu')}, {torch.get_num_threads()} threads; L={L}, d_inner={D}, batch={B}")
    rows = []

    def report(case, impl, res):
        rows.append({"case": case, "impl": impl, **res, "fwd_tokens_per_s": B * L / res["fwd_s"],
                     "fwd_bwd_tokens_per_s": B * L / res["fwd_bwd_s"]})
        print(f"{case:<5} {impl:<22} fwd {res['fwd_s'] * 1e3:>10.1f} ms   fwd+bwd {res['fwd_bwd_s'] * 1e3:>10.1f} ms",
              flush=True)

    def ratio(case, impl, ours, ref):
        fwd, fb = ref["fwd_s"] / ours["fwd_s"], ref["fwd_bwd_s"] / ours["fwd_bwd_s"]
        print(f"{case:<5} {impl} vs reference: forward {fwd:,.1f}x, forward+backward {fb:,.1f}x faster", flush=True)
        rows.append({"case": case, "impl": f"speedup of {impl}", "fwd_speedup": fwd, "fwd_bwd_speedup": fb})

    if "scan" not in skip:
        x = scan_case(L, D, 16, B)
        leaves = list(x.values())
        t = lambda v: v.transpose(1, 2)
        ours = {"ours (chunked)": fwd_and_fwd_bwd(lambda: (selective_scan(**x, delta_softplus=True),), leaves,
                                                  args.repeats, True)}
        report("scan", "ours (chunked)", ours["ours (chunked)"])
        why = cpu_scan.unavailable()
        if why is None:
            ours["ours (cpp)"] = fwd_and_fwd_bwd(lambda: (selective_scan(**x, delta_softplus=True, kernel="cpp"),), leaves,
                                                 args.repeats, True)
            report("scan", "ours (cpp)", ours["ours (cpp)"])
        else:
            print(f"scan  ours (cpp) unavailable: {why}", flush=True)
            rows.append({"case": "scan", "impl": "ours (cpp)", "unavailable": why})
        ref = fwd_and_fwd_bwd(lambda: (selective_scan_ref(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]),
                                                          x["D"], t(x["z"]), x["delta_bias"], delta_softplus=True),),
                              leaves, args.ref_repeats, False)
        report("scan", "selective_scan_ref", ref)
        for impl, res in ours.items():
            ratio("scan", impl, res, ref)
    if "ssd" not in skip:
        s = ssd_case(L, D, 128, B)
        leaves = list(s.values())
        Q = args.chunk
        ours = fwd_and_fwd_bwd(lambda: ssd_chunked(s["x"], s["a"], s["B"], s["C"], Q)[:1], leaves, args.repeats, True)
        report("ssd", "ours (chunked)", ours)
        heads = lambda v: v.expand(-1, -1, s["x"].shape[2], -1)  # the listing takes B, C per head
        ref = fwd_and_fwd_bwd(lambda: ssd_minimal_discrete(s["x"], s["a"], heads(s["B"]), heads(s["C"]), Q)[:1],
                              leaves, args.repeats, True)
        report("ssd", "ssd_minimal_discrete", ref)
        ratio("ssd", "ours (chunked)", ours, ref)
    out = Path(args.results) / "bench" / "mamba_scan_speed.json"
    atomic_write_json(out, {"device": device_name("cpu"), "threads": torch.get_num_threads(), "L": L, "d_inner": D,
                            "batch": B, "scan_d_state": 16, "ssd_d_state": 128, "ssd_headdim": 64,
                            "ssd_chunk": args.chunk, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
