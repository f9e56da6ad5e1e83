"""Mamba (Gu & Dao 2023, arXiv 2312.00752) and Mamba-2 (Dao & Gu 2024, arXiv 2405.21060) mixers and
blocks. A block is h + Mixer(RMSNorm(h)), no FFN, as in both papers.

Mamba mixer, x the normed input (B, T, d), D = expand * d, N = d_state, R = dt_rank = ceil(d / 16):
    x, z  = in_proj(x)                                   (B, T, D) each
    x     = silu(conv1d_k4(x))                           depthwise, causal
    dt, B, C = x_proj(x)                                 (B, T, R), (B, T, N), (B, T, N)
    delta = softplus(dt W_dt^T + b_dt)                   (B, T, D)
    y     = selective_scan(x, delta, A = -exp(A_log), B, C) + D_skip * x
    out   = out_proj(y * silu(z))

Mamba-2 mixer, H = D / headdim heads, G groups sharing B and C:
    z, xBC, dt = in_proj(x)                              (B, T, D), (B, T, D + 2 G N), (B, T, H)
    x, B, C = silu(conv1d_k4(xBC))
    dt    = softplus(dt + dt_bias)                       (B, T, H)
    y     = SSD(x * dt, dt * A, B, C) + D_skip * x       A = -exp(A_log): one scalar per head
    out   = out_proj(RMSNorm(y * silu(z)))              the gated RMSNorm

Backends (`backend:` in conf/arch): `cuda` runs mamba-ssm's kernels (selective_scan_fn,
mamba_chunk_scan_combined, causal_conv1d); `triton`, for GPUs without mamba-ssm's compiled extensions, runs a
Triton scan with our conv: for Mamba-1 our sequential selective scan (triton_scan.py), for Mamba-2 mamba-ssm's
Triton SSD (mamba_chunk_scan_combined, which needs none of its compiled code); `cpp` our sequential scans in C++
on CPU (cpu_scan.py: Mamba-1's selective scan, Mamba-2's SSM); `torch` ours in PyTorch (scan.py, ssd.py); `auto`
takes cuda when CUDA is present and the kernels import, then triton on CUDA, cpp on a machine without CUDA where
it builds, torch otherwise. A backend that is asked for and cannot run raises. Decode steps (one token) run ours;
with backend=cuda so does a prefill that continues a decode state (mamba-ssm's conv kernel starts from zeros).

dt_proj and A_log are plain parameters, not nn.Linear, so no recipe's init scheme (architectures/recipe.py)
touches their initialisation (below); under recipe=native (init mamba_ssm) in_proj, x_proj and out_proj keep
PyTorch's default Linear init and out_proj is rescaled by 1 / sqrt(n_layers), as mamba-ssm does.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.config import ModelConfig
from architectures.layers import CausalConv, RMSNorm
from architectures.mamba import cpu_scan
from architectures.mamba.scan import chunk_for, compiled_steps, selective_scan, selective_state_step
from architectures.mamba.ssd import ssd_chunked, ssd_step
from architectures.backends import BackendUnavailable, resolve, runs, triton_interpreting, triton_unavailable


# -- backends ---------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def cuda_kernels(kind: str):
    """mamba-ssm's kernels for `kind` ("mamba" or "mamba2") as a dict of functions, or None when they
    do not import (CPU builds lack selective_scan_cuda and causal_conv1d)."""
    try:
        from causal_conv1d import causal_conv1d_fn
        if kind == "mamba":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return {"conv": causal_conv1d_fn, "scan": selective_scan_fn}
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return {"conv": causal_conv1d_fn, "scan": mamba_chunk_scan_combined}
    except Exception:  # ImportError, or a missing compiled extension
        return None


@lru_cache(maxsize=None)
def triton_ssd():
    """mamba-ssm's Triton SSD (mamba_chunk_scan_combined), or None where mamba-ssm is not installed. It needs none
    of mamba-ssm's compiled extensions, but the package's __init__ imports them: where that fails (an install with
    MAMBA_SKIP_CUDA_BUILD=TRUE, as `make gpu-wheels` builds), the subpackage is loaded without that __init__."""
    name = "mamba_ssm.ops.triton.ssd_combined"
    try:
        return importlib.import_module(name).mamba_chunk_scan_combined
    except Exception:  # ImportError, or whatever the package's __init__ raises without its extensions
        pass
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = importlib.util.module_from_spec(spec)  # the package's folder and spec, its __init__ not run
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(name).mamba_chunk_scan_combined
    except Exception:
        del sys.modules["mamba_ssm"]
        return None


def triton_ssd_unavailable() -> str | None:
    """Why Mamba-2's backend=triton cannot run here, or None. mamba-ssm's Triton SSD sets the CUDA device at each
    call, so it runs on CUDA only (not under Triton's CPU interpreter)."""
    if not torch.cuda.is_available():
        return "backend=triton runs mamba-ssm's Triton SSD for Mamba-2, which needs CUDA"
    if triton_ssd() is None:
        return ("backend=triton needs mamba-ssm's Triton SSD for Mamba-2 (mamba-ssm installed, its CUDA build not "
                "needed: MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm)")
    return triton_unavailable()


def resolve_backend(requested: str, kind: str) -> str:
    """backend (architectures/backends.py): mamba-ssm's compiled kernels where CUDA and they are present; else on
    CUDA a Triton scan (Mamba-1: ours; Mamba-2: mamba-ssm's SSD); on a machine without CUDA, our C++ scans
    (cpu_scan.py) where they build; else our PyTorch scans. Triton's CPU interpreter runs Mamba-1's scan only when
    asked for by name."""
    def cuda() -> str | None:
        if torch.cuda.is_available() and cuda_kernels(kind) is not None:
            return None
        return (f"needs CUDA and mamba-ssm's compiled kernels for {kind} (selective_scan_cuda / Triton SSD, "
                "causal_conv1d)")

    def triton() -> str | None:
        return triton_ssd_unavailable() if kind == "mamba2" else triton_unavailable()

    on_cuda = torch.cuda.is_available()
    checks = {"cuda": cuda, "triton": triton, "cpp": cpu_scan.unavailable, "torch": runs}
    prefer = {"triton": on_cuda, "cpp": not on_cuda}  # auto: no interpreter, no C++ scan beside a GPU
    return resolve("backend", requested, checks, prefer=lambda name: prefer.get(name, True))


# -- pieces -----------------------------------------------------------------------------------

def dt_bias_init(dim: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """softplus^-1 of dt ~ exp(U(log dt_min, log dt_max)), clamped below at `floor` (Mamba's init)."""
    dt = torch.exp(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class MambaCache:
    """Decode state of one Mamba or Mamba-2 block: conv inputs (B, k-1, C) and the SSM state (at least
    fp32: (B, D, N) for Mamba, (B, H, P, N) for Mamba-2); `seen` is the shell's count (DecodeState)."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm, self.seen = conv, ssm, 0


def dt_rank(cfg: ModelConfig) -> int:
    """R of dt's low-rank projection: options.dt_rank, or "auto" = ceil(d_model / 16) (Mamba's)."""
    rank = cfg.opt("dt_rank")
    return math.ceil(cfg.d_model / 16) if rank in (None, "auto") else int(rank)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for an fp64 model


# -- Mamba ------------------------------------------------------------------------------------

class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.d_inner = D = int(cfg.opt("expand")) * d
        self.d_state = N = int(cfg.opt("d_state"))
        self.dt_rank = R = dt_rank(cfg)
        self.chunk_size = int(cfg.opt("chunk_size"))
        self.backend = resolve_backend(str(cfg.opt("backend")), "mamba")
        self.in_proj = nn.Linear(d, 2 * D, bias=False)
        self.conv = CausalConv(D, int(cfg.opt("d_conv")))
        self.conv.cpp = self.backend == "cpp"  # backend=cpp: the conv in C++ too
        self.conv.triton = self.backend == "triton"  # backend=triton: in Triton (architectures/triton_conv.py)
        self.scan_kernel = self.backend if self.backend in ("cpp", "triton") else "chunked"  # selective_scan's
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        bound = R ** -0.5 * float(cfg.opt("dt_scale"))
        self.dt_weight = nn.Parameter(torch.empty(D, R).uniform_(-bound, bound))  # dt_proj, "random" init
        self.dt_bias = nn.Parameter(dt_bias_init(D, float(cfg.opt("dt_min")), float(cfg.opt("dt_max")),
                                                 float(cfg.opt("dt_init_floor"))))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))  # (D, N)
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, d, bias=False)
        self._compiled_steps = None  # set by compile_hot_path()

    def compile_hot_path(self) -> None:
        """torch.compile the chunked scan's loop bodies (training with backend=torch; the cpp scan is compiled
        C++ already). The loops stay in Python, so each graph is a block of positions of every chunk (or of
        chunk boundaries) and compiles once per shape."""
        if self.backend == "torch":
            self._compiled_steps = compiled_steps()

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); a cache continues its sequence and is updated in place."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, D) each
        fresh = cache is None or cache.seen == 0
        if self.backend == "cuda" and fresh:
            return self.out_proj(self._cuda_core(xi, z, cache))
        if self.backend == "cpp" and x.device.type != "cpu":
            raise BackendUnavailable(f"mamba backend=cpp needs CPU inputs, got {x.device}")
        if self.backend == "triton" and x.device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailable(f"mamba backend=triton needs CUDA inputs, got {x.device}")
        xc, conv_state = self.conv(xi, None if fresh else cache.conv)
        xc = F.silu(xc)
        dt, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ self.dt_weight.t()  # (B, T, D), bias added in the scan
        A = -torch.exp(self.A_log.float())  # (D, N)
        if cache is not None and x.shape[1] == 1:
            y = selective_state_step(cache.ssm, xc[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], self.D, z[:, 0],
                                     self.dt_bias)[:, None]
        else:
            y, last = selective_scan(xc, delta, A, Bm, Cm, self.D, z, self.dt_bias, True,
                                     None if fresh else cache.ssm, chunk_size=chunk_for(x.shape[1], self.chunk_size),
                                     return_last_state=True,
                                     steps=self._compiled_steps if self.training else None,
                                     kernel=self.scan_kernel)
            if cache is not None:
                cache.ssm.copy_(last)
        if cache is not None:
            cache.conv.copy_(conv_state)
        return self.out_proj(y)

    def _cuda_core(self, xi, z, cache):
        """mamba-ssm's kernels from the zero state: causal_conv1d (+ SiLU) and selective_scan_fn."""
        if not xi.is_cuda:
            raise BackendUnavailable(f"mamba backend=cuda needs CUDA inputs, got {xi.device}")
        k = cuda_kernels("mamba")
        xc = self.conv.cuda_forward(xi, k["conv"])  # (B, T, D)
        dt, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ self.dt_weight.t()
        A = -torch.exp(self.A_log.float())
        t = lambda v: v.transpose(1, 2).contiguous()  # (B, T, C) -> (B, C, T), the kernel's layout
        y, last = k["scan"](t(xc), t(delta), A, t(Bm), t(Cm), self.D.float(), t(z), self.dt_bias.float(),
                            delta_softplus=True, return_last_state=True)
        if cache is not None:
            cache.ssm.copy_(last)
            cache.conv.copy_(_last_inputs(xi, self.conv.width))
        return y.transpose(1, 2)

    def new_cache(self, batch: int, device, dtype) -> MambaCache:
        return MambaCache(torch.zeros(batch, self.conv.width - 1, self.d_inner, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=_state_dtype(dtype)))


def _last_inputs(x: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state after x (B, T, C) from the zero state: its last k - 1 inputs, zero-padded."""
    return F.pad(x, (0, 0, max(0, width - 1 - x.shape[1]), 0))[:, -(width - 1):]


# -- Mamba-2 ----------------------------------------------------------------------------------

class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight (Mamba-2's norm_before_gate=False), in fp32, normalised per group of
    `group_size` channels: Mamba-2 takes group_size = d_inner / ngroups, so each group of heads that shares
    B and C is normalised on its own (mamba_ssm/modules/mamba2.py: RMSNormGated(..., group_size=d_ssm //
    ngroups); mamba_ssm/ops/triton/layernorm_gated.py: rms_norm_ref). eps 1e-5 as there, in every recipe."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size <= 0 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size {group_size} does not divide dim {dim}")
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., dim) -> (..., dim)."""
        g = y.float() * F.silu(z.float())
        g = F.rms_norm(g.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps)  # (..., groups,
        #   group_size): g / sqrt(mean(g^2) + eps) per group
        return (g.flatten(-2) * self.weight.float()).to(y.dtype)


@lru_cache(maxsize=None)
def compiled_ssd():
    return torch.compile(ssd_chunked, dynamic=False)


def head_dim_for(d_inner: int, headdim: int) -> int:
    """The Mamba-2 head size: `headdim` when it divides d_inner (every size from 125m up, and the CPU
    ladder), else the largest common divisor (e.g. 32 for the smoke size with d_inner 96)."""
    return math.gcd(d_inner, headdim)


def mamba2_inner_width(cfg: ModelConfig) -> int:
    """D: `d_inner` when given (FLOP-matched sizing sets it to whole heads), else expand * d_model."""
    return int(cfg.opt("d_inner")) if cfg.opt("d_inner") else int(cfg.opt("expand")) * cfg.d_model


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.d_inner = D = mamba2_inner_width(cfg)
        self.d_state = N = int(cfg.opt("d_state"))
        self.headdim = P = head_dim_for(D, int(cfg.opt("headdim")))
        self.n_heads = H = D // P
        self.ngroups = G = int(cfg.opt("ngroups"))
        if H % G:
            raise ValueError(f"mamba2: {H} heads do not split into ngroups={G}")
        self.chunk_size = int(cfg.opt("chunk_size"))
        self.backend = resolve_backend(str(cfg.opt("backend")), "mamba2")
        self.in_proj = nn.Linear(d, 2 * D + 2 * G * N + H, bias=False)  # z, x, B, C, dt
        self.conv = CausalConv(D + 2 * G * N, int(cfg.opt("d_conv")))
        self.conv.cpp = self.backend == "cpp"
        self.conv.triton = self.backend == "triton"
        self.dt_bias = nn.Parameter(dt_bias_init(H, float(cfg.opt("dt_min")), float(cfg.opt("dt_max")),
                                                 float(cfg.opt("dt_init_floor"))))
        lo, hi = (float(v) for v in cfg.opt("A_init_range"))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))  # (H,)
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(D, group_size=D // G)
        self.out_proj = nn.Linear(D, d, bias=False)
        self._compiled_ssd = None  # set by compile_hot_path()

    def compile_hot_path(self) -> None:
        """torch.compile the chunked SSD (training only; about 2x on 2 CPU cores: the decays, masks and
        scalings fuse around the matmuls). One graph per shape, shared by the layers. backend=cpp: nothing to
        compile."""
        if self.backend != "cpp":
            self._compiled_ssd = compiled_ssd()

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        D, N, G, H, P = self.d_inner, self.d_state, self.ngroups, self.n_heads, self.headdim
        z, xBC, dt = self.in_proj(x).split([D, D + 2 * G * N, H], dim=-1)
        fresh = cache is None or cache.seen == 0
        step = cache is not None and T == 1  # decode: one token, cache.ssm updated in place
        use_cuda = self.backend == "cuda" and fresh
        use_triton = self.backend == "triton" and not step  # mamba-ssm's Triton SSD after our conv
        if self.backend == "cpp" and x.device.type != "cpu":
            raise BackendUnavailable(f"mamba2 backend=cpp needs CPU inputs, got {x.device}")
        if use_triton and not (x.is_cuda or triton_interpreting()):
            raise BackendUnavailable(f"mamba2 backend=triton needs CUDA inputs, got {x.device}")
        if use_cuda:
            if not x.is_cuda:
                raise BackendUnavailable(f"mamba2 backend=cuda needs CUDA inputs, got {x.device}")
            xBC_c = self.conv.cuda_forward(xBC, cuda_kernels("mamba2")["conv"])
            conv_state = _last_inputs(xBC, self.conv.width)
        else:
            xBC_c, conv_state = self.conv(xBC, None if fresh else cache.conv)
            xBC_c = F.silu(xBC_c)
        xs, Bm, Cm = xBC_c.split([D, G * N, G * N], dim=-1)
        xs = xs.view(Bsz, T, H, P)
        Bm, Cm = Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
        if use_cuda or use_triton:  # mamba_chunk_scan_combined: softplus(dt + dt_bias), the SSD, + D x
            scan = cuda_kernels("mamba2")["scan"] if use_cuda else triton_ssd()
            y, last = scan(xs, dt, -torch.exp(self.A_log.float()), Bm, Cm, self.chunk_size, D=self.D.float(),
                           dt_bias=self.dt_bias.float(), initial_states=None if fresh else cache.ssm,
                           dt_softplus=True, return_final_states=True)
        else:
            y, last = self._torch_core(xs, dt, Bm, Cm, cache.ssm if step or not fresh else None, step)
        if cache is not None:
            cache.ssm.copy_(last)
            cache.conv.copy_(conv_state)
        y = self.norm(y.reshape(Bsz, T, D).to(x.dtype), z)
        return self.out_proj(y)

    def _torch_core(self, xs, dt, Bm, Cm, state, step: bool):
        """Ours (C++ or PyTorch), in fp32 outside autocast. xs (B, T, H, P), dt (B, T, H), Bm, Cm (B, T, G,
        N)."""
        ct = torch.promote_types(xs.dtype, torch.float32)
        with torch.autocast(xs.device.type, enabled=False):
            xs, Bm, Cm = xs.to(ct), Bm.to(ct), Cm.to(ct)
            dt = F.softplus(dt.to(ct) + self.dt_bias.to(ct))  # (B, T, H)
            a = dt * -torch.exp(self.A_log.to(ct))  # (B, T, H): log decay per step
            xdt = xs * dt[..., None]
            if self.backend == "cpp" and not (step and torch.compiler.is_compiling()):  # one sequential C++ pass
                #   (cpu_scan.ssd_scan_cpp), decode steps too, except in a compiled step (a C++ call breaks the graph)
                y, last = cpu_scan.ssd_scan_cpp(xdt, a, Bm, Cm, state)
            elif step:  # one token: update the state in place
                y = ssd_step(state, xdt[:, 0], a[:, 0], Bm[:, 0], Cm[:, 0])[:, None]
                last = state
            else:
                ssd = self._compiled_ssd if self.training and self._compiled_ssd is not None else ssd_chunked
                y, last = ssd(xdt, a, Bm, Cm, self.chunk_size, state)
            return y + xs * self.D.to(ct)[:, None], last

    def new_cache(self, batch: int, device, dtype) -> MambaCache:
        conv = torch.zeros(batch, self.conv.width - 1, self.d_inner + 2 * self.ngroups * self.d_state,
                           device=device, dtype=dtype)
        return MambaCache(conv, torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device,
                                            dtype=_state_dtype(dtype)))


# -- blocks -----------------------------------------------------------------------------------

class MambaBlock(nn.Module):
    """h + Mixer(RMSNorm(h)): the Mamba and Mamba-2 block (no FFN)."""

    mixer_class: type = MambaMixer

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = self.mixer_class(cfg)
        self.norm.cpp = self.mixer.backend == "cpp"  # backend=cpp: the norm's inference in C++ too

    def forward(self, h: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        return h + self.mixer(self.norm(h), cache)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> MambaCache:
        return self.mixer.new_cache(batch, device, dtype)

    def backends(self) -> dict[str, str]:
        return {"ssm": self.mixer.backend}


class Mamba2Block(MambaBlock):
    mixer_class = Mamba2Mixer
