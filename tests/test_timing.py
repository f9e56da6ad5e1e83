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
