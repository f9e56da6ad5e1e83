"""TTT-Linear and TTT-MLP layers and blocks, with the paper's exact semantics (arXiv 2407.04620;
docs/ttt_math.md, which restates the paper and the official JAX code).

Block, Mamba backbone (ttt_linear, ttt_mlp; the paper's default):
    h += CausalConv_k4(RMSNorm(h))          "pre-conv"
    h += TTT(RMSNorm(h))
    h += SwiGLU(RMSNorm(h))
Block, Transformer backbone (ttt_linear_base, ttt_mlp_base): no pre-conv.

TTT(x), x the RMS-normed input (B, T, d), H heads of f = d / H:
    Mamba backbone:  u = x Wq; XQ = convq(u); XK = convk(u); XV = x Wv; g = gelu_tanh(x Wg)
    Transformer:     XQ = x Wq; XK = x Wk; XV = x Wv
    RoPE (interleaved pairs) on XQ, XK at positions mod the mini-batch size b
    a_j   = base_lr * sigmoid(theta_h . x_j + beta_h) / f        (key factor of the inner lr)
    tok_i = max(0, 1/i + delta_i), i = 1..b                      (query factor)
    Z     = inner loop (dual form, architectures/ttt/dual.py)    (B, H, T, f)
    out   = Wo( LayerNorm_d(concat_heads(Z)) [* g] )

Options (conf/arch/*.yaml; the defaults are the paper's TTT, and the Table 1 ablation ladder,
conf/arch/table1_*.yaml, turns them off one by one; TABLE1 in architectures/ttt/__init__.py):
    mini_batch     b, an int (16), or "seq": b = max_seq_len, batch GD over the whole sequence
    inner_ln       true: f(x) = x + LN(f_res(x)) has its per-head LN (false: no LN, no LN parameters)
    inner_residual true: ... and its residual x; the target is v - k (false: f = [LN](f_res), target v)
    inner_bias     true: TTT-Linear's f_res(x) = x W + b (false: x W)              (TTT-Linear only)
    learnable_w0   true: W0 (and b0) are outer parameters (false: W0 = 0, b0 = 0, fixed) (TTT-Linear only)
    learnable_lr   true: eta[i, j] = tok_i a_j above (false: a constant eta = base_lr for every j <= i,
                   no lr gate, no token offset). The inner loss is 0.5 ||f(k) - v||^2, so eta = 1 here is
                   the paper's eta = 1/2 on ||f(k) - v||^2 (Theorem 1)
    backend        what computes the inner loop (architectures/backends.py; resolve_ttt_backend):
                   auto      triton on CUDA where a kernel applies; without CUDA, cpp where it applies and
                             builds; else torch
                   triton    the Triton kernels (triton_linear.py, triton_mlp.py)
                   cpp       cpu_scan.py, for CPU tensors: the loops over whole mini-batches as one C++ call
                             each, forward and backward (TTT-Linear: scan.py's LinearScan; TTT-MLP: MLPScan),
                             and without a gradient (prefill, decoding) the whole inner loop of both in C++; a
                             prefill of whole mini-batches runs everything between the layer's products in C++
                             (TTTLayer._cpp_prefill: the QK convs, RoPE, key factor, loop, post-norm and gate)
                   torch     the fastest PyTorch implementation that applies: scan, else dual
                   scan      scan.py: TTT-Linear's loop over whole mini-batches as one autograd op with the
                             hand-derived backward, ~2x faster to train on CPU than dual
                   dual      dual.py: the dual form, autograd through every mini-batch
                   reference reference.py: token by token, the oracle of the tests (slow)
Without inner_ln, inner_residual, inner_bias, or with mini-batches longer than dual.LONG_PIECE (64), the
Triton kernels, cpp and scan do not apply (auto and torch: dual).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.config import ModelConfig
from architectures.layers import (CausalConv, RMSNorm, SwiGLU, add_rms_norm, apply_rope_periodic, constant_table,
                                  conv_residual, cpp_inference, keep_state, rope_period)
from architectures.backends import BackendUnavailable, resolve, runs, triton_interpreting, triton_unavailable
from architectures.ttt.dual import LONG_PIECE, InnerState, ttt_dual
from architectures.ttt import cpu_scan
from architectures.ttt.scan import CPP, EAGER, ScanKernels
from architectures.ttt.reference import ttt_reference_op

INNER = ("linear", "mlp")
BACKBONES = ("mamba", "transformer")
TRITON_INNERS = ("linear", "mlp")  # inner models with Triton kernels (triton_linear.py, triton_mlp.py)
# TTT-MLP's kernels read W1, b1, W2 a tile of hidden units at a time, so they fit at every head dim (`make
# check-kernels`: the backward at f = 64 / 128 takes 96 / 192 KB of shared memory, sm_90 has 227 KB). They are
# not yet timed against the dual form on a GPU, so `auto` takes them only up to this head dim (where the kernels
# that held the weights whole ran before); `backend=triton` runs them at any.
MLP_TRITON_AUTO_MAX_HEAD_DIM = 32


def resolve_ttt_backend(requested: str, inner: str, paper_f: bool = True, head_dim: int = 64) -> str:
    """The backend that runs (module docstring; architectures/backends.py): triton, cpp, scan, dual or reference.
    auto: Triton where it runs (triton installed, CUDA; the interpreter, TRITON_INTERPRET=1, only when
    asked for by name) and has a kernel for this inner model; on a machine without CUDA, cpp where it applies
    and builds (cpu_scan.py); else torch; torch: scan where it applies, else dual. paper_f=False (inner_ln,
    inner_residual or inner_bias off, or a mini-batch longer than dual.LONG_PIECE): the kernels, cpp and
    scan compute only f(x) = x + LN(x W + b) over short mini-batches,
    so they raise when asked for. auto takes TTT-MLP's kernels only up to MLP_TRITON_AUTO_MAX_HEAD_DIM (above
    it, torch) until they are timed on a GPU."""
    paper_f_only = (f"computes f(x) = x + LN(x W + b) over mini-batches of at most {LONG_PIECE} tokens: inner_ln, "
                    f"inner_residual and inner_bias must be true and mini_batch <= {LONG_PIECE}")

    def triton() -> str | None:
        if inner not in TRITON_INNERS:
            return f"has no kernel for TTT-{inner}"
        if not paper_f:
            return paper_f_only
        return triton_unavailable()

    def scan() -> str | None:
        if inner != "linear":
            return "is TTT-Linear's loop (scan.py); use backend=dual for TTT-MLP"
        return None if paper_f else paper_f_only

    def cpp() -> str | None:
        return cpu_scan.unavailable() if paper_f else paper_f_only

    torch_backends = {"scan": scan, "dual": runs, "reference": runs}
    if requested == "torch":
        return resolve("backend", "auto", torch_backends, prefer=lambda name: name != "reference")
    cuda = torch.cuda.is_available()  # auto: Triton on CUDA machines, C++ on the others
    triton_timed = inner == "linear" or head_dim <= MLP_TRITON_AUTO_MAX_HEAD_DIM
    chosen = resolve("backend", requested, {"triton": triton, "cpp": cpp, "torch": runs, **torch_backends},
                     prefer=lambda name: {"triton": cuda and triton_timed, "cpp": not cuda}.get(name, True))
    return resolve_ttt_backend("torch", inner, paper_f, head_dim) if chosen == "torch" else chosen


def resolve_mini_batch(cfg: ModelConfig) -> int:
    """The inner mini-batch size b: options.mini_batch, an int, or "seq" for the whole sequence
    (b = max_seq_len: batch gradient descent, Table 1 rows 3-5)."""
    given = cfg.opt("mini_batch")
    b = cfg.max_seq_len if str(given) == "seq" else int(given)
    if b <= 0:
        raise ValueError(f"TTT mini_batch must be a positive int or 'seq', got {given!r}")
    return b


def ttt_flags(cfg: ModelConfig) -> dict[str, bool]:
    """The Table 1 ablation options (module docstring), all true by default (the paper's TTT)."""
    flags = {n: bool(cfg.opt(n)) for n in ("inner_ln", "inner_residual", "inner_bias", "learnable_w0", "learnable_lr")}
    if str(cfg.opt("inner")) != "linear" and not (flags["inner_bias"] and flags["learnable_w0"]):
        raise ValueError("TTT options inner_bias=false and learnable_w0=false are for TTT-Linear only "
                         "(a TTT-MLP from W0 = 0 has zero gradients)")
    return flags


@constant_table
def _inverse_positions(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1/i for i = 1..b, (b,), made once per (b, dtype, device): a layer's every call (a decode step's too) adds
    delta to it instead of building it again in three ops."""
    return 1.0 / torch.arange(1, b + 1, device=device, dtype=dtype)


class TTTCache:
    """Decode state of one TTT block: conv states, the inner state; `seen` is the shell's count."""

    def __init__(self):
        self.conv_pre = self.conv_q = self.conv_k = None
        self.inner: InnerState | None = None  # None: the learned initial weights
        self.seen = 0


class TTTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner, self.backbone = str(cfg.opt("inner")), str(cfg.opt("backbone"))
        if self.inner not in INNER or self.backbone not in BACKBONES:
            raise ValueError(f"TTT options: inner in {INNER}, backbone in {BACKBONES}; got "
                             f"{self.inner!r}, {self.backbone!r}")
        flags = ttt_flags(cfg)
        self.inner_ln, self.inner_residual, self.inner_bias = (flags[n] for n in ("inner_ln", "inner_residual",
                                                                                "inner_bias"))
        self.learnable_w0, self.learnable_lr = flags["learnable_w0"], flags["learnable_lr"]
        self.mini_batch = resolve_mini_batch(cfg)
        paper_f = self.inner_ln and self.inner_residual and self.inner_bias and self.mini_batch <= LONG_PIECE
        self._paper_f = paper_f
        self.backend = resolve_ttt_backend(str(cfg.opt("backend")), self.inner, paper_f, cfg.head_dim)
        base_lr, base_lr_init = cfg.opt("base_lr"), cfg.opt("base_lr_init")  # None: the defaults below
        self.base_lr = float(base_lr if base_lr is not None else 1.0 if self.inner == "linear" else 0.1)
        self.base_lr_init = float(base_lr_init if base_lr_init is not None else self.base_lr)  # warmed up to
        #   base_lr with the outer lr
        self.base_lr_now = self.base_lr
        self.rope_theta = float(cfg.opt("rope_theta"))
        self.checkpoint_group = int(cfg.opt("checkpoint_group"))
        d, H, f = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim = H, f
        self.wq = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        if self.backbone == "mamba":
            width = int(cfg.opt("conv_width"))
            self.conv_q, self.conv_k = CausalConv(d, width), CausalConv(d, width)
            self.conv_q.cpp = self.conv_k.cpp = self.backend == "cpp"  # backend=cpp: the convs in C++ too
            self.conv_q.triton = self.conv_k.triton = self.backend == "triton"  # ... triton: in Triton
            self.wg = nn.Linear(d, d, bias=False)
        else:
            self.wk = nn.Linear(d, d, bias=False)
        if self.learnable_lr:
            self.lr_gate = nn.Linear(d, H)  # theta_h (d) and beta_h per head
            self.token_offset = nn.Parameter(torch.zeros(self.mini_batch))  # delta
        if self.inner_ln:
            self.ln_weight = nn.Parameter(torch.ones(H, f))
            self.ln_bias = nn.Parameter(torch.zeros(H, f))
        std = cfg.init_std
        if self.inner == "linear":
            w0 = nn.Parameter(torch.randn(H, f, f) * std) if self.learnable_w0 else torch.zeros(H, f, f)
            self._inner_init("W", w0)
            if self.inner_bias:
                self._inner_init("b", nn.Parameter(torch.zeros(H, f)) if self.learnable_w0 else torch.zeros(H, f))
        else:
            self.W1 = nn.Parameter(torch.randn(H, f, 4 * f) * std)
            self.b1 = nn.Parameter(torch.zeros(H, 4 * f))
            # recipe init ttt_jax: W2_0 ~ N(0, std / sqrt(2 L)) as ttt-lm-jax draws it (ttt/models/ttt_layer.py,
            # TTTMLPBase.setup: initializer_range / sqrt(2 num_hidden_layers)); W1_0 N(0, std) in both
            w2_std = std / math.sqrt(2 * cfg.n_layers) if cfg.recipe.init == "ttt_jax" else std
            self.W2 = nn.Parameter(torch.randn(H, 4 * f, f) * w2_std)
            self.b2 = nn.Parameter(torch.zeros(H, f))
        self.post_norm = nn.LayerNorm(d, eps=1e-6)
        self._compiled_piece = None  # set by compile_hot_path()
        self._scan_kernels = EAGER  # compiled by compile_hot_path()

    def _inner_init(self, name: str, value: torch.Tensor) -> None:
        """An initial inner weight: an outer parameter, or (learnable_w0=false) a fixed zero buffer
        (not in the state dict: it is always zero)."""
        if isinstance(value, nn.Parameter):
            setattr(self, name, value)
        else:
            self.register_buffer(name, value, persistent=False)

    # -- the inner learning rate ------------------------------------------------------------
    def set_train_progress(self, step: int, warmup_steps: int) -> None:
        """TTT-MLP's base lr warms up linearly with the outer lr (base_lr_init -> base_lr)."""
        frac = min(1.0, (step + 1) / max(1, warmup_steps))
        self.base_lr_now = self.base_lr_init + frac * (self.base_lr - self.base_lr_init)

    def token_factor(self) -> torch.Tensor:
        """tok_i = max(0, 1/i + delta_i), i = 1..b: (b,). A constant eta (learnable_lr=false): 1."""
        if not self.learnable_lr:
            return torch.ones(self.mini_batch, device=self.post_norm.weight.device, dtype=self.post_norm.weight.dtype)
        delta = self.token_offset
        if torch.compiler.is_compiling():  # computed in the graph (no trace of the cache)
            inverse = 1.0 / torch.arange(1, self.mini_batch + 1, device=delta.device, dtype=delta.dtype)
        else:
            inverse = _inverse_positions(self.mini_batch, delta.dtype, delta.device)
        return torch.clamp(inverse + delta, min=0.0)

    def key_factor(self, x: torch.Tensor) -> torch.Tensor:
        """a_j = base_lr * sigmoid(theta_h . x_j + beta_h) / f: (B, H, T). A constant eta
        (learnable_lr=false): a_j = base_lr."""
        if not self.learnable_lr:
            B, T = x.shape[:2]
            return torch.full((B, self.n_heads, T), self.base_lr_now, device=x.device,
                              dtype=torch.promote_types(x.dtype, torch.float32))
        gate = torch.sigmoid(self.lr_gate(x).to(torch.promote_types(x.dtype, torch.float32)))  # (B, T, H)
        return self.base_lr_now * gate.transpose(1, 2) / self.head_dim

    def inner_lr(self, x: torch.Tensor) -> torch.Tensor:
        """The full b x b inner learning-rate matrix of the first mini-batch of x, E[i, j] = tok_i a_j
        (before the causal mask): rank 1 per head. (B, H, b, b). For tests and inspection."""
        a = self.key_factor(x[:, : self.mini_batch])  # (B, H, b)
        return self.token_factor()[:, None] * a[..., None, :]

    def initial_params(self) -> dict[str, torch.Tensor]:
        names = ("W", "b") if self.inner == "linear" else ("W1", "b1", "W2", "b2")
        return {n: getattr(self, n) for n in names if hasattr(self, n)}  # no "b": inner_bias=false

    def initial_state(self, dt) -> InnerState:
        """The inner state before a sequence's first token: the initial weights in dtype dt (a decode step
        continues its cache's state and does not cast them again)."""
        return InnerState.fresh({n: p.to(dt) for n, p in self.initial_params().items()})

    def inner_ln_params(self, dt) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner LN's (H, f) weight and bias in dtype dt; without it (inner_ln=false), ones and
        zeros that the inner loop does not use."""
        if self.inner_ln:
            return self.ln_weight.to(dt), self.ln_bias.to(dt)
        H, f, dev = self.n_heads, self.head_dim, self.post_norm.weight.device
        return torch.ones(H, f, device=dev, dtype=dt), torch.zeros(H, f, device=dev, dtype=dt)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: TTTCache | None = None) -> torch.Tensor:
        B, T, d = x.shape
        H, f = self.n_heads, self.head_dim
        if self._cpp_prefill_applies(x, cache):
            return self._cpp_prefill(x, cache)
        if self._cpp_decode_applies(x, cache):
            return self._cpp_decode(x, cache)
        seen = 0 if cache is None else cache.seen
        if self.backbone == "mamba":
            u = self.wq(x)
            q, sq = self.conv_q(u, None if cache is None else cache.conv_q)
            k, sk = self.conv_k(u, None if cache is None else cache.conv_k)
            if cache is not None:
                cache.conv_q, cache.conv_k = keep_state(cache.conv_q, sq), keep_state(cache.conv_k, sk)
        else:
            q, k = self.wq(x), self.wk(x)
        v = self.wv(x)
        q, k, v = (t.view(B, T, H, f) for t in (q, k, v))
        q, k = (apply_rope_periodic(t, seen, self.mini_batch, self.rope_theta) for t in (q, k))  # RoPE restarts
        #   every mini-batch
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, f)
        z = self._inner_loop(q, k, v, self.key_factor(x), cache)  # (B, H, T, f)
        y = self.post_norm(z.to(x.dtype).transpose(1, 2).reshape(B, T, d))
        if self.backbone == "mamba":
            y = y * F.gelu(self.wg(x), approximate="tanh")  # inner.gelu_tanh's formula, in one fused op each way
        return self.wo(y)

    def _cpp_eager(self, x: torch.Tensor) -> bool:
        """Whether x goes through the C++ inference paths at all: backend cpp without a gradient, eagerly, without
        autocast, on a CPU x in fp32, the inner loop's dtype. fp64 layers (the tests' oracle runs) keep the ops one by
        one, whose RoPE rotates in fp32 as on every other path; tests/test_ttt.py checks the C++ paths' kernels in
        fp64 and the layer in fp32."""
        return (self.backend == "cpp" and not torch.is_autocast_enabled("cpu")
                and cpp_inference(x, self.post_norm.weight))

    def _cpp_prefill_applies(self, x: torch.Tensor, cache: TTTCache | None) -> bool:
        """Whether _cpp_prefill runs this call: _cpp_eager, over whole mini-batches from a mini-batch's start (a
        prefill of a multiple of b tokens). Else _cpp_decode where it applies, or the layer's ops one by one."""
        if not self._cpp_eager(x):
            return False
        state, T = None if cache is None else cache.inner, x.shape[1]
        return (T > 0 and T % self.mini_batch == 0 and (cache is None or cache.seen % self.mini_batch == 0)
                and (state is None or (state.offset == 0 and not state.acc)))

    def _cpp_prefill(self, x: torch.Tensor, cache: TTTCache | None) -> torch.Tensor:
        """The layer over whole mini-batches with everything between its products in C++ (where
        _cpp_prefill_applies): the QK convs (Mamba backbone), the RoPE of q and k, the key factor from x and the inner
        loop as one call (cpu_scan.infer, infer_mlp), then the post-norm and the gate as one more (cpu_scan.output).
        At a prefill of 1k tokens the two dozen ops they take one by one cost more than their arithmetic. x (B, T, d)
        -> (B, T, d), the same numbers as forward's ops to fp32 rounding (tests/test_ttt.py)."""
        B, T, d = x.shape
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, f), laid out (B, T, H, f)
        q, k, u = self._qk_inputs(x, cache)
        state = cache.inner if cache is not None and cache.inner is not None else self.initial_state(x.dtype)
        rope = rope_period(self.head_dim, self.mini_batch, self.rope_theta, x.device)  # (b, f/2) each: positions
        #   0 .. b - 1 of every mini-batch
        tok, (gamma, beta) = self.token_factor().to(x.dtype), self.inner_ln_params(x.dtype)
        a = self._key_factor_input(x)
        if self.inner == "linear":
            z, W, b = cpu_scan.infer(q, k, v, a, tok, gamma, beta, state.params["W"], state.params["b"], rope)
            weights = {"W": W, "b": b}
        else:
            z, weights = cpu_scan.infer_mlp(q, k, v, a, tok, gamma, beta, state.params, rope)
        self._keep_conv_states(u, cache)
        if cache is not None:
            cache.inner = InnerState(weights)
        return self._output(x, z)  # z laid out (B, T, H, f): its transpose back is a view

    def _cpp_decode_applies(self, x: torch.Tensor, cache: TTTCache | None) -> bool:
        """Whether _cpp_decode runs this call: as _cpp_prefill (_cpp_eager) with a cache, over tokens that stay
        inside one mini-batch (a decode step; the tokens that finish an open mini-batch)."""
        if cache is None or not self._cpp_eager(x):
            return False
        offset = 0 if cache.inner is None else cache.inner.offset
        return 0 < x.shape[1] and offset + x.shape[1] <= self.mini_batch and cache.seen % self.mini_batch == offset

    def _cpp_decode(self, x: torch.Tensor, cache: TTTCache) -> torch.Tensor:
        """Tokens inside one mini-batch (where _cpp_decode_applies) with everything between the layer's products in
        C++: one call gathers q and k (the Mamba backbone's convs from the cache's states), rotates them at their
        positions in the mini-batch, forms the target and computes a (cpu_scan.gather); the decode kernel runs the
        tokens through the accumulators (cpu_scan.decode, decode_mlp, as dual.ttt_dual's pieces); cpu_scan.output
        applies the post-norm and the gate. x (B, T, d) -> (B, T, d)."""
        B, T, d = x.shape
        dt, b = x.dtype, self.mini_batch
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k, u = self._qk_inputs(x, cache)
        state = cache.inner if cache.inner is not None else self.initial_state(dt)
        off = state.offset
        rope = rope_period(self.head_dim, b, self.rope_theta, x.device)
        q, k, t, a = cpu_scan.gather(q, k, v, self._key_factor_input(x), rope, off)
        self._keep_conv_states(u, cache)
        tok, (gamma, beta) = self.token_factor().to(dt)[off:off + T], self.inner_ln_params(dt)
        complete = off + T == b
        if self.inner == "linear":
            z, new, acc = cpu_scan.decode(q, k, t, a, tok, complete, gamma, beta, state.params["W"],
                                          state.params["b"], state.acc)
        else:
            z, new, acc = cpu_scan.decode_mlp(q, k, t, a, tok, complete, gamma, beta, state.params, state.acc)
        cache.inner = InnerState({**state.params, **new}, acc, (off + T) % b)
        return self._output(x, z)

    def _qk_inputs(self, x: torch.Tensor, cache: TTTCache | None):
        """q and k as the C++ inference paths take them: the Mamba backbone's convs of u = x Wq (cpu_scan.Convs, with
        the cache's conv states) and None, or the projections (B, H, T, f); and u (None on the Transformer backbone),
        from which the caller takes the convs' new states after the call."""
        B, T, d = x.shape
        if self.backbone != "mamba":
            return *(w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk)), None
        u = self.wq(x)
        states = (None, None) if cache is None else (cache.conv_q, cache.conv_k)
        return cpu_scan.Convs(u, self.conv_q.weight, self.conv_q.bias, self.conv_k.weight, self.conv_k.bias,
                              *states), None, u

    def _key_factor_input(self, x: torch.Tensor):
        """key_factor's a as the C++ inference paths take it: a cpu_scan.Gate from x, or a itself (learnable_lr off)."""
        if self.learnable_lr:
            return cpu_scan.Gate(x, self.lr_gate.weight, self.lr_gate.bias, self.base_lr_now / self.head_dim)
        return self.key_factor(x)

    def _keep_conv_states(self, u: torch.Tensor | None, cache: TTTCache | None) -> None:
        """The convs' states after u (after the C++ call, which read the old ones: keep_state writes in place)."""
        if u is not None and cache is not None:
            cache.conv_q = keep_state(cache.conv_q, self.conv_q.next_state(u, cache.conv_q))
            cache.conv_k = keep_state(cache.conv_k, self.conv_k.next_state(u, cache.conv_k))

    def _output(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Wo of the post-norm and the gate (cpu_scan.output, one C++ pass) of the inner loop's z (B, H, T, f)."""
        B, T, d = x.shape
        gate = self.wg(x) if self.backbone == "mamba" else None
        z = z.transpose(1, 2).reshape(B, T, d)
        return self.wo(cpu_scan.output(z, self.post_norm.weight, self.post_norm.bias, gate, self.post_norm.eps))

    def _inner_loop(self, q, k, v, a, cache: TTTCache | None) -> torch.Tensor:
        """The inner loop in fp32 (W and its accumulators stay fp32 under autocast)."""
        dt = torch.promote_types(self.post_norm.weight.dtype, torch.float32)  # fp32, or fp64 in tests
        with torch.autocast(q.device.type, enabled=False):
            q, k, v, a = q.to(dt), k.to(dt), v.to(dt), a.to(dt)
            tok, (ln_w, ln_b) = self.token_factor().to(dt), self.inner_ln_params(dt)
            opts = {"ln": self.inner_ln, "residual": self.inner_residual}
            state = cache.inner if cache is not None and cache.inner is not None else self.initial_state(dt)
            args = (self.inner, state, q, k, v, a, tok, ln_w[:, None], ln_b[:, None], self.mini_batch)  # one
            #   op signature and state (InnerState) for every backend: dual.py, triton_op.py, reference.py
            if self.backend == "triton":
                if q.device.type != "cuda" and not triton_interpreting():
                    raise BackendUnavailable(f"TTT backend=triton needs CUDA tensors, got {q.device}")
                from architectures.ttt.triton_op import ttt_triton

                out, new_state = ttt_triton(*args, self.checkpoint_group)
            elif self.backend == "reference":  # the token-by-token oracle (reference.py)
                out, new_state = ttt_reference_op(*args, **opts)
            else:
                if q.device.type != "cpu" and self.backend == "cpp":
                    raise BackendUnavailable(f"TTT backend=cpp needs CPU tensors, got {q.device}")
                scan = {"scan": self._scan_kernels if self.training else EAGER, "cpp": CPP}.get(self.backend)
                out, new_state = ttt_dual(*args, self.checkpoint_group if self.training else 0,
                                          self._compiled_piece if self.training else None, **opts, scan=scan)
            if cache is not None:
                cache.inner = new_state
            return out

    def compile_hot_path(self) -> None:
        """torch.compile the per-mini-batch work (training only): scan's elementwise kernels, or the dual
        form's whole per-mini-batch step (fusing the LN gradient and GELU, about 1.5x on CPU). The loop
        over mini-batches stays in Python, so the graphs are small and compile once per shape."""
        from architectures.ttt.dual import PIECE

        if self.backend == "cpp":
            return  # the loops are compiled C++ already
        if self.backend == "scan":
            self._scan_kernels = ScanKernels.compiled()
        else:
            self._compiled_piece = torch.compile(PIECE[self.inner], dynamic=False)


class TTTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ttt = TTTLayer(cfg)
        if self.ttt.backbone == "mamba":
            self.conv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.pre_conv = CausalConv(cfg.d_model, int(cfg.opt("conv_width")))
            self.pre_conv.cpp = self.ttt.backend == "cpp"
            self.pre_conv.triton = self.ttt.backend == "triton"
        self.ttt_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.ffn else None  # cfg.ffn false: no FFN
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim) if cfg.ffn else None
        for norm in (getattr(self, "conv_norm", None), self.ttt_norm, self.ffn_norm):
            if norm is not None:
                norm.cpp = self.ttt.backend == "cpp"  # backend=cpp: the norms' inference in C++ too

    def forward(self, h: torch.Tensor, cache: TTTCache | None = None) -> torch.Tensor:
        if self.ttt.backbone == "mamba":  # h + conv(norm(h)) and the TTT norm after it, one C++ pass in a cpp prefill
            h, x, state = conv_residual(h, self.conv_norm, self.pre_conv, self.ttt_norm,
                                        None if cache is None else cache.conv_pre)
            if cache is not None:
                cache.conv_pre = keep_state(cache.conv_pre, state)
        else:
            x = self.ttt_norm(h)
        if self.ffn is None:
            return h + self.ttt(x, cache)
        h, x = add_rms_norm(h, self.ttt(x, cache), self.ffn_norm)  # one C++ pass in a cpp prefill
        return h + self.ffn(x)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> TTTCache:
        return TTTCache()

    def backends(self) -> dict[str, str]:
        return {"ttt": self.ttt.backend}
