"""The benchmark harness: correctness first, then timing, every figure a ratio measured side by side.

    result = benchmark_op(Case("rms_norm", make_inputs, eager_builtin=my_rms_norm_adapter), ["numba"])
    result["variants"]["numba"]["speedup_vs_reference"]      # > 1 means faster than refimpl.ops

What is measured, and how
    time_cpu        wall-clock time of one call (time.perf_counter), after warm-up calls
                    that absorb JIT and compile work. Reports median, p10, p90 over many runs.
    time_cuda       GPU time between two CUDA events around one call. Before each call a
                    256 MiB buffer is overwritten so the L2 cache holds nothing useful, and the
                    inputs rotate among several sets. By default the time is device time only
                    (kernel launches queued while the GPU is busy flushing are not counted);
                    `include_launch_overhead=True` synchronises first so host launch cost counts.
    measure_ceilings  what this machine can do at best, measured in the same run: a large
                    memory copy (GB/s, bytes read + written) and a large matmul (FLOP/s).
    benchmark_op    the correctness gate (every variant against the reference op, with
                    `kernels.check.check_case`; a variant that fails is recorded and not timed),
                    then timing of the reference, each kernel backend, `torch.compile` of the
                    reference (compile time measured separately, excluded) and optionally an
                    eager PyTorch built-in, on the same inputs, in the same process, forward only.
    provenance      where and when: date, machine (no hostname), library versions, GPU.
    plot_ratios     a bar chart of speed-ups over the reference, drawn from the results.

Every result is plain data (dicts, lists, numbers, strings, None) that `refimpl.io.write_json`
accepts: non-finite numbers are stored as None, never NaN.

Does not include: backward passes (kernels are forward-only), multi-GPU, or power measurements.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kernels.check import check_case
from kernels.machine import backend_status, cuda_simulator_enabled
from kernels.registry import get
from refimpl.io import save_figure_atomically

__all__ = ["Timing", "time_cpu", "time_cuda", "measure_ceilings", "provenance", "Case", "TimerSettings",
           "benchmark_op", "run_benchmark", "plot_ratios",
           "print_table", "results_markdown",
           "json_safe"]

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 cache of any current NVIDIA GPU (H100: 50 MB)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

@dataclass
class Timing:
    """Summary of repeated runs of one call, in seconds."""
    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    n: int           # timed runs (warm-up runs excluded)
    method: str      # "perf_counter" or "cuda_events" (or "cuda_events+sync")

    @classmethod
    def from_samples(cls, seconds: list[float], method: str) -> "Timing":
        if not seconds:
            raise ValueError("no timed runs to summarise")
        s = np.asarray(seconds, dtype=np.float64)
        return cls(median_s=float(np.median(s)), p10_s=float(np.percentile(s, 10)),
                   p90_s=float(np.percentile(s, 90)), min_s=float(s.min()), n=len(seconds), method=method)

    def as_dict(self) -> dict:
        return asdict(self)


def time_cpu(fn: Callable, *args, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.5,
             max_repeats: int = 100_000, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Wall-clock time of `fn(*args)` with `clock` (time.perf_counter; tests pass a fake one), one call per sample.

    The first `warmup` calls are not timed (numba JIT, torch.compile and caches
    settle there). Then the call is timed at least `repeats` times, and more
    until `min_seconds` of timed runs have passed (at most `max_repeats`).
    The garbage collector is paused while timing, as `timeit` does.
    On a GPU this would measure only the launch: use `time_cuda` there.
    """
    for _ in range(warmup):
        fn(*args)
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = clock()
        while len(samples) < repeats or (clock() - started < min_seconds and len(samples) < max_repeats):
            t0 = clock()
            fn(*args)
            samples.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_samples(samples, "perf_counter")


def time_cuda(fn: Callable, make_args: Callable[[int], tuple], *, n_input_sets: int = 4, warmup: int = 3,
              repeats: int = 100, flush_l2: bool = True, include_launch_overhead: bool = False) -> Timing:
    """GPU time of `fn(*args)` from CUDA events recorded just before and just after each call.

    `make_args(i)` returns the positional arguments of input set i; it is called
    once for each of `n_input_sets` sets before timing, and the calls rotate
    among the sets. With `flush_l2`, a 256 MiB buffer is overwritten before
    every call (outside the timed interval) so no call finds its inputs in L2.
    Device time only by default; `include_launch_overhead=True` synchronises
    before each call, so the host's launch work (Python, argument conversion)
    shows up as idle GPU time inside the interval.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA GPU, and torch.cuda.is_available() is False on this machine; "
                           "use time_cpu to time CPU code")
    if n_input_sets < 1:
        raise ValueError(f"n_input_sets must be >= 1, got {n_input_sets}")
    arg_sets = [tuple(make_args(i)) for i in range(n_input_sets)]
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for i in range(warmup):
        fn(*arg_sets[i % n_input_sets])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush.zero_()
        if include_launch_overhead:
            torch.cuda.synchronize()
        starts[i].record()
        fn(*arg_sets[i % n_input_sets])
        ends[i].record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]  # elapsed_time is in ms
    return Timing.from_samples(samples, "cuda_events+sync" if include_launch_overhead else "cuda_events")


# ----------------------------------------------------------------------------
# Ceilings: the best this machine does at moving bytes and at multiplying
# ----------------------------------------------------------------------------

def _ceiling(what: str, amount: float, timing: Timing, unit: str, scale: float) -> dict:
    per_second = amount / timing.median_s
    return {"what": what, "value": per_second / scale, "unit": unit, "per_second": per_second,
            "timing": timing.as_dict()}


def measure_ceilings(device: str = "cpu", *, quick: bool = False) -> dict:
    """Copy bandwidth and matmul throughput of `device`, for "fraction of the ceiling" figures.

    cuda: a 1 GiB device-to-device copy (GB/s counts bytes read + written) and
          square fp32 and bf16 matmuls (TFLOP/s = 2 n^3 / time), timed with time_cuda.
          fp32 matmuls follow torch.backends.cuda.matmul.allow_tf32, which is recorded.
    cpu:  a 256 MiB copy (GB/s, read + written) and an fp32 matmul (GFLOP/s), timed with time_cpu,
          with torch's thread count as it is (recorded).
    `quick` uses smaller sizes and fewer runs (for tests); the numbers are then rougher.
    Returns {"device", "copy": {...}, "matmul_fp32": {...}[, "matmul_bf16": {...}]}; each entry
    has value and unit (for people) and per_second (bytes/s or FLOP/s, for ratios).
    """
    device = torch.device(device).type
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("measure_ceilings('cuda') needs a CUDA GPU; torch.cuda.is_available() is False")
        copy_bytes = (64 if quick else 512) * 2**20            # per buffer
        src = torch.randn(copy_bytes // 4, device="cuda")
        dst = torch.empty_like(src)
        copy = time_cuda(lambda d, s: d.copy_(s), lambda i: (dst, src), n_input_sets=1, flush_l2=False,
                         repeats=20 if quick else 50)
        result = {"device": "cuda",
                  "copy": _ceiling(f"dst.copy_(src), {copy_bytes // 2**20} MiB float32 each; bytes read + written",
                                   2 * copy_bytes, copy, "GB/s", 1e9)}
        del src, dst
        n = 2048 if quick else 8192
        for name, dtype in (("matmul_fp32", torch.float32), ("matmul_bf16", torch.bfloat16)):
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            c = torch.empty(n, n, device="cuda", dtype=dtype)
            timing = time_cuda(lambda x, y, out: torch.mm(x, y, out=out), lambda i: (a, b, c), n_input_sets=1,
                               flush_l2=False, repeats=10 if quick else 30)
            result[name] = _ceiling(f"torch.mm, {n} x {n} {str(dtype).replace('torch.', '')}; 2 n^3 FLOP",
                                    2 * n**3, timing, "TFLOP/s", 1e12)
            del a, b, c
        result["matmul_fp32"]["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        return result
    if device != "cpu":
        raise ValueError(f"measure_ceilings: device must be 'cpu' or 'cuda', got {device!r}")
    copy_bytes = (16 if quick else 256) * 2**20
    src = torch.randn(copy_bytes // 4)
    dst = torch.empty_like(src)
    copy = time_cpu(lambda: dst.copy_(src), warmup=1, repeats=5 if quick else 20, min_seconds=0.05 if quick else 1.0)
    n = 256 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    mm = time_cpu(lambda: torch.mm(a, b, out=c), warmup=1, repeats=5 if quick else 10,
                  min_seconds=0.05 if quick else 1.0)
    return {"device": "cpu", "torch_threads": torch.get_num_threads(),
            "copy": _ceiling(f"dst.copy_(src), {copy_bytes // 2**20} MiB float32 each; bytes read + written",
                             2 * copy_bytes, copy, "GB/s", 1e9),
            "matmul_fp32": _ceiling(f"torch.mm, {n} x {n} float32; 2 n^3 FLOP", 2 * n**3, mm, "GFLOP/s", 1e9)}


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------

def _version(*distributions: str) -> str | None:
    """Installed version of the first of `distributions` that is installed, else None."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _processor_name() -> str:
    """The CPU model from /proc/cpuinfo on Linux, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def provenance() -> dict:
    """Where and when a benchmark ran: date (UTC), machine, library versions, GPU. No hostname."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "architecture": platform.machine(),
                    "processor": _processor_name(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    # other work on the machine makes timings noisy: the load when provenance was taken
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "numba": _version("numba"),
                     "numba-cuda": _version("numba-cuda"),
                     "cupy": _version("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")},
        "numba_cuda_simulator": cuda_simulator_enabled(),
        "gpu": None,
    }
    try:
        import numba
        info["machine"]["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                       "memory_GiB": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count,
                       "driver": _nvidia_driver_version(), "cuda_runtime": torch.version.cuda,
                       "device_count": torch.cuda.device_count()}
    return info


# ----------------------------------------------------------------------------
# One op, every variant
# ----------------------------------------------------------------------------

def json_safe(obj):
    """`obj` with non-finite floats replaced by None (JSON has no NaN or inf), tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _describe(value):
    """A tensor as {shape, dtype, device}; anything else as itself (if JSON-friendly) or its repr."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                "device": value.device.type}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an argument list or an op's output (a tensor or a tuple of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _gate(op: str, name: str, fn: Callable, args: tuple, kwargs: dict, reference: Callable) -> dict:
    """`kernels.check.check_case` for one variant: poisoned outputs, every output (nested states flattened)
    against the reference computed in float64. An exception counts as a failure, with its message recorded."""
    floats = [t.dtype for t in _tensors(args) + _tensors(kwargs) if t.is_floating_point()]
    try:
        comparisons = check_case(op, fn, args, kwargs, floats[0] if floats else torch.float32, name, reference)
    except Exception as err:  # a kernel refusing these inputs is a failed gate, not a crash of the benchmark
        return {"passed": False, "error": f"{type(err).__name__}: {err}", "comparisons": []}
    return {"passed": all(c.passed for c in comparisons), "error": None,
            "comparisons": [c.as_dict() for c in comparisons]}


def _output_dtype(expected) -> torch.dtype:
    """The dtype of an op's (first floating-point) output."""
    tensors = _tensors(expected)
    floats = [t for t in tensors if t.is_floating_point()]
    return (floats or tensors)[0].dtype


_MATMUL_CEILING = {torch.float32: "matmul_fp32", torch.bfloat16: "matmul_bf16"}  # op dtype -> ceilings key


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Case:
    """What one benchmark times: an op on its inputs, the truth it is checked against, and what runs beside it.

    op             a name in the kernel registry; its kernels are the backends timed.
    make_inputs    make_inputs(device, seed) -> (args, kwargs). Seed 0 is used for the gate and on the CPU;
                   on CUDA the timing rotates among seeds 0 .. n_input_sets-1 (kwargs must not depend on it).
    label          the case's name in tables and figures (default: op).
    reference      the truth and the baseline (default: the registered reference op; a recurrence's step
                   loop, say, when the registered op is its chunked form). torch.compile compiles it.
    others         {name: callable}: other forms (another PyTorch form of the reference, a deliberately
                   wrong kernel in a test) gated and timed beside the kernels.
    eager_builtin  a PyTorch built-in with the op's signature (an adapter around, say,
                   F.scaled_dot_product_attention), named eager_builtin_name.
    flops          useful floating-point work of one call, for the fraction of the matmul ceiling.
    """
    op: str
    make_inputs: Callable[[str, int], tuple[tuple, dict]]
    label: str | None = None
    reference: Callable | None = None
    others: dict = field(default_factory=dict)
    eager_builtin: Callable | None = None
    eager_builtin_name: str | None = None
    flops: float | None = None


@dataclass(frozen=True)
class TimerSettings:
    """How each variant is timed (see time_cpu and time_cuda). repeats=None: 20 on the CPU, 100 on CUDA."""
    warmup: int = 3
    repeats: int | None = None
    min_seconds: float = 0.5
    n_input_sets: int = 4

    def as_dict(self) -> dict:
        return asdict(self)


def benchmark_op(case: Case, backends: list[str] | tuple[str, ...] = (), *, device: str = "cpu",
                 compile: bool = True, ceilings: dict | None = None,
                 timer: TimerSettings = TimerSettings()) -> dict:
    """Gate, then time, every variant of `case` on the same inputs; return plain data for JSON.

    The variants: the reference, case.others, each kernel backend ("numba"; "numba_cuda", "cupy" on a
    GPU), torch.compile of the reference unless compile=False (tests: compiling takes tens of seconds on a
    CPU; its compile time is reported separately) and the eager built-in. The gate runs first for every
    variant (`kernels.check.check_case`: outputs poisoned, compared with the reference computed in
    float64); a variant that fails it is recorded with the reason and not timed. Everything runs under
    torch.no_grad(): kernels are forward-only. Speed-ups are the reference's (or torch.compile's) median
    over the variant's: > 1 is faster. `ceilings` (from measure_ceilings(device)) adds the achieved
    bandwidth (bytes of inputs + outputs / median time) and, given case.flops, FLOP/s, each as a fraction
    of the ceiling. On the CPU the inputs stay in cache between runs while the copy ceiling streams from
    DRAM, so small ops can pass 100% of it.
    """
    device = torch.device(device).type
    if device not in ("cpu", "cuda"):
        raise ValueError(f"benchmark_op: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmark_op(device='cuda') needs a CUDA GPU; torch.cuda.is_available() is False")
    reference = case.reference or get(case.op, "reference")  # KernelNotFound names what is registered
    variants = _variants(case, reference, backends)
    with torch.no_grad():
        args, kwargs = case.make_inputs(device, 0)
        expected = reference(*args, **kwargs)
        _synchronize(device)
        if compile:
            variants["torch.compile"] = _compiled(reference, args, kwargs, device)
        for name, v in variants.items():                     # 1. the gate, for every variant before any timing
            if "gate" not in v:
                v["gate"] = _gate(case.op, f"{case.op}:{name}", v["fn"], args, kwargs, reference)
            _synchronize(device)
        _time_variants(variants, case, args, kwargs, device, timer)   # 2. the ones that passed, same inputs
    return _report(case, variants, args, kwargs, expected, device, ceilings)   # 3. ratios and ceilings


def _variants(case: Case, reference: Callable, backends) -> dict[str, dict]:
    """{name: {kind, fn, name}} in report order; a backend that cannot be timed here is refused up front."""
    variants = {"reference": {"kind": "reference", "fn": reference,
                              "name": f"{reference.__module__}.{reference.__qualname__}"}}
    for name, fn in case.others.items():
        variants[name] = {"kind": "kernel", "fn": fn, "name": getattr(fn, "__qualname__", repr(fn))}
    for backend in backends:
        status = backend_status().get(backend, "")
        if status.startswith("simulator"):
            raise ValueError(f"benchmark_op: backend {backend!r} runs on numba's CUDA simulator here "
                             "(no GPU), which checks correctness but is not a timing target")
        if status.startswith("unavailable"):
            raise ValueError(f"benchmark_op: backend {backend!r} cannot run on this machine: {status}")
        fn = get(case.op, backend)
        variants[backend] = {"kind": "kernel", "fn": fn, "name": getattr(fn, "__qualname__", repr(fn))}
    if case.eager_builtin is not None:
        variants["eager builtin"] = {"kind": "eager builtin", "fn": case.eager_builtin,
                                     "name": case.eager_builtin_name or getattr(case.eager_builtin, "__qualname__",
                                                                                repr(case.eager_builtin))}
    return variants


def _compiled(reference: Callable, args: tuple, kwargs: dict, device: str) -> dict:
    """torch.compile(reference), compiled by a first call whose time is recorded apart; a failure is a failed gate."""
    compiled = torch.compile(reference)
    entry = {"kind": "torch.compile", "fn": compiled, "name": "torch.compile(reference)"}
    t0 = time.perf_counter()
    try:
        compiled(*args, **kwargs)
        _synchronize(device)
        entry["compile_seconds"] = time.perf_counter() - t0
    except Exception as err:  # recorded like a failed gate: the run goes on without it
        entry["compile_seconds"] = None
        entry["gate"] = {"passed": False, "comparisons": [], "error": f"torch.compile failed: {type(err).__name__}: {err}"}
    return entry


def _time_variants(variants: dict, case: Case, args: tuple, kwargs: dict, device: str, timer: TimerSettings) -> None:
    """Each variant that passed its gate gets "timing" (and on CUDA "timing_with_launch_overhead"); the rest None."""
    cuda_sets = None
    if device == "cuda":
        cuda_sets = [tuple(args)] + [tuple(case.make_inputs(device, seed)[0]) for seed in range(1, timer.n_input_sets)]
    for v in variants.values():
        if not v["gate"]["passed"]:
            v["timing"] = None
            continue
        fn = v["fn"]
        if device == "cpu":
            v["timing"] = time_cpu(lambda: fn(*args, **kwargs), warmup=timer.warmup,
                                   repeats=20 if timer.repeats is None else timer.repeats,
                                   min_seconds=timer.min_seconds).as_dict()
            continue

        def call(*a, fn=fn):
            return fn(*a, **kwargs)
        repeats = 100 if timer.repeats is None else timer.repeats
        v["timing"] = time_cuda(call, lambda i: cuda_sets[i], n_input_sets=timer.n_input_sets, warmup=timer.warmup,
                                repeats=repeats).as_dict()
        v["timing_with_launch_overhead"] = time_cuda(call, lambda i: cuda_sets[i], n_input_sets=timer.n_input_sets,
                                                     warmup=1, repeats=repeats, include_launch_overhead=True).as_dict()


def _report(case: Case, variants: dict, args: tuple, kwargs: dict, expected, device: str, ceilings: dict | None) -> dict:
    """The result as plain data: inputs, outputs, each variant's gate, timing, speed-ups and share of the ceilings."""
    bytes_moved = sum(t.numel() * t.element_size() for t in _tensors(args) + _tensors(expected))

    def median(name: str) -> float | None:
        v = variants.get(name)
        return v["timing"]["median_s"] if v is not None and v.get("timing") else None

    ref_median, compile_median = median("reference"), median("torch.compile")
    report = {}
    kind_order = ["reference", "kernel", "torch.compile", "eager builtin"]
    for name, v in sorted(variants.items(), key=lambda item: kind_order.index(item[1]["kind"])):
        entry = {k: val for k, val in v.items() if k != "fn"}
        m = median(name)
        entry["speedup_vs_reference"] = ref_median / m if m and ref_median else None
        entry["speedup_vs_torch_compile"] = compile_median / m if m and compile_median else None
        if m and ceilings is not None:
            entry["achieved_GBps"] = bytes_moved / m / 1e9
            entry["fraction_of_copy_bandwidth"] = bytes_moved / m / ceilings["copy"]["per_second"]
            matmul = ceilings.get(_MATMUL_CEILING.get(_output_dtype(expected), ""))
            if case.flops is not None and matmul is not None:
                entry["achieved_GFLOPs"] = case.flops / m / 1e9
                entry["fraction_of_matmul"] = case.flops / m / matmul["per_second"]
        report[name] = entry
    return json_safe({
        "op": case.op,
        "label": case.label or case.op,
        "device": device,
        "dtype": str(_output_dtype(expected)).replace("torch.", ""),
        "inputs": {"args": [_describe(a) for a in args], "kwargs": {k: _describe(v) for k, v in kwargs.items()}},
        "outputs": [_describe(t) for t in _tensors(expected)],
        "bytes_moved": bytes_moved,
        "flops": case.flops,
        "timing_method": "perf_counter" if device == "cpu" else "cuda_events",
        "failed": [name for name, v in variants.items() if not v["gate"]["passed"]],
        "variants": report,
    })


# ----------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------

def plot_ratios(results: list[dict], path: str | os.PathLike, provenance: dict | None = None):
    """Bar chart of speed-ups over the reference op (log scale), one group per benchmarked case.

    Bars: each kernel backend, torch.compile and the eager built-in, where timed; a variant
    that failed the correctness gate is marked "gate failed" instead of a bar. Labelled with
    the device and the date (from `provenance` when given). Saved to a temporary name in the
    same folder, then renamed, so a reader never sees half a file. Draws with the Agg canvas
    directly (no pyplot, no display needed, the session's backend untouched); returns the Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not results:
        raise ValueError("plot_ratios: no results to plot")
    series = []  # variant names other than the reference, in report order (kernels, torch.compile, eager)
    for r in results:
        for name in r["variants"]:
            if name != "reference" and name not in series:
                series.append(name)
    series.sort(key=lambda name: {"torch.compile": 1, "eager builtin": 2}.get(name, 0))
    fig = Figure(figsize=(max(6.0, 1.6 * len(results) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    colors = {name: f"C{i}" for i, name in enumerate(series)}
    drawn = set()
    for g, r in enumerate(results):
        for j, name in enumerate(series):
            x = g - 0.4 + width * (j + 0.5)
            v = r["variants"].get(name)
            if v is None:
                continue
            speedup = v.get("speedup_vs_reference")
            if speedup is None:
                reason = "gate failed" if not v["gate"]["passed"] else "not timed"
                ax.text(x, 1.0, reason, rotation=90, ha="center", va="bottom", fontsize=7, color=colors[name])
                continue
            # Bars grow from 1 (as fast as the reference): up when faster, down when slower.
            ax.bar(x, speedup - 1.0, width, bottom=1.0, color=colors[name], label=None if name in drawn else name)
            drawn.add(name)
            ax.text(x, speedup, f"{speedup:.2g}x", ha="center", va="bottom" if speedup >= 1 else "top", fontsize=7)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    # label the minor ticks at 2 and 5 times a power of ten too (0.2x, 0.5x, 2x, 5x, ...)
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda y, _: f"{y:g}x" if round(y / 10 ** math.floor(math.log10(y))) in (2, 5) else ""))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(results)), [r["label"] for r in results], rotation=15, ha="right")
    ax.set_ylabel("speed-up over the reference op (x, log scale)")
    device = results[0]["device"]
    where = device
    when = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    if provenance is not None:
        when = provenance["date_utc"][:10]
        gpu = provenance.get("gpu")
        where = f"{device}: {gpu['name']}" if device == "cuda" and gpu else f"{device}: {provenance['machine']['processor']}"
    ax.set_title(f"Forward-pass speed-up over refimpl.ops ({where}, {when})", fontsize=10)
    if drawn:
        ax.legend(fontsize=8)

    save_figure_atomically(fig, path, dpi=150)
    return fig


def print_table(results: list[dict], ceilings: dict) -> None:
    """A benchmark run as a plain-text table on stdout: median, spread, speed-ups, share of copy bandwidth."""
    copy = ceilings["copy"]
    mm = ceilings["matmul_fp32"]
    print(f"\nceilings: copy {copy['value']:.1f} {copy['unit']}, fp32 matmul {mm['value']:.1f} {mm['unit']}")
    header = f"{'case':<24} {'variant':<15} {'median':>11} {'p10-p90':>19} {'vs ref':>8} {'vs compile':>10} {'% copy BW':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        for name, v in r["variants"].items():
            if v["timing"] is None:
                why = v["gate"]["error"] or "; ".join(c["message"] for c in v["gate"]["comparisons"] if not c["passed"])
                print(f"{r['label']:<24} {name:<15} FAILED GATE, not timed: {why[:80]}")
                continue
            t = v["timing"]
            vs_compile = v["speedup_vs_torch_compile"]
            fraction = v.get("fraction_of_copy_bandwidth")
            print(f"{r['label']:<24} {name:<15} {t['median_s'] * 1e6:9.1f}us "
                  f"{t['p10_s'] * 1e6:8.1f}-{t['p90_s'] * 1e6:8.1f}us "
                  f"{v['speedup_vs_reference']:7.2f}x "
                  f"{'' if vs_compile is None else f'{vs_compile:9.2f}x':>10} "
                  f"{'' if fraction is None else f'{100 * fraction:8.1f}%':>9}")
        compiled = r["variants"].get("torch.compile")
        if compiled and compiled.get("compile_seconds") is not None:
            print(f"{'':<24} (torch.compile took {compiled['compile_seconds']:.1f} s to compile; not in its timing)")


def results_markdown(record: dict) -> str:
    """A recorded benchmark (the JSON a benchmark script writes) as a Markdown table with where and when."""
    info = record["provenance"]
    gpu = info.get("gpu")
    where = (f"{gpu['name']} (driver {gpu['driver']}, CUDA {gpu['cuda_runtime']})" if gpu
             else f"{info['machine']['processor']}, {info['machine']['cpu_count']} CPU cores")
    lines = [f"**{record['benchmark']}** on {where}, measured {info['date_utc']} with torch {info['versions']['torch']}"
             f" (`{record['script']}`). Speed-up: the reference's median time over the variant's; > 1 is faster.", "",
             "| case | variant | median | speed-up vs reference | vs torch.compile |", "|---|---|---|---|---|"]
    order = {"reference": 0, "torch.compile": 2, "eager builtin": 3}  # kernels (1) between the reference and PyTorch's
    for result in record["results"]:
        for name, variant in sorted(result["variants"].items(), key=lambda item: (order.get(item[0], 1), item[0])):
            if variant["timing"] is None:
                lines.append(f"| {result['label']} | {name} | failed the correctness gate | | |")
                continue
            vs_compile = variant.get("speedup_vs_torch_compile")
            lines.append(f"| {result['label']} | {name} | {variant['timing']['median_s'] * 1e6:,.0f} µs | "
                         f"{variant['speedup_vs_reference']:.2f}× | "
                         f"{'' if vs_compile is None else f'{vs_compile:.2f}×'} |")
    return "\n".join(lines)


def save_and_report(record: dict, json_path: str | os.PathLike, figure_path: str | os.PathLike) -> int:
    """What every benchmark script ends with: write the record as JSON and its figure, print the table,
    name every variant that failed the correctness gate. Returns the script's exit code (1 if any failed)."""
    from refimpl.io import write_json

    results = record["results"]
    write_json(json_path, record)
    plot_ratios(results, figure_path, provenance=record["provenance"])
    print_table(results, record["ceilings"])
    print(f"\nwrote {json_path} and {figure_path}")
    failed = [f"{r['label']}: {name}" for r in results for name in r["failed"]]
    if failed:
        print("FAILED the correctness gate (not timed): " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def script_options(description: str, argv: list[str] | None = None):
    """The command line every benchmark script takes (--device cpu|cuda, --quick) and the timer settings
    that go with it. Returns (args, TimerSettings); exits with status 2 and a message when --device cuda
    is asked for on a machine without a GPU."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs, no torch.compile")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.device == "cuda":
        timer = TimerSettings(repeats=20, warmup=1) if args.quick else TimerSettings(repeats=100, warmup=2)
    else:
        timer = (TimerSettings(repeats=3, min_seconds=0.05, warmup=1) if args.quick
                 else TimerSettings(repeats=10, min_seconds=1.0, warmup=2))
    return args, timer


BACKENDS = {"cpu": ["numba"], "cuda": ["numba_cuda", "cupy"]}  # what a benchmark times on each device


def run_benchmark(name: str, doc: str, cases: list[Case], argv: list[str] | None = None,
                  settings: dict | None = None) -> int:
    """The whole of a benchmark script: options, provenance, ceilings, every case, the record, the report.

    Every script in benchmarks/ is its cases and one call of this. Writes benchmarks/results/<name>_<device>.json
    and figures/benchmarks/<name>_<device>.png, prints the table; returns the exit code (1 if a variant
    failed its correctness gate). `settings` adds script-specific entries to the record's settings."""
    from kernels.check import example_shapes

    root = Path(__file__).resolve().parents[1]
    args, timer = script_options(doc.split("\n\n")[0], argv)
    info = provenance()  # before the run, so its load average says how busy the machine was beforehand
    print(f"device {args.device}; backends {BACKENDS[args.device]}; measuring ceilings ...", flush=True)
    ceilings = measure_ceilings(args.device, quick=args.quick)
    results = []
    for case in cases:
        print(f"{case.label or case.op} ...", flush=True)
        results.append(benchmark_op(case, BACKENDS[args.device], device=args.device, compile=not args.quick,
                                    ceilings=ceilings, timer=timer))
    references = {case.label or case.op: _qualified(case.reference or get(case.op, "reference")) for case in cases}
    record = {"benchmark": name, "script": f"benchmarks/{name}.py",
              "settings": {"device": args.device, "quick": args.quick, "compile": not args.quick,
                           "timing": timer.as_dict(), "references": references,
                           "shapes": example_shapes("small"), **(settings or {})},
              "provenance": info, "ceilings": ceilings, "results": results}
    return save_and_report(record, root / "benchmarks" / "results" / f"{name}_{args.device}.json",
                           root / "figures" / "benchmarks" / f"{name}_{args.device}.png")


def _qualified(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def example_case(case: str, seed: int = 0) -> Callable[[str, int], tuple[tuple, dict]]:
    """make_inputs(device, s) for one of `kernels.check.example_inputs("small")`'s cases, drawn with seed + s."""
    from kernels.check import example_inputs

    def make(device: str, s: int):
        _, args, kwargs = example_inputs("small", device, seed=seed + s)[case]
        return args, kwargs
    return make
