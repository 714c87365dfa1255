"""The benchmark harness (kernels.bench): timers, the correctness gate, provenance, JSON and the figure.

Fast on a 2-core CPU: small shapes, few timed runs, and never torch.compile
(benchmark_op(..., compile=False)); the full benchmark is benchmarks/shared_blocks.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import bench
from kernels.check import assert_close, random_tensor
from refimpl import ops
from refimpl.io import read_json, write_json

FAST = bench.TimerSettings(warmup=1, repeats=3, min_seconds=0.0)


def rms_norm_inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((4, 16, 64), generator=g).to(device)
    w = random_tensor((64,), generator=g).to(device)
    return (x, w), {"eps": 1e-6}


def moe_dispatch_inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((32, 8), generator=g).to(device)
    index = random_tensor((32, 3), generator=g).topk(2, dim=-1).indices.to(device)
    return (x, index, 3), {}


def builtin_rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ---------------------------------------------------------------- timers

class FakeClock:
    """A clock that moves only when the timed function says so: timings a test can predict exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds


def test_time_cpu_median_is_sane_and_warmup_is_excluded():
    clock, calls = FakeClock(), []

    def compiled_on_first_call():
        calls.append(None)
        clock.advance(0.3 if len(calls) == 1 else 0.002 * len(calls))   # the first call plays the JIT compile

    t = bench.time_cpu(compiled_on_first_call, warmup=1, repeats=8, min_seconds=0.0, clock=clock)
    assert t.n == 8 and len(calls) == 9
    samples = [0.002 * k for k in range(2, 10)]                           # the 0.3 s warm-up call is not among them
    assert t.min_s == pytest.approx(samples[0]) and t.median_s == pytest.approx(float(np.median(samples)))
    assert t.min_s <= t.p10_s <= t.median_s <= t.p90_s
    assert t.method == "perf_counter"
    assert set(t.as_dict()) == {"median_s", "p10_s", "p90_s", "min_s", "n", "method"}


def test_time_cpu_runs_until_min_seconds_and_passes_args():
    clock, seen = FakeClock(), []

    def step(x):
        seen.append(x)
        clock.advance(2.0**-6)                                       # exact in binary: no rounding below

    t = bench.time_cpu(step, "x", warmup=0, repeats=1, min_seconds=2.0**-4, clock=clock)
    assert t.n == 4 and len(seen) == 4 and set(seen) == {"x"}     # 4 steps of 1/64 s reach 1/16 s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_time_cuda_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        bench.time_cuda(lambda x: x, lambda i: (torch.zeros(1),))


# ---------------------------------------------------------------- benchmark_op

def test_benchmark_op_rms_norm_numba_passes_gate_and_has_ratios():
    case = bench.Case("rms_norm", rms_norm_inputs, eager_builtin=builtin_rms_norm, eager_builtin_name="F.rms_norm")
    result = bench.benchmark_op(case, ["numba"], compile=False, timer=FAST)
    assert result["failed"] == []
    assert list(result["variants"]) == ["reference", "numba", "eager builtin"]
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["inputs"]["args"][0]["shape"] == [4, 16, 64]
    assert result["bytes_moved"] == 4 * (4 * 16 * 64 * 2 + 64)   # x and y, plus the weight
    for name, v in result["variants"].items():
        assert v["gate"]["passed"], v["gate"]
        assert v["timing"]["n"] >= 3 and v["timing"]["median_s"] > 0
        assert v["speedup_vs_reference"] > 0 and math.isfinite(v["speedup_vs_reference"])
        assert v["speedup_vs_torch_compile"] is None             # compile=False
    assert result["variants"]["reference"]["speedup_vs_reference"] == 1.0
    assert "torch.compile" not in result["variants"]


def test_wrong_kernel_fails_the_gate_and_is_not_timed():
    calls = {"wrong": 0, "broken": 0}

    def wrong(x, weight, eps=1e-6):
        calls["wrong"] += 1
        return ops.rms_norm(x, weight, eps) * 1.01

    def broken(x, weight, eps=1e-6):
        calls["broken"] += 1
        raise ValueError("this kernel refuses everything")

    case = bench.Case("rms_norm", rms_norm_inputs, others={"wrong": wrong, "broken": broken})
    result = bench.benchmark_op(case, compile=False, timer=FAST)
    assert result["failed"] == ["wrong", "broken"]
    assert calls == {"wrong": 1, "broken": 1}                    # the gate's single call; no timing runs
    wrong_entry, broken_entry = result["variants"]["wrong"], result["variants"]["broken"]
    assert wrong_entry["timing"] is None and wrong_entry["speedup_vs_reference"] is None
    assert "out of tolerance" in wrong_entry["gate"]["comparisons"][0]["message"]
    assert broken_entry["timing"] is None and "refuses everything" in broken_entry["gate"]["error"]
    assert result["variants"]["reference"]["timing"] is not None  # the others are still timed
    assert "wrong" not in kernels.registered()["rms_norm"]        # nothing was registered globally


def test_tuple_outputs_are_compared_element_by_element():
    def bad_slot(x, expert_index, n_experts):
        x_sorted, offsets, slot = ops.moe_dispatch(x, expert_index, n_experts)
        return x_sorted, offsets, slot.flip(0)

    case = bench.Case("moe_dispatch", moe_dispatch_inputs, others={"bad_slot": bad_slot})
    result = bench.benchmark_op(case, ["numba"], compile=False, timer=FAST)
    good, bad = result["variants"]["numba"]["gate"], result["variants"]["bad_slot"]["gate"]
    assert good["passed"] and len(good["comparisons"]) == 3
    assert [c["passed"] for c in bad["comparisons"]] == [True, True, False]
    assert bad["comparisons"][2]["name"].endswith("[2]")
    assert result["failed"] == ["bad_slot"]


def test_simulator_backend_is_refused_as_a_timing_target():
    if not kernels.cuda_simulator_enabled():
        pytest.skip("numba_cuda runs on a real GPU here")
    with pytest.raises(ValueError, match="simulator"):
        bench.benchmark_op(bench.Case("rms_norm", rms_norm_inputs), ["numba_cuda"], compile=False, timer=FAST)


def test_unknown_op_names_what_is_registered():
    with pytest.raises(kernels.KernelNotFound, match="rms_norm"):
        bench.benchmark_op(bench.Case("no_such_op", rms_norm_inputs), compile=False, timer=FAST)


# ---------------------------------------------------------------- provenance, ceilings, JSON, figure

def test_provenance_has_the_keys():
    info = bench.provenance()
    assert {"date_utc", "machine", "python", "versions", "gpu", "numba_cuda_simulator"} <= set(info)
    assert {"platform", "processor", "cpu_count"} <= set(info["machine"])
    assert {"torch", "numpy", "numba", "numba-cuda", "cupy"} <= set(info["versions"])
    assert info["versions"]["torch"] == torch.__version__
    assert info["numba_cuda_simulator"] == kernels.cuda_simulator_enabled()
    assert info["date_utc"].endswith("+00:00")
    if not torch.cuda.is_available():
        assert info["gpu"] is None


def test_results_are_json_without_nan_and_the_figure_is_written(tmp_path):
    ceilings = bench.measure_ceilings("cpu", quick=True)
    assert ceilings["copy"]["unit"] == "GB/s" and ceilings["copy"]["value"] > 0
    assert ceilings["matmul_fp32"]["unit"] == "GFLOP/s" and ceilings["matmul_fp32"]["value"] > 0

    def nan_kernel(x, weight, eps=1e-6):
        return torch.full_like(x, float("nan"))                 # errors become inf: not JSON unless sanitised

    results = [bench.benchmark_op(bench.Case("rms_norm", rms_norm_inputs, others={"nan": nan_kernel}), ["numba"],
                                  compile=False, ceilings=ceilings, timer=FAST)]
    assert results[0]["failed"] == ["nan"]
    assert 0 < results[0]["variants"]["numba"]["fraction_of_copy_bandwidth"]
    record = {"provenance": bench.provenance(), "ceilings": ceilings, "results": results}
    path = write_json(tmp_path / "bench.json", record)          # refuses NaN and inf
    assert read_json(path) == json.loads(json.dumps(record))

    figure = bench.plot_ratios(results, tmp_path / "figures" / "ratios.png", provenance=record["provenance"])
    png = tmp_path / "figures" / "ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["ratios.png"]  # no temporary file left behind
    assert "cpu" in figure.axes[0].get_title()

    code = bench.save_and_report(record, tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png")
    assert code == 1                                             # the "nan" variant failed its gate
    assert read_json(tmp_path / "out" / "bench.json") == json.loads(json.dumps(record))
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_shared_blocks_script_uses_the_small_preset_and_finds_its_kernels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_blocks.py"
    spec = importlib.util.spec_from_file_location("shared_blocks_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)                             # defines the cases; runs nothing
    assert script.missing_kernels("cpu") == [], "attention/moe kernels are not registered yet"
    (q, k, v), kwargs = script.case_inputs("attention (sliding window)")("cpu", 0)
    assert list(q.shape) == [16, 127, 4, 32] and list(k.shape) == [16, 127, 2, 32] and kwargs["window"] == 32
    (x, index, n_experts), _ = script.case_inputs("moe_dispatch")("cpu", 0)
    assert list(x.shape) == [16 * 127, 128] and list(index.shape) == [16 * 127, 2] and n_experts == 4
    for case in ("attention", "attention (sliding window)"):
        (q, k, v), kwargs = script.case_inputs(case)("cpu", 0)
        assert_close(script.builtin_attention(q[:2], k[:2], v[:2], **kwargs),
                     ops.attention(q[:2], k[:2], v[:2], **kwargs), f"SDPA adapter, {case}")


def test_nested_state_outputs_are_flattened_for_the_gate():
    """mLSTM returns (h, (C, n, m)): four tensors compared, and a wrong m is caught."""
    from kernels.check import example_inputs

    def make(device, seed):
        _, args, kwargs = example_inputs("tiny", device, seed=seed)["mlstm"]
        return args, kwargs

    def wrong_m(*args, **kwargs):
        h, (C, n, m) = kernels.get("mlstm", "numba")(*args, **kwargs)
        return h, (C, n, m + 1.0)

    result = bench.benchmark_op(bench.Case("mlstm", make, others={"wrong_m": wrong_m}), ["numba"], compile=False,
                                timer=FAST)
    assert [c["passed"] for c in result["variants"]["numba"]["gate"]["comparisons"]] == [True] * 4
    assert [c["passed"] for c in result["variants"]["wrong_m"]["gate"]["comparisons"]] == [True, True, True, False]


SCRIPTS = ["shared_blocks", "gated_delta_rule", "synapse", "henn", "geometric", "sintellix"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_is_cases_on_the_one_driver(name):
    """Each script's CASES are `bench.Case`s whose ops have numba kernels and whose inputs build; main is
    `bench.run_benchmark` on them (checked by reading the source: running it takes minutes)."""
    import importlib.util
    import inspect
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)                             # defines the cases; runs nothing
    assert script.CASES and all(isinstance(case, bench.Case) for case in script.CASES)
    for case in script.CASES:
        assert "numba" in kernels.registered()[case.op], case.op
        args, kwargs = case.make_inputs("cpu", 0)
        assert all(isinstance(a, torch.Tensor) for a in args[:1]), case.label
    assert f'run_benchmark("{name}", __doc__, CASES, argv' in inspect.getsource(script.main)
