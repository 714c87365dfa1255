"""Benchmark chapter 01's kernels (3D neighbourhood attention, nearest-code search, the fused Adam step).

    python benchmarks/sintellix.py                 # CPU: numba vs the PyTorch references and torch.compile
    python benchmarks/sintellix.py --device cuda   # GPU: numba_cuda and cupy
    python benchmarks/sintellix.py --quick         # fewer runs, no torch.compile (smoke test)

The truth and the baseline of each op is its refimpl function: `ops.neighbourhood_attention`
(pad, 27 shifted views, masked softmax), `ops.vq_nearest` (chunked expanded distances, argmin) and
`ops.adam_clip_step` (the norm, then PyTorch's element-wise Adam); torch.compile compiles each.
Shapes: kernels.check.example_inputs("small"): attention on an 8 x 4 x 4 grid, batch 16, 4 heads of 32,
radius 2; the search over 2,032 vectors of 128 against 511 codes; Adam over 260,096 parameters. The Adam kernel
updates its inputs in place, so repeated timing runs keep stepping the same buffers (the work per step
does not change). Writes benchmarks/results/sintellix_<device>.json and figures/benchmarks/sintellix_<device>.png.
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
    Case("neighbourhood_attention", example_case("neighbourhood_attention", 3000),
         "3D neighbourhood attention (radius 2)", ops.neighbourhood_attention),
    Case("vq_nearest", example_case("vq_nearest", 3000), "nearest-code search", ops.vq_nearest),
    Case("adam_clip_step", example_case("adam_clip_step", 3000), "Adam step with clipping", ops.adam_clip_step),
]


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("sintellix", __doc__, CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
