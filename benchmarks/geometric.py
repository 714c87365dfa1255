"""Benchmark chapter 04's kernel (the coordinate-modulated linear layer) against the PyTorch forms.

    python benchmarks/geometric.py                 # CPU: numba vs the factored and materialised PyTorch, torch.compile
    python benchmarks/geometric.py --device cuda   # GPU: numba_cuda and cupy
    python benchmarks/geometric.py --quick         # fewer runs, no torch.compile (smoke test)

The baseline is the op models call, `refimpl.ops.modulated_linear`, which is already factored
(x W^T + sum_i cos_i (x V_i) U_i^T + sin_i (x Q_i) P_i^T); torch.compile compiles it. Beside it runs
the obviously right form, `modulated_linear_materialised`, which builds each row's W_eff(theta) and
multiplies: what the write-up's formula says literally, and what the fused kernel exists to avoid.

Shapes, every row (token) with its own coordinate:
    small layer   the `small` preset's up-projection: 96 -> 384, 8 wavelet pairs of rank 4, 2,048 rows
    paper layer   the write-up's up-projection: 448 -> 1,792, 64 pairs of rank 12, 64 rows (the
                  materialised form holds 64 x 1,792 x 448 floats, 206 MB, so few rows)
Writes benchmarks/results/geometric_<device>.json and figures/benchmarks/geometric_<device>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import kernels  # noqa: E402  (first: decides numba's CUDA target)
import torch  # noqa: E402
from kernels.bench import Case, run_benchmark  # noqa: E402
from kernels.check import random_tensor  # noqa: E402
from refimpl import ops  # noqa: E402
from refimpl.geometric import GeometricConfig  # noqa: E402

SHAPES = {}
for name, rows in (("small", 2048), ("paper", 64)):
    cfg = GeometricConfig.preset(name)
    SHAPES[f"modulated_linear {name} layer"] = dict(N=rows, I=cfg.d_model, O=cfg.ffn_hidden, M=cfg.n_wavelets,
                                                   r=cfg.rank)

def case_inputs(case: str):
    s = SHAPES[case]

    def make(device: str, seed: int):
        g = torch.Generator().manual_seed(4000 + seed)
        N, I, O, M, r = s["N"], s["I"], s["O"], s["M"], s["r"]
        x = random_tensor((N, I), generator=g)
        weight = random_tensor((O, I), generator=g, scale=I ** -0.5)
        U, P = (random_tensor((M, O, r), generator=g, scale=(M * r) ** -0.5) for _ in range(2))
        V, Q = (random_tensor((M, I, r), generator=g, scale=I ** -0.5) for _ in range(2))
        angle = 2 * torch.pi * torch.rand(N, M, generator=g)
        args = (x, weight, U, V, P, Q, angle.cos(), angle.sin())
        return tuple(t.to(device) for t in args), {}
    return make


OTHERS = {"materialise W_eff, then matmul": ops.modulated_linear_materialised}
CASES = [Case("modulated_linear", case_inputs(case), f"modulated linear, {case.split()[1]} layer {s['I']}->{s['O']}, "
                                                       f"M={s['M']} r={s['r']}, {s['N']} rows",
              ops.modulated_linear, OTHERS) for case, s in SHAPES.items()]


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("geometric", __doc__, CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
