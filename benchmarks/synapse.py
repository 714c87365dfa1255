"""Benchmark chapter 05's kernels (S6 scan, mLSTM, fast-weight memory, TIES merge) against their references.

    python benchmarks/synapse.py                 # CPU: numba vs the step loops, the other reference forms, torch.compile
    python benchmarks/synapse.py --device cuda   # GPU: numba_cuda and cupy
    python benchmarks/synapse.py --quick         # fewer runs, no torch.compile (smoke test)

The truth and the baseline of each recurrence is its step loop, the form the chapter calls ground
truth; torch.compile compiles that loop. The other PyTorch forms are timed beside it:

    selective_scan       step loop `selective_scan_recurrent` (the op models call); the chunked form
    mlstm                step loop `mlstm_recurrent` (stabilised; the op models call)
    fast_weight_memory   step loop `fast_weight_memory_recurrent` (the op models call); the parallel form
    ties_merge           `refimpl.ops.ties_merge` (vectorised PyTorch: topk, sign, masked mean)

Shapes: kernels.check.example_inputs("small") (B = 16, T = 127, H = 4 heads of Dk = 32, Dv = 48; the scan has
Dm = 2 C = 256 channels and N = 16 states; TIES merges K = 3 task vectors of R C = 260,096 entries).
Writes benchmarks/results/synapse_<device>.json and figures/benchmarks/synapse_<device>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import kernels  # noqa: E402  (first: decides numba's CUDA target)
from kernels.bench import Case, example_case, run_benchmark  # noqa: E402
from refimpl import ops  # noqa: E402


CASES = [
    Case("selective_scan", example_case("selective_scan", 3000), "selective scan (S6)",
         ops.selective_scan_recurrent, {"chunked form": ops.selective_scan_chunked}),
    Case("mlstm", example_case("mlstm", 3000), "mLSTM (stabilised)", ops.mlstm_recurrent),
    Case("fast_weight_memory", example_case("fast_weight_memory", 3000), "fast-weight memory",
         ops.fast_weight_memory_recurrent, {"parallel form": ops.fast_weight_memory_parallel}),
    Case("ties_merge", example_case("ties_merge", 3000), "TIES merge", ops.ties_merge),
]


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("synapse", __doc__, CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
