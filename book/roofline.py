"""Each kernel's measured time beside the roofline: the least time the machine could take for the op, given how
fast it moves bytes and how fast it multiplies.

    floor = max(bytes moved / measured copy bandwidth, useful FLOPs / measured matmul rate)

Both rates are measured on this machine (`kernels.bench.measure_ceilings`); the times are measured by
`kernels.bench.benchmark_op` (every variant passes the book's correctness gate first). A variant's distance from
its floor says how much it leaves on the table; which floor is higher says whether the op is bound by memory or
by arithmetic. On a CPU an op's inputs can stay in cache between repeats while the copy ceiling streams from
memory, so a small memory-bound op can come in *under* its floor: the table shows that rather than hiding it.

    cases = roofline.shared_block_cases("small")            # RMSNorm, attention (causal, sliding window)
    results, ceilings = roofline.measure(cases)             # the reference, numba, PyTorch's built-in (CPU)
    rows = roofline.rows(results, ceilings)                 # one per (case, variant): time, floor, bound
    roofline.figure(rows); roofline.findings(results)       # the picture; sentences built from the numbers

On a GPU, `measure(cases, device="cuda")` times numba_cuda and cupy with CUDA events against the GPU's ceilings.

Does not include: torch.compile (it takes tens of seconds per op on a CPU; `make benchmark` and `make gpu-check`
time it).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt

import kernels
from kernels.bench import BACKENDS, Case, TimerSettings, benchmark_op, measure_ceilings
from kernels.check import example_inputs


def shared_block_cases(size: str = "small") -> list[Case]:
    """RMSNorm and attention (causal GQA, and with a sliding window) at `kernels.check.example_shapes(size)`,
    each with PyTorch's own built-in beside it and its useful FLOPs."""
    inputs = example_inputs(size)

    def make(case):
        def make_inputs(device: str, seed: int):
            _, args, kwargs = example_inputs(size, device, seed=seed)[case]
            return args, kwargs
        return make_inputs

    (x, _), _ = inputs["rms_norm"][1:]
    cases = [Case("rms_norm", make("rms_norm"), eager_builtin=kernels.rms_norm.torch_builtin,
                  eager_builtin_name=kernels.rms_norm.TORCH_BUILTIN_NAME, flops=kernels.rms_norm.useful_flops(x))]
    for case, label in (("attention", "attention (causal GQA)"), ("attention (sliding window)", None)):
        _, (q, k, _), kwargs = inputs[case]
        window = kwargs["window"]
        cases.append(Case("attention", make(case), label or f"attention (window {window})",
                          eager_builtin=kernels.attention.torch_builtin,
                          eager_builtin_name=kernels.attention.TORCH_BUILTIN_NAME,
                          flops=kernels.attention.useful_flops(q, k, causal=True, window=window)))
    return cases


def measure(cases: list[Case], *, device: str = "cpu", quick: bool = False) -> tuple[list[dict], dict]:
    """(benchmark_op's result for each case, the device's measured ceilings). The kernels timed are the device's
    backends (`kernels.bench.BACKENDS`: numba on the CPU; numba_cuda and cupy on a GPU, timed with CUDA events).
    `quick`: fewer repeats and smaller ceiling measurements (the `ci` profile); the numbers are then rougher."""
    ceilings = measure_ceilings(device, quick=quick)
    timer = TimerSettings(warmup=2, repeats=5, min_seconds=0.05) if quick else TimerSettings(repeats=10,
                                                                                            min_seconds=0.3)
    return [benchmark_op(case, BACKENDS[device], device=device, compile=False, ceilings=ceilings, timer=timer)
            for case in cases], ceilings


@dataclass(frozen=True)
class Row:
    """One variant of one case: its measured time and its floor."""
    case: str
    variant: str
    seconds: float
    memory_floor_s: float          # bytes moved / copy bandwidth
    compute_floor_s: float | None  # useful FLOPs / matmul rate (None when the op has no FLOP count)

    @property
    def floor_s(self) -> float:
        return max(self.memory_floor_s, self.compute_floor_s or 0.0)

    @property
    def bound(self) -> str:
        return "compute" if (self.compute_floor_s or 0.0) > self.memory_floor_s else "memory"

    @property
    def times_floor(self) -> float:
        return self.seconds / self.floor_s


def rows(results: list[dict], ceilings: dict) -> list[Row]:
    """One Row per timed variant of each result (benchmark_op's dicts), floors from `ceilings`."""
    copy = ceilings["copy"]["per_second"]
    matmul = ceilings["matmul_fp32"]["per_second"]
    out = []
    for result in results:
        compute = result["flops"] / matmul if result.get("flops") else None
        for name, variant in result["variants"].items():
            if variant.get("timing"):
                out.append(Row(result["label"], name, variant["timing"]["median_s"], result["bytes_moved"] / copy,
                               compute))
    return out


def markdown(table: list[Row]) -> str:
    """The rows as a Markdown table (milliseconds)."""
    lines = ["| op | variant | measured (ms) | floor (ms) | bound by | × the floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.case} | {r.variant} | {r.seconds * 1e3:.3g} | {r.floor_s * 1e3:.3g} | {r.bound} | "
              f"{r.times_floor:.1f}× |" for r in table]
    return "\n".join(lines)


def figure(table: list[Row], title: str = ""):
    """Horizontal bars of measured time per (case, variant), log scale, with each case's floor drawn as a line."""
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(table)))
    labels = [f"{r.case}: {r.variant}" for r in table]
    colours = {"reference": "tab:blue", "numba": "tab:orange", "numba_cuda": "tab:red", "cupy": "tab:purple",
               "eager builtin": "tab:green"}
    ax.barh(labels, [r.seconds * 1e3 for r in table], color=[colours.get(r.variant, "tab:grey") for r in table])
    for i, r in enumerate(table):
        ax.plot([r.floor_s * 1e3] * 2, [i - 0.45, i + 0.45], color="black", lw=2)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set(xlabel="time per call (ms, log scale); black line: the floor, max(bytes / copy rate, FLOPs / matmul rate)",
           title=title)
    fig.tight_layout()
    return fig


def _variant(result: dict, name: str) -> dict | None:
    v = result["variants"].get(name)
    return v if v and v.get("timing") else None


def findings(results: list[dict], kernel: str = "numba") -> str:
    """Sentences built from the measurements: for each case, the `kernel` backend against PyTorch's built-in and
    the reference, then the share of the ceiling that bounds the op (matmul rate, or copy bandwidth) each reaches."""
    sentences = []
    for result in results:
        kern, builtin, ref = (_variant(result, n) for n in (kernel, "eager builtin", "reference"))
        if not (kern and builtin and ref):
            continue
        t = {n: v["timing"]["median_s"] for n, v in (("kernel", kern), ("builtin", builtin), ("ref", ref))}
        ratio = t["builtin"] / t["kernel"]
        verb = f"{ratio:.2f}× as fast as" if ratio >= 1 else f"{1 / ratio:.2f}× slower than"
        line = (f"**{result['label']}**: {kernel} {t['kernel'] * 1e3:.3g} ms, {verb} PyTorch's built-in "
                f"({t['builtin'] * 1e3:.3g} ms); the plain reference takes {t['ref'] * 1e3:.3g} ms.")
        # the floor that is higher is the one the op is bound by; the same holds for the fractions of the ceilings
        if (kern.get("fraction_of_matmul") or 0.0) > kern["fraction_of_copy_bandwidth"]:
            line += (f" Of the measured matmul rate, the built-in reaches {builtin['fraction_of_matmul']:.0%} "
                     f"and {kernel} {kern['fraction_of_matmul']:.0%}.")
        else:
            line += (f" Bytes moved per second: {kernel} {kern['fraction_of_copy_bandwidth']:.0%} of the measured "
                     f"copy rate, the built-in {builtin['fraction_of_copy_bandwidth']:.0%}.")
        sentences.append("- " + line)
    return "\n".join(sentences)
