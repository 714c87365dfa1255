"""Benchmark the shared blocks' kernels against the reference ops, at the `small` preset's shapes.

    python benchmarks/shared_blocks.py                  # CPU: numba vs reference, torch.compile, eager built-ins
    python benchmarks/shared_blocks.py --device cuda    # GPU: numba_cuda and cupy
    python benchmarks/shared_blocks.py --quick          # fewer runs, no torch.compile (smoke test)

Cases (the `small` preset: d_model C = 128, H = 4 heads, G = 2 kv heads, D = 32, B = 16, and T = 127, one short
of its 128 so that no chunk size divides it;
MoE with E = 4 experts, top-2, so N = B * T = 2032 tokens):
    rms_norm                       x [B*T, C], weight [C]
    attention (causal GQA)         q [B, T, H, D], k, v [B, T, G, D]
    attention (window 32)          the same, each query seeing itself and the 31 keys before it
    moe_dispatch                   x [N, C], expert_index [N, 2] (distinct experts per token)
    moe_combine                    expert_out [2N, C], slot [N, 2], weight [N, 2]

Every variant passes the correctness gate first (kernels.bench.benchmark_op), then is timed on
the same inputs in this process. The machine's ceilings (copy bandwidth, matmul FLOP/s) and
provenance are recorded alongside. Writes benchmarks/results/shared_blocks_<device>.json and
figures/benchmarks/shared_blocks_<device>.png, and prints a table.

Backends: on the CPU only `numba` (numba_cuda would run on the CUDA simulator, which is a
correctness tool, not a timing target; cupy needs a GPU); on CUDA `numba_cuda` and `cupy`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import kernels  # noqa: E402  (first: decides numba's CUDA target)
from kernels.bench import BACKENDS, Case, example_case, run_benchmark  # noqa: E402
from kernels.check import example_shapes  # noqa: E402


# The `small` preset's shapes: the same ones the tests and the overview check (kernels.check.example_shapes).
SHAPES = example_shapes("small")
B, T, C, H, G, D = (SHAPES[n] for n in "BTCHGD")
E, TOP_K, WINDOW = SHAPES["E"], SHAPES["k"], SHAPES["window"]
N = B * T


def case_inputs(case: str):
    """make_inputs(device, seed) for one of `kernels.check.example_inputs("small")`'s cases (the ones the tests check)."""
    return example_case(case, 1000)


# ---------------------------------------------------------------- eager PyTorch built-ins, with the ops' signatures

builtin_rms_norm = kernels.rms_norm.torch_builtin
builtin_attention = kernels.attention.torch_builtin


def attention_flops(window: int | None) -> int:
    """Useful FLOP of the attention cases (kernels.attention.useful_flops at these shapes)."""
    (q, k, _), _ = case_inputs("attention")("cpu", 0)
    return kernels.attention.useful_flops(q, k, causal=True, window=window)


BUILTIN_NAMES = {"rms_norm": kernels.rms_norm.TORCH_BUILTIN_NAME, "attention": kernels.attention.TORCH_BUILTIN_NAME}
CASES = [
    Case("rms_norm", case_inputs("rms_norm"), eager_builtin=builtin_rms_norm, eager_builtin_name=BUILTIN_NAMES["rms_norm"]),
    Case("attention", case_inputs("attention"), "attention (causal GQA)", eager_builtin=builtin_attention,
         eager_builtin_name=BUILTIN_NAMES["attention"], flops=attention_flops(None)),
    Case("attention", case_inputs("attention (sliding window)"), f"attention (window {WINDOW})",
         eager_builtin=builtin_attention, eager_builtin_name=BUILTIN_NAMES["attention"], flops=attention_flops(WINDOW)),
    Case("moe_dispatch", case_inputs("moe_dispatch")),
    Case("moe_combine", case_inputs("moe_combine")),
]


# ---------------------------------------------------------------- run

def missing_kernels(device: str) -> list[str]:
    """'op: backend' for every kernel this benchmark needs that is not registered."""
    have = kernels.registered()
    needed = ["reference"] + BACKENDS[device]
    return [f"{op}: {backend}" for op in dict.fromkeys(case.op for case in CASES)
            for backend in needed if backend not in have.get(op, [])]


def main(argv: list[str] | None = None) -> int:
    missing = missing_kernels("cpu")
    if missing:
        print("cannot benchmark: these kernels are not registered (importing `kernels` registers them): "
              + ", ".join(missing) + f"\nregistered: {kernels.registered()}", file=sys.stderr)
        return 1
    return run_benchmark("shared_blocks", __doc__, CASES, argv, settings={"preset": "small", "N": N})


if __name__ == "__main__":
    sys.exit(main())
