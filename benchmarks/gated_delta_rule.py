"""Benchmark the gated delta rule kernels against its step loop, at the `small` shapes.

    python benchmarks/gated_delta_rule.py                 # CPU: numba vs the step loop and torch.compile of it
    python benchmarks/gated_delta_rule.py --device cuda   # GPU: numba_cuda and cupy
    python benchmarks/gated_delta_rule.py --quick         # fewer runs, no torch.compile (smoke test)

The truth and the baseline is `gated_delta_rule_recurrent`, the step loop the chapter
calls ground truth; the chunked form (the op the model calls) is timed beside it, and
torch.compile compiles the step loop. Shapes: kernels.check.example_shapes("small"):
B = 16, T = 127, H = 4, K = D = 32, V = 48, scale 0.3, and a non-zero initial state.
Writes benchmarks/results/gated_delta_rule_<device>.json and
figures/benchmarks/gated_delta_rule_<device>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import kernels  # noqa: E402  (first: decides numba's CUDA target)
from kernels.bench import Case, example_case, run_benchmark  # noqa: E402
from refimpl.ops import gated_delta_rule_chunked, gated_delta_rule_recurrent  # noqa: E402

CASES = [Case("gated_delta_rule", example_case("gated_delta_rule", 2000), "gated delta rule",
              gated_delta_rule_recurrent, {"chunked (refimpl op)": gated_delta_rule_chunked})]


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("gated_delta_rule", __doc__, CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
