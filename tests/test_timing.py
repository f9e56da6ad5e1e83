"""bench/timing.py: warm-up until two calls agree, median and spread, re-measurement of noisy points;
bench/hardware.py: MFU from the peak table."""
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
    after the other, each in its own 0.5 s window, the first looks twice the second; in 10 interleaved rounds of
    50 ms slices both take the same moments and agree. The rounds' mixed samples spread over a quarter, so both are
    measured again together (now steady), and neither is flagged."""
    a, b = (lambda: None), (lambda: None)
    drifting_machine(monkeypatch, {a: 0.001, b: 0.001}, slow_until_s=0.9)
    alone = [timing.measure(fn, CPU, window_s=0.5, max_repeats=1000) for fn in (a, b)]
    assert alone[0].median == pytest.approx(2 * alone[1].median)

    log = drifting_machine(monkeypatch, {a: 0.001, b: 0.001}, slow_until_s=0.9)
    together = timing.measure_in_rounds([a, b], CPU, rounds=10, window_s=0.5, max_repeats=1000)
    assert [t.median for t in together] == pytest.approx([0.001, 0.001])
    assert not any(t.noisy for t in together) and all(t.settled for t in together)
    # each fn's own warm-up (0.25 s of 2 ms calls), then slices of 25 calls (50 ms at the warm-up's 2 ms) in turn:
    # 10 rounds, and 10 more (measured again, from scratch)
    warm = [t.warmup_calls for t in together]
    assert warm[0] == warm[1] == pytest.approx(125, abs=1)
    assert log[:sum(warm)] == [a] * warm[0] + [b] * warm[1]
    n = round(0.05 / 0.002)
    assert log[sum(warm):] == ([a] * n + [b] * n) * 10 * 2
    assert [t.repeats for t in together] == [10 * n, 10 * n]


def test_rounds_flag_the_calls_still_noisy_in_the_second_pass_and_keep_to_the_repeat_bounds(monkeypatch):
    a, b = (lambda: None), (lambda: None)
    costs = {a: [0.001, 0.003] * 1000, b: [0.001] * 2000}  # a alternates 1 and 3 ms: spread 100% in both passes
    it = {fn: iter(c) for fn, c in costs.items()}
    monkeypatch.setattr(timing, "_timer", lambda fn, cuda: next(it[fn]))
    a_t, b_t = timing.measure_in_rounds([a, b], CPU, rounds=4, window_s=0.5, min_repeats=48, max_repeats=100)
    assert a_t.noisy and a_t.spread == pytest.approx(1.0) and not b_t.noisy and b_t.spread == 0.0
    assert a_t.repeats == b_t.repeats == 4 * 25  # max_repeats // rounds per slice, though 62 ms slices ask for more
    fewest = timing.measure_in_rounds([b], CPU, rounds=4, window_s=0.0, min_repeats=48, max_repeats=100)[0]
    assert fewest.repeats == 48  # at least min_repeats: 12 per round
