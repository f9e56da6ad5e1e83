"""bench/step_profile.py (`make profile`): kinds of ops by name, attribution of time, and the command end to end."""
import json
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from bench.step_profile import OTHER, _scoped_kind, attribute, kind_of, main


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("LinearScanBackward", "TTT inner loop"), ("ttt_bench::linear_prefill_backward", "TTT inner loop"),
    ("MLPScan", "TTT inner loop"), ("SelectiveScanCpp", "SSM scan"), ("ttt_bench::mamba_scan", "SSM scan"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("_RMSNormCppBackward", "norms and convs"),
    ("aten::native_layer_norm", "norms and convs"), ("aten::copy_", "copies and casts"), ("aten::mul", OTHER),
])
def test_an_ops_kind_comes_from_its_name(name, kind):
    assert kind_of(name) == kind


def _event(name, parent=None, cpu_us=0.0, kernels=(), device=DeviceType.CPU, elapsed=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=cpu_us, device_type=device,
                           is_async=False, kernels=[SimpleNamespace(duration=d) for d in kernels],
                           time_range=SimpleNamespace(elapsed_us=lambda: elapsed))


def test_an_op_inside_a_scan_or_attention_counts_as_it():
    scan = _event("LinearScanBackward")
    assert _scoped_kind(_event("aten::mm", _event("aten::matmul", scan))) == "TTT inner loop"
    assert _scoped_kind(_event("aten::mm", _event("aten::linear"))) == "matmul"  # a matmul is not a scope
    assert _scoped_kind(_event("aten::mul", _event("Optimizer.step#AdamW.step"))) == "optimizer"


def test_cpu_time_is_each_ops_self_time_and_cuda_time_the_kernels_it_launched():
    attn = _event("aten::scaled_dot_product_attention", cpu_us=5, kernels=[30])
    events = [attn, _event("aten::softmax", attn, cpu_us=2, kernels=[10]), _event("aten::mm", cpu_us=3, kernels=[40]),
              _event("aten::mm", cpu_us=1)]
    kinds, ops, total = attribute(events, cuda=False)
    assert kinds == {"attention": 7, "matmul": 4} and total == 11 and ops["aten::mm"]["calls"] == 2
    for e, d in ((events[0], 30), (events[1], 10), (events[2], 40)):  # the device's kernel rows: 100 us in all
        events.append(_event(f"kernel of {e.name}", device=DeviceType.CUDA, elapsed=d))
    events.append(_event("a kernel no op launched", device=DeviceType.CUDA, elapsed=20))
    kinds, ops, total = attribute(events, cuda=True)
    assert total == 100 and kinds == {"attention": 40, "matmul": 40, "unattributed": 20}
    assert ops["aten::mm"] == {"op": "aten::mm", "kind": "matmul", "us": 40, "calls": 1}


def test_make_profile_writes_each_architectures_kinds_and_top_ops(tmp_path):
    assert main(["--arch", "ttt_linear,transformer", "--size", "smoke-xs", "--ctx", "256", "--steps", "1",
                 "--top", "5", "--trace", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert [r["arch"] for r in rows] == ["ttt_linear", "transformer"]
    for r, scope in zip(rows, ("TTT inner loop", "attention")):
        assert r["step_ms"] > 0 and r["kinds_ms"][scope] > 0, r["kinds_ms"]
        assert sum(r["kinds_ms"].values()) == pytest.approx(r["recorded_ms_per_step"])  # CPU: self times add up
        ms = [o["ms"] for o in r["top_ops"]]
        assert len(ms) == 5 and ms == sorted(ms, reverse=True)
        assert (tmp_path / "profile" / f"{r['arch']}-smoke-xs-256.trace.json").stat().st_size > 0
    assert rows[0]["backend"] == "ttt=cpp" and "matched by" in (tmp_path / "profile" / "profile.md").read_text()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--arch", "nope"], ["--size", "huge"], ["--set", "arch.nope=1"]])
def test_make_profile_refuses_bad_input_before_running(args, tmp_path, capsys):
    assert main(["--size", "smoke-xs", "--results", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "profile" / "profile.json").exists()
