"""bench/timing.py: warm-up until two calls agree, median and spread, re-measurement of noisy points;
bench/hardware.py: MFU from the peak table."""
import contextlib

import pytest
import torch

import bench.timing as timing

CPU = torch.device("cpu")


def fake_clock(monkeypatch, durations):
    """Each timed call 'takes' the next of `durations` seconds; returns the list of calls made."""
    it = iter(durations)
    calls = []

    def timer(fn, cuda):
        calls.append(1)
        return next(it)

    monkeypatch.setattr(timing, "_timer", timer)
    return calls


def test_warm_up_runs_until_two_consecutive_calls_agree(monkeypatch):
    # compile (5 s), allocator growth (0.5), then steady 0.20 / 0.21: settled after 4 warm-up calls
    fake_clock(monkeypatch, [5.0, 0.5, 0.20, 0.21] + [0.2] * 5)
    t = timing.measure(lambda: None, CPU)
    assert (t.warmup_calls, t.settled, t.noisy) == (4, True, False)
    assert t.median == pytest.approx(0.2) and t.repeats == 3 and t.spread == 0.0


def test_warm_up_is_bounded_and_says_it_did_not_settle(monkeypatch):
    fake_clock(monkeypatch, [1.0, 0.5, 1.0, 0.5, 1.0, 0.5] + [0.5] * 3)
    t = timing.measure(lambda: None, CPU)
    assert t.warmup_calls == timing.MAX_WARMUP_CALLS and not t.settled


def test_a_noisy_point_is_measured_again_and_flagged_only_if_it_stays_noisy(monkeypatch):
    # warm-up 0.1, 0.1; repeats 0.1 0.1 0.1 0.1 0.5 (spread 400%) -> again: steady -> not noisy
    calls = fake_clock(monkeypatch, [0.1, 0.1] + [0.1, 0.1, 0.1, 0.1, 0.5] + [0.1] * 5)
    t = timing.measure(lambda: None, CPU)
    assert len(calls) == 12 and not t.noisy and t.spread == 0.0 and t.median == pytest.approx(0.1)
    fake_clock(monkeypatch, [0.1, 0.1] + [0.1, 0.1, 0.1, 0.1, 0.5] + [0.1, 0.5, 0.1, 0.5, 0.1])
    t = timing.measure(lambda: None, CPU)
    assert t.noisy and t.spread == pytest.approx(4.0)


def test_spread_of_many_repeats_ignores_the_rare_slow_call():
    """48 decode steps of which 3 update TTT's weights (10x slower): the spread is the 10-90% range."""
    times = [1.0] * 45 + [10.0] * 3
    assert timing.relative_spread(times) == 0.0
    assert timing.relative_spread([1.0, 1.2, 2.0]) == pytest.approx(1.0 / 1.2)


def test_mfu_uses_the_datasheet_peak_and_none_where_unknown():
    from bench.hardware import mfu, peak_flops

    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu(6 * 125e6, 1e6, "NVIDIA H100 80GB HBM3") == pytest.approx(6 * 125e6 * 1e6 / 989e12)
    assert mfu(1e9, 1e3, "Intel(R) Xeon(R) CPU") is None and mfu(1e9, None, "NVIDIA H200") is None


def test_a_window_warms_short_calls_up_for_half_of_it_and_times_them_over_all_of_it(monkeypatch):
    """8 ms calls (a cpu-xs prefill): the first two agree at once, but the warm-up goes on for 0.25 s,
    past the slow start of the process, and 63 repeats (capped at 60) fill the 0.5 s window."""
    slow, steady = [0.010] * 20, [0.008] * 200  # 0.2 s of 10 ms calls, then 8 ms
    calls = fake_clock(monkeypatch, slow + steady)
    t = timing.measure(lambda: None, CPU, window_s=0.5)
    assert t.settled and t.warmup_calls == 20 + 7  # 0.2 s + 7 x 8 ms >= 0.25 s; the last two agree
    assert t.repeats == timing.MAX_REPEATS and t.median == pytest.approx(0.008)
    assert len(calls) == 27 + 60
    without = fake_clock(monkeypatch, slow + steady)
    t = timing.measure(lambda: None, CPU)
    assert (t.warmup_calls, t.repeats, t.median, len(without)) == (2, 5, 0.010, 7)  # the slow start, alone


def test_a_window_leaves_long_calls_and_the_quick_probe_alone(monkeypatch):
    fake_clock(monkeypatch, [0.5] * 5)  # half a second a call: the window asks for nothing more
    t = timing.measure(lambda: None, CPU, window_s=0.5)
    assert (t.warmup_calls, t.repeats) == (2, 3)
    calls = fake_clock(monkeypatch, [0.008] * 10)
    t = timing.measure(lambda: None, CPU, max_warmup_calls=1, repeats=1)
    assert (t.warmup_calls, t.repeats, len(calls)) == (1, 1, 2)


def test_a_window_takes_between_min_and_max_repeats(monkeypatch):
    """A decode point (bench/latency.py): 1 ms steps fill the 0.5 s window with 500 repeats (past the prefill's cap
    of 60), 0.2 ms ones stop at 1000, and 50 ms ones still take 48."""
    for step, warm, want in ((0.001, 250, 500), (0.0002, 1250, 1000), (0.05, 5, 48)):
        calls = fake_clock(monkeypatch, [step] * 3000)
        t = timing.measure(lambda: None, CPU, window_s=0.5, min_repeats=48, max_repeats=1000)
        assert (t.warmup_calls, t.repeats, len(calls)) == (warm, want, warm + want), step


def test_a_spread_over_a_quarter_is_measured_again_but_flagged_only_over_a_half(monkeypatch):
    # 48 decode steps: a slow phase over the first (spread 0.4 of the 10-90% range) -> again: steady
    first = [1.0] * 30 + [1.4] * 18
    calls = fake_clock(monkeypatch, [1.0, 1.0] + first + [1.0] * 48)
    t = timing.measure(lambda: None, CPU, repeats=48)
    assert len(calls) == 2 + 48 + 48 and t.median == 1.0 and not t.noisy
    fake_clock(monkeypatch, [1.0, 1.0] + first + first)  # stays at 0.4: kept, not flagged
    t = timing.measure(lambda: None, CPU, repeats=48)
    assert t.spread == pytest.approx(0.4) and not t.noisy


def drifting_machine(monkeypatch, cost_s: dict, slow_until_s: float):
    """A machine twice as slow for its first slow_until_s (virtual) seconds: a timed call of fn takes cost_s[fn] then,
    half of it after. Returns the log of the fns called, in order."""
    now, log = [0.0], []

    def timer(fn, cuda):
        took = cost_s[fn] * (2.0 if now[0] < slow_until_s else 1.0)
        now[0] += took
        log.append(fn)
        return took

    monkeypatch.setattr(timing, "_timer", timer)
    return log


def test_rounds_time_calls_at_the_same_moments_of_a_drifting_machine(monkeypatch):
    """Two 1 ms calls (one decode step at two lengths) on a machine twice as slow for its first 0.9 s: measured one
    after the other, each in its own 0.5 s window, the first looks twice the second; warmed up in turn and timed in
    10 interleaved rounds both take the same moments and agree. The rounds' mixed samples spread over a quarter, so
    both are measured again in rounds (now steady), and neither is flagged."""
    a, b = (lambda: None), (lambda: None)
    drifting_machine(monkeypatch, {a: 0.001, b: 0.001}, slow_until_s=0.9)
    alone = [timing.measure(fn, CPU, window_s=0.5, max_repeats=1000) for fn in (a, b)]
    assert alone[0].median == pytest.approx(2 * alone[1].median)

    log = drifting_machine(monkeypatch, {a: 0.001, b: 0.001}, slow_until_s=0.9)
    pending = [timing.warm_up(fn, CPU, window_s=0.5, max_repeats=1000) for fn in (a, b)]
    warm = [p.warmup_calls for p in pending]  # 0.25 s of 2 ms calls each, and two that agree
    assert warm[0] == warm[1] == pytest.approx(125, abs=1) and [p.repeats for p in pending] == [250, 250]
    together = timing.measure_in_rounds(pending, CPU, rounds=10)
    assert [t.median for t in together] == pytest.approx([0.001, 0.001])
    assert not any(t.noisy for t in together) and all(t.settled for t in together)
    assert log[:sum(warm)] == [a] * warm[0] + [b] * warm[1]
    assert log[sum(warm):] == ([a] * 25 + [b] * 25) * 10 * 2  # a tenth of the 250 repeats a round, and again
    assert [t.repeats for t in together] == [250, 250]


def test_rounds_spread_few_repeats_remeasure_all_together_and_enter_each_call_s_context(monkeypatch):
    """A 3-repeat call sits out rounds evenly (it runs in the 4th, 7th and 10th of 10); one call's spread over a
    quarter has every call measured again, in rounds again, and only that one flagged when still over a half; each
    slice of calls runs inside its call's context."""
    a, b, c = (lambda: None), (lambda: None), (lambda: None)
    times = {a: iter([0.001, 0.003] * 1000), b: iter([0.001] * 1000), c: iter([0.2] * 6)}
    log, inside = [], []
    monkeypatch.setattr(timing, "_timer", lambda fn, cuda: (log.append((fn, tuple(inside))), next(times[fn]))[1])

    @contextlib.contextmanager
    def marked(name):
        inside.append(name)
        yield
        inside.pop()

    pending = [timing.Pending(a, 20, 1, False, 0.002, lambda: marked("a")), timing.Pending(b, 20, 1, True, 0.001),
               timing.Pending(c, 3, 1, True, 0.2)]
    a_t, b_t, c_t = timing.measure_in_rounds(pending, CPU, rounds=10)
    assert a_t.noisy and a_t.spread == pytest.approx(1.0) and a_t.repeats == 20 and not a_t.settled
    assert (b_t.noisy, b_t.spread, b_t.repeats) == (False, 0.0, 20) and (c_t.median, c_t.repeats) == (0.2, 3)
    first_pass = log[:43]
    rounds_of_c = [i for i, r in enumerate(_rounds(first_pass, a)) if c in r]
    assert rounds_of_c == [3, 6, 9]
    assert all(ctx == (("a",) if fn is a else ()) for fn, ctx in log)
    assert log[43:] == log[:43]  # measured again: all three, in the same rounds


def _rounds(log, first):
    """The log of (fn, context) split into rounds, each starting at a call of `first` after another fn."""
    rounds, prev = [], None
    for fn, _ in log:
        if fn is first and prev is not first:
            rounds.append(set())
        rounds[-1].add(fn)
        prev = fn
    return rounds


def test_forward_and_backward_times_the_forward_without_autograd_and_clears_gradients_between_backwards():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    grad_enabled = []

    def call():  # a tuple of outputs, as the scan benchmarks return
        grad_enabled.append(torch.is_grad_enabled())
        return 2 * x, x.double()

    fwd_s, fwd_bwd_s = timing.time_forward_and_backward(call, [x], repeats=2)
    assert fwd_s > 0 and fwd_bwd_s > 0
    assert grad_enabled == [False] * 3 + [True] * 3  # warm-up and 2 repeats of each
    # d/dx [mean((2x)^2) + mean(x^2)] = 10 x / 3, from the last backward alone (not summed over the three)
    assert torch.allclose(x.grad, 10 * x.detach() / 3)
    timing.time_forward_and_backward(lambda: 3 * x, [x], repeats=1, warmup=False)  # one tensor, not a tuple
    assert torch.allclose(x.grad, 6 * x.detach())
