"""`make throughput`: lengths, timing rows for every mode, skipped and failed points recorded instead of
crashing, the merged CSV, plots, and the bad-input guard."""
import csv

import pytest
import torch

import bench.throughput as tp
from bench.throughput import COLUMNS, _predicted, lengths_up_to, main
from bench.timing import measure_in_rounds


def test_lengths_double_from_1k_up_to_ctx():
    assert lengths_up_to(32768) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert lengths_up_to(3000) == [1024, 2048]
    assert lengths_up_to(512) == [512]


def test_prediction_follows_the_measured_scaling():
    assert _predicted([], 2048) == 0.0
    assert _predicted([(1024, 1.0)], 2048) == pytest.approx(4.0)  # one point: assume quadratic
    assert _predicted([(1024, 1.0), (2048, 2.0)], 4096) == pytest.approx(4.0)  # linear so far
    assert _predicted([(1024, 1.0), (2048, 8.0)], 4096) == pytest.approx(32.0)  # capped at quadratic


def test_train_points_take_the_sweeps_micro_batch():
    """The sequences of one forward + backward as `make sweep` trains at each length (bench/train.py's Plan): cpu-xs's
    8192 tokens per step, in micro-batches of at most 8 sequences; the paper's 0.5M tokens per step at 1.3B."""
    assert [tp.sweep_micro_batch("ttt_linear", "cpu-xs", 1024 * 2 ** i) for i in range(6)] == [8, 4, 2, 1, 1, 1]
    assert tp.sweep_micro_batch("transformer", "1.3b", 2048, "paper") == 16
    assert tp.sweep_micro_batch("mamba", "cpu-xs", 1024, overrides=("trainer.micro_batch=2",)) == 2


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 21 s on 2 cores (10 rounds of 12 points); the fast tier keeps this file's tests of rounds,
# budgets, failures, overrides and micro-batches, each on fewer points
def test_throughput_end_to_end_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # eager training (--compile none): the pipeline is the subject here, and compiling TTT's scan blocks for
    # these shapes would take half a minute (tests/test_ttt.py checks the compiled path)
    assert main(["--arch", "transformer,ttt_linear", "--ctx", "2k", "--size", "smoke-xs", "--compile", "none",
                 "--results", str(tmp_path)]) == 0
    rows = read(tmp_path / "throughput.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["time_per_token_s"]) > 0 and float(r["tokens_per_s"]) > 0
        assert r["device"] and r["backend"] and int(r["threads"]) >= 1
    by = {(r["arch"], r["mode"], r["ctx"]): r for r in rows}
    assert by[("transformer", "prefill", "2048")]["backend"] == "attention=sdpa"
    assert by[("ttt_linear", "decode", "1024")]["backend"] == "ttt=cpp"  # decoding: dual.py's partial mini-batches
    assert float(by[("transformer", "train", "2048")]["peak_mem_bytes"]) > 0
    assert by[("ttt_linear", "train", "2048")]["compile"] == "none"
    assert {r["rounds"] for r in rows} == {"10"}  # CPU: each architecture's points timed together
    for T, seqs in ((1024, 4), (2048, 2)):  # as `make sweep` trains smoke-xs: 4096 tokens per forward + backward
        train = by[("ttt_linear", "train", str(T))]
        assert int(train["batch"]) == seqs
        assert float(train["time_per_token_s"]) * float(train["tokens_per_s"]) == pytest.approx(1.0)  # per token
    for plot in ("prefill_latency.png", "decode_latency.png", "train_throughput.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 10_000
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    # a second run of one architecture replaces its rows and keeps the other's
    assert main(["--arch", "transformer", "--ctx", "1k", "--size", "smoke-xs", "--modes", "prefill",
                 "--results", str(tmp_path)]) == 0
    rows = read(tmp_path / "throughput.csv")
    assert len(rows) == 12 and sum(r["arch"] == "ttt_linear" for r in rows) == 6


def test_slow_and_failing_points_are_rows_not_crashes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["--arch", "mamba", "--ctx", "2k", "--size", "smoke-xs", "--max-seconds", "1e-6",
                 "--results", str(tmp_path)]) == 0
    rows = {(r["mode"], r["ctx"]): r["status"] for r in read(tmp_path / "throughput.csv")}
    assert rows[("prefill", "1024")] == "ok" and rows[("prefill", "2048")].startswith("skipped: predicted")
    assert rows[("train", "2048")].startswith("skipped: predicted")

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(tp, "decoder_after", oom)  # after the prefill has warmed up (and with --rounds 1, been timed)
    for rounds in ("1", "10"):
        out = tmp_path / f"oom{rounds}"
        assert main(["--arch", "transformer", "--ctx", "1k", "--size", "smoke-xs", "--rounds", rounds,
                     "--results", str(out)]) == 0
        rows = [(r["mode"], r["status"]) for r in read(out / "throughput.csv")]
        assert sorted(rows) == [("decode", "out of memory"), ("prefill", "out of memory"), ("train", "ok")]


def test_points_are_timed_in_rounds_and_decode_points_while_their_caches_fit(tmp_path, monkeypatch):
    """--rounds 3: an architecture's points are warmed up length by length and timed together after its last, every
    decode cache held until then; with no memory to hold caches in (free_memory 0) each decode point is timed at
    once, and its row says so. --rounds 1: every point in turn, each timed right after its warm-up."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    together = []
    real = tp.measure_in_rounds

    def recording(pending, device, rounds):
        together.append((len(pending), rounds))
        return real(pending, device, rounds)

    monkeypatch.setattr(tp, "measure_in_rounds", recording)

    def run(rounds: str, ctx: str, modes: str) -> list[tuple]:
        out = tmp_path / f"{rounds}-{ctx}-{modes}"
        assert main(["--arch", "mamba", "--ctx", ctx, "--size", "smoke-xs", "--modes", modes, "--compile", "none",
                     "--rounds", rounds, "--results", str(out)]) == 0
        return sorted((r["mode"], r["ctx"], r["status"], r["rounds"]) for r in read(out / "throughput.csv"))

    assert run("3", "2k", "prefill,decode,train") == [(m, T, "ok", "3") for m in ("decode", "prefill", "train")
                                                      for T in ("1024", "2048")]
    assert together == [(6, 3)]  # prefill, decode and train at 1k and 2k
    monkeypatch.setattr(tp, "free_memory", lambda device: 0)
    assert run("3", "1k", "prefill,decode") == [("decode", "1024", "ok", "1"), ("prefill", "1024", "ok", "3")]
    assert together[1:] == [(1, 3)]
    assert run("1", "1k", "prefill,decode") == [("decode", "1024", "ok", "1"), ("prefill", "1024", "ok", "1")]
    assert together[2:] == [(1, 1)]  # the prefill alone, right after its warm-up (the decode point: time_decoder)


def test_a_budget_shares_what_is_left_among_the_architectures_to_come():
    """Budget on a clock we move by hand: equal shares of what is left, the rest of a fast architecture passed on,
    a point predicted to overrun refused with why, and a mode's first point (nothing to predict from) allowed."""
    now = [0.0]
    budget = tp.Budget(90.0, 3, clock=lambda: now[0])
    budget.start_arch()  # 90 s left for 3: 30 each
    assert budget.refuses([], 1024) is None  # the first point always runs
    now[0] = 10.0
    assert budget.refuses([(1024, 5.0)], 2048) is None  # 20 s (quadratic from one point) of the 20 left
    assert budget.refuses([(1024, 5.0), (2048, 10.0)], 4096) is None  # linear: 20 s
    now[0] = 15.0
    why = budget.refuses([(1024, 5.0), (2048, 10.0)], 4096)
    assert why == "skipped: predicted 20.0 s to measure > 15.0 s left of its share of --budget-s"
    now[0] = 20.0  # the first architecture ends 10 s early: 70 s left for 2
    budget.start_arch()
    assert budget.deadline == pytest.approx(55.0)
    now[0] = 100.0  # past the whole budget: only first points run
    budget.start_arch()
    assert budget.refuses([], 1024) is None and "0.0 s left" in budget.refuses([(1024, 0.1)], 2048)
    unlimited = tp.Budget(None, 2)
    unlimited.start_arch()
    assert unlimited.refuses([(1024, 1e9)], 2048) is None


def test_a_run_over_budget_measures_each_architecture_s_first_points_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["--arch", "transformer,mamba", "--ctx", "4k", "--size", "smoke-xs", "--modes", "prefill,decode",
                 "--budget-s", "0.01", "--results", str(tmp_path)]) == 0
    rows = {(r["arch"], r["mode"], int(r["ctx"])): r["status"] for r in read(tmp_path / "throughput.csv")}
    assert len(rows) == 2 * 2 * 3
    for (arch, mode, T), status in rows.items():
        assert status == "ok" if T == 1024 else status.startswith("skipped: predicted") and "--budget-s" in status


def test_set_overrides_every_architecture_s_model(tmp_path, monkeypatch):
    """--set arch.backend=dual times the dual form where auto would take the C++ loop; the row names it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["--arch", "ttt_linear,ttt_mlp", "--ctx", "1k", "--size", "smoke-xs", "--modes", "prefill",
                 "--set", "arch.backend=dual", "--results", str(tmp_path)]) == 0
    assert {(r["arch"], r["backend"], r["status"]) for r in read(tmp_path / "throughput.csv")} == {
        ("ttt_linear", "ttt=dual", "ok"), ("ttt_mlp", "ttt=dual", "ok")}


@pytest.mark.parametrize("with_memory", ["measure_with_memory", "warm_up_with_memory"])
def test_cpu_memory_is_sampled_apart_from_the_timed_calls(monkeypatch, with_memory):
    """PeakMemory's sampling thread competes with timed calls for the GIL and a core: on CPU no timed call (nor a
    warm-up call, whose times set the repeats) runs beside it, and the calls it samples still see a 64 MB
    allocation."""
    from bench import latency

    sampling, beside = [False], []  # whether the sampler runs; its value at each timed or warm-up call
    enter, exit_ = latency.PeakMemory.__enter__, latency.PeakMemory.__exit__

    def sampler_on(self):
        sampling[0] = True
        return enter(self)

    def sampler_off(self, *exc):
        sampling[0] = False
        return exit_(self, *exc)

    def noting_the_sampler(timer):
        def timing(fn, device, **kw):
            def timed():
                beside.append(sampling[0])
                fn()
            return timer(timed, device, **kw)
        return timing

    monkeypatch.setattr(latency.PeakMemory, "__enter__", sampler_on)
    monkeypatch.setattr(latency.PeakMemory, "__exit__", sampler_off)
    monkeypatch.setattr(latency, "measure", noting_the_sampler(latency.measure))
    monkeypatch.setattr(latency, "warm_up", noting_the_sampler(latency.warm_up))

    def allocate():
        torch.ones(16 * 2**20).add_(1)  # 64 MB, every page touched

    if with_memory == "measure_with_memory":
        timing, peak = latency.measure_with_memory(allocate, torch.device("cpu"), repeats=3)
    else:
        pending, peak = latency.warm_up_with_memory(allocate, torch.device("cpu"))
        timing = measure_in_rounds([pending], torch.device("cpu"), 1)[0]
    assert timing.median > 0 and len(beside) >= 3 and not any(beside)
    assert peak > 32 * 2**20


def test_a_run_cut_short_keeps_the_architectures_it_finished(tmp_path, monkeypatch):
    """`make gpu-check` stops a stage at its time limit: the rows of the architectures done by then are on disk."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    real = tp.run_arch

    def cut_at_mamba(arch, *args, **kw):
        if arch == "mamba":
            raise KeyboardInterrupt  # the process ends midway, as at a stage's time limit
        return real(arch, *args, **kw)

    monkeypatch.setattr(tp, "run_arch", cut_at_mamba)
    with pytest.raises(KeyboardInterrupt):
        main(["--arch", "transformer,mamba", "--ctx", "1k", "--size", "smoke-xs", "--modes", "prefill",
              "--results", str(tmp_path)])
    assert [(r["arch"], r["mode"], r["status"]) for r in read(tmp_path / "throughput.csv")] == [
        ("transformer", "prefill", "ok")]


@pytest.mark.parametrize("args,message", [(["--size", "huge"], "unknown SIZE 'huge'"),
                                          (["--match", "bytes"], "unknown MATCH"),
                                          (["--ctx", "2x"], "CTX must be"),
                                          (["--batch", "0"], "batch must be positive"),
                                          (["--budget-s", "-5"], "--budget-s must be a positive"),
                                          (["--rounds", "0"], "--rounds must be at least 1"),
                                          (["--set", "arch.no_such_option=1"], "Could not override")])
def test_bad_input(tmp_path, capsys, args, message):
    assert main([*args, "--results", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "throughput.csv").exists()


def _decode_steps(model, state, steps: int, span: int = 0, step=None):
    """Logits of `steps` single-token decode steps (a fixed token) from `state`, through `step` if given, their
    positions cycling every `span` (bench/latency._rewinding) if span."""
    from bench.latency import _rewinding

    token = torch.tensor([[7]])
    step = _rewinding(step or (lambda: model(token, state)), state, span)
    with torch.inference_mode():
        return torch.cat([step() for _ in range(steps)], dim=1)  # (1, steps, V)


@pytest.mark.parametrize("arch", ["ttt_linear", "ttt_mlp", "ttt_linear_base", "mamba", "mamba2"])
def test_rewound_recurrent_decode_steps_compute_what_the_sequence_going_on_would(arch):
    """A decode point cycles its steps' positions through T..T+span (bench/latency._rewinding) so that a window of
    up to 1000 steps fits the cache. For TTT (span a multiple of its mini-batch, whose RoPE is periodic in it) and
    Mamba, 130 rewound steps are the 130 steps of a sequence that goes on in a cache with room for them all."""
    from architectures import ModelConfig, build_model
    from bench.latency import decode_period

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, 61, 32, 2, 2, 64, 256)).eval()  # TTT: mini-batches of 16
    prompt = torch.randint(0, 61, (1, 32))
    span = 48 // decode_period(model) * decode_period(model)
    assert span == 48
    states = [model.new_state(1, 32 + room) for room in (span, 130)]
    with torch.inference_mode():
        for state in states:
            model(prompt, state)
    rewound = states[0]
    got = _decode_steps(model, rewound, 130, span)
    assert 32 <= rewound.seen <= 32 + span
    torch.testing.assert_close(got, _decode_steps(model, states[1], 130), rtol=1e-5, atol=1e-5)


def test_rewound_transformer_decode_steps_attend_to_the_same_keys_again():
    """The Transformer's rewound step writes the KV slots after the prompt again: with the same token, its steps
    repeat every span, each attending to T + 1 .. T + span keys."""
    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig("transformer", 61, 32, 2, 2, 64, 256)).eval()
    state = model.new_state(1, 32 + 48)
    with torch.inference_mode():
        model(torch.randint(0, 61, (1, 32)), state)
    got = _decode_steps(model, state, 100, 48)
    torch.testing.assert_close(got[:, 48:96], got[:, :48], rtol=0, atol=0)
    assert not torch.equal(got[:, 1], got[:, 0])  # the steps do differ by position


def test_a_decode_point_is_timed_over_a_window_of_steps(monkeypatch):
    """Outside the quick probe, decode steps warm up for 0.25 s and are timed over 0.5 s (48 to 1000 of them), like
    a prefill, 16 in a row per timed call (a TTT mini-batch); the probe keeps its 48 single steps after one."""
    import bench.latency as latency
    from architectures import ModelConfig, build_model

    seen = []
    real = latency.measure

    def recording(fn, device, **kw):
        seen.append(kw)
        return real(fn, device, **kw)

    monkeypatch.setattr(latency, "measure", recording)
    model = build_model(ModelConfig("mamba", 61, 32, 1, 2, 64, 64)).eval()
    *_, dec, _, _ = latency.prefill_and_decode(model, 1, 32, torch.device("cpu"), 61, graphs=False)
    assert seen[-1]["window_s"] == 0.5 and seen[-1].get("repeats") is None
    assert (seen[-1]["min_repeats"], seen[-1]["max_repeats"]) == (3, 62)  # calls of 16 steps
    assert 3 <= dec.repeats <= 62 and dec.median > 0
    latency.prefill_and_decode(model, 1, 32, torch.device("cpu"), 61, graphs=False, quick=True)
    assert (seen[-1].get("window_s", 0.0), seen[-1]["repeats"], seen[-1]["max_warmup_calls"]) == (0.0, 48, 1)


@pytest.mark.parametrize("arch", ["transformer", "ttt_linear", "ttt_mlp", "mamba", "mamba2"])
def test_prefill_and_decode_run_with_bf16_weights_and_leave_the_model_fp32(arch):
    """On CUDA, prefill and decode are timed on a bf16 copy of the model (bench/latency.inference_model: no per-call
    casts of fp32 weights); the same copy on CPU, under bf16 autocast as on CUDA: every architecture runs, its KV
    cache follows the weights, the recurrent states stay fp32, and the trained model is left fp32."""
    from architectures import ModelConfig, build_model
    from bench.latency import as_bf16, prefill_and_decode

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, 61, 32, 1, 2, 64, 64)).eval()
    infer = as_bf16(model)
    assert {p.dtype for p in infer.parameters()} == {torch.bfloat16}
    pre, _, dec, *_ = prefill_and_decode(infer, 1, 40, torch.device("cpu"), 61, graphs=False, quick=True)
    assert pre.median > 0 and dec.median > 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = infer.new_state(1, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = infer(torch.arange(8)[None])
        steps = torch.cat([infer(torch.arange(t, t + 1)[None], state) for t in range(8)], dim=1)
    assert (steps.float() - full.float()).abs().max() < 0.1 * full.float().abs().max()  # bf16 rounding, not a bug
    cache = state.caches[0]
    if arch == "transformer":
        assert cache.k.dtype == torch.bfloat16  # the KV cache in the compute dtype
    elif arch.startswith("ttt"):
        assert {t.dtype for t in cache.inner.params.values()} == {torch.float32}
    else:
        assert cache.ssm.dtype == torch.float32


def _cache_tensors(cache) -> dict[str, torch.Tensor]:
    """A block's decode cache as named tensors, the TTT inner state's included."""
    out = {}
    for name, value in vars(cache).items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif hasattr(value, "params"):  # TTT's InnerState
            out.update({f"{name}.{n}": t for n, t in value.params.items()})
            out.update({f"{name}.acc.{n}": t for n, t in value.acc.items()})
    return out


@pytest.mark.parametrize("arch", ["transformer_conv", "ttt_linear", "ttt_mlp", "mamba", "mamba2"])
def test_a_prefill_leaves_a_cache_that_holds_only_its_state(arch):
    """After a prefill of T tokens, each tensor of the decode cache owns no more memory than its own elements
    (a conv state, (B, k-1, C), once kept a view of the whole padded input, (B, T + k-1, C): at 1.3B, batch 16
    and 32k tokens, 2 GB per conv). The conv states are then updated in place by every decode step."""
    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, 61, 32, 2, 2, 64, 64)).eval()
    state = model.new_state(2, 600)
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 512)), state)
        tensors = [_cache_tensors(c) for c in state.caches]
        for named in tensors:
            for name, t in named.items():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        convs = [{n: t.data_ptr() for n, t in named.items() if n.startswith("conv")} for named in tensors]
        assert all(convs)
        for _ in range(3):
            model(torch.randint(0, 61, (2, 1)), state)
        assert [{n: t.data_ptr() for n, t in _cache_tensors(c).items() if n.startswith("conv")}
                for c in state.caches] == convs


def _decode_outputs(model, compile_decode: bool):
    """The outputs of 16 decode steps of one token after a 20-token prompt (the same token each time, as
    bench.latency steps) and the steps latency._compiled runs to compile (a TTT model's 32), eager or compiled,
    and the note."""
    from bench.latency import _compiled, decode_period

    torch.manual_seed(1)
    prompt, tok = torch.randint(0, 61, (2, 20)), torch.randint(0, 61, (2, 1))
    state = model.new_state(2, 68)
    step = lambda: model(tok, state)
    note = "none"
    with torch.no_grad():
        model(prompt, state)
        if compile_decode:
            torch._dynamo.reset()  # as bench.throughput does before each architecture
            step, note = _compiled(step, model)
        else:
            for _ in range(2 * decode_period(model)):  # the steps _compiled runs first
                step()
        return torch.cat([step() for _ in range(16)], 1), note


@pytest.mark.slow  # torch.compile: inductor from a cold cache, 10-35 s an architecture
@pytest.mark.parametrize("arch", ["ttt_linear", "transformer", "ttt_mlp", "mamba", "mamba2"])
def test_a_compiled_decode_step_equals_the_eager_one(arch):
    """`make throughput ARGS=--compile-decode` (bench/latency._compiled): the step through torch.compile is one
    graph (no graph break) and gives the eager step's outputs after its compiling steps (TTT: 32, crossing
    commits; their state carries into the steps compared, which cross one more); its note says when a backend=cpp
    layer's step ran as PyTorch ops (TTT's C++ decode step becomes the dual form's ops, compiled in five
    variants: a TTT mini-batch's first, middle and last tokens)."""
    from torch._dynamo.utils import counters

    from architectures import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, 61, 32, 1, 2, 64, 64)).eval()  # one layer: compiling takes half as long
    want, _ = _decode_outputs(model, compile_decode=False)
    counters.clear()
    got, note = _decode_outputs(model, compile_decode=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    cpp_step = model.backends() == {"ttt": "cpp"} or arch == "mamba2"
    assert note == "model (backend=cpp decode steps as PyTorch ops)" if cpp_step else note == "model"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torch.compile, as above
@pytest.mark.parametrize("arch", ["ttt_linear", "transformer"])
def test_a_compiled_decode_step_cycles_its_positions_without_compiling_again(arch):
    """`--compile-decode` with a decode point's window (bench/latency._rewinding): after _compiled's warm-up, 100
    steps whose positions go back by 48 compile no new graph and give the eager rewound steps' outputs."""
    from torch._dynamo.utils import counters

    from architectures import ModelConfig, build_model
    from bench.latency import _compiled, decode_period

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, 61, 32, 1, 2, 64, 256)).eval()
    prompt, token = torch.randint(0, 61, (1, 32)), torch.tensor([[7]])

    def rewound_steps(compiled: bool):
        state = model.new_state(1, 32 + 32 + 48)  # _compiled's warm-up (2 x 16 steps at most), the cycle
        with torch.inference_mode():
            model(prompt, state)
            step = lambda: model(token, state)
            if compiled:
                torch._dynamo.reset()
                before = counters["stats"]["unique_graphs"]
                step, note = _compiled(step, model)
                assert note.startswith("model") and counters["stats"]["unique_graphs"] > before, note  # it counts
            else:
                for _ in range(2 * decode_period(model)):  # the steps _compiled runs first
                    step()
            graphs = counters["stats"]["unique_graphs"]
            out = _decode_steps(model, state, 100, 48, step)
        return out, counters["stats"]["unique_graphs"] - graphs

    want, _ = rewound_steps(compiled=False)
    got, new_graphs = rewound_steps(compiled=True)
    assert new_graphs == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_decode_step_that_fails_to_compile_runs_eagerly_and_says_why(monkeypatch):
    """A compile error is a row that says why (CSV column compile), with the eager step's time, never a crash."""
    from bench import latency

    def broken(fn):
        def run():
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(latency.torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    step = lambda: None
    assert latency._compiled(step, model) == (step, "failed: RuntimeError: inductor exploded")


def test_a_cuda_graph_replays_a_whole_ttt_mini_batch_of_decode_steps():
    """On CUDA a graph replays the steps after which the work repeats (bench/latency.decode_period): a TTT
    mini-batch, whose last step commits the inner weights; one step elsewhere. Too long a period stays eager, and
    the row says why (capture itself needs a GPU: `make gpu-check` runs it)."""
    from architectures import ModelConfig, build_model
    from bench.latency import MAX_GRAPHED_STEPS, _graphed, decode_period

    period = lambda arch, **o: decode_period(build_model(ModelConfig(arch, 61, 32, 1, 2, 64, 64, options=o)))
    assert (period("ttt_linear"), period("ttt_mlp", mini_batch=8)) == (16, 8)
    assert period("transformer") == period("mamba") == period("mamba2") == 1
    step = lambda: None
    assert _graphed(step, MAX_GRAPHED_STEPS + 1) == (step, f"eager (a period of {MAX_GRAPHED_STEPS + 1} steps is "
                                                           "too long to capture)", 1)


def test_a_training_curve_is_one_line_through_the_sweeps_micro_batches(monkeypatch, tmp_path):
    """bench/plots.plot_speed_vs_context, train: the micro-batch changes with the context (8 x 1k, 4 x 2k, 2 x 4k,
    as `make sweep` trains), and each architecture is still one line (it was one unconnected point per batch, a
    legend entry each); a context measured at two batches (runs with and without --train-batch merged into one
    CSV) has a line per batch instead. Decode keeps its one batch. A colour per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bench import plots

    def row(arch, mode, ctx, batch):
        return {"arch": arch, "size": "cpu-xs", "mode": mode, "ctx": ctx, "batch": batch, "backend": "b",
                "device": "cpu", "status": "ok", "noisy": False, "time_per_token_s": 1e-5, "tokens_per_s": 1e5}

    rows = [row(arch, "train", 1024 * 2 ** i, 8 // 2 ** i) for arch in ("mamba", "ttt_linear") for i in range(3)]
    rows += [row("transformer", "train", ctx, batch) for ctx, batch in ((1024, 8), (2048, 4), (1024, 1), (2048, 1))]
    rows += [row(arch, "decode", 1024 * 2 ** i, 1) for arch in ("mamba", "ttt_linear") for i in range(3)]
    drawn = []
    monkeypatch.setattr(plots, "finish", lambda fig, path: drawn.append(fig))
    for mode in ("train", "decode"):
        plots.plot_speed_vs_context(pd.DataFrame(rows), mode, tmp_path / f"{mode}.png")
    train, decode = ({ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}
                     for fig in drawn)
    assert sorted(train) == ["mamba [b] cpu-xs B=8..2 (as make sweep)", "transformer [b] cpu-xs B=1",
                             "transformer [b] cpu-xs B=4", "transformer [b] cpu-xs B=8",
                             "ttt_linear [b] cpu-xs B=8..2 (as make sweep)"]
    assert list(train["mamba [b] cpu-xs B=8..2 (as make sweep)"].get_xdata()) == [1024, 2048, 4096]
    assert list(train["transformer [b] cpu-xs B=1"].get_xdata()) == [1024, 2048]
    assert train["transformer [b] cpu-xs B=1"].get_color() == train["transformer [b] cpu-xs B=4"].get_color()
    assert train["mamba [b] cpu-xs B=8..2 (as make sweep)"].get_color() != train["ttt_linear [b] cpu-xs B=8..2 (as make sweep)"].get_color()
    assert sorted(decode) == ["mamba [b] cpu-xs B=1", "ttt_linear [b] cpu-xs B=1"]
    for fig in drawn:
        plt.close(fig)
