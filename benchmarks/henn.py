"""Benchmark chapter 02's kernels (the Mamba-3 scan, INT6/INT4 packing) against their references.

    python benchmarks/henn.py                 # CPU: numba vs the step loop / PyTorch, the chunked form, torch.compile
    python benchmarks/henn.py --device cuda   # GPU: numba_cuda and cupy
    python benchmarks/henn.py --quick         # fewer runs, no torch.compile (smoke test)

The truth and the baseline of the scan is its step loop, `mamba3_scan_recurrent`; the op models
call is the chunked matrix form, timed beside it. The packing ops' truth and baseline are the
vectorised PyTorch functions of refimpl/quant.py. torch.compile compiles each baseline.

Shapes: kernels.check.example_inputs("small"): the scan at B = 16, T = 127, H = 4 heads of P = 48,
MIMO rank R = 2, state N = 64 with 16 rotating pairs, trapezoid, a full starting state; packing
at 16 x 4 rows of 4,067 values (INT6 and INT4), and at a whole model's weights (the write-up's ~36M
parameters: 48,000 rows of 768). Writes benchmarks/results/henn_<device>.json and
figures/benchmarks/henn_<device>.png.
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

import torch  # noqa: E402

#: a whole model's weights: the write-up's ~36M parameters as 48,000 rows of its width 768 (36.9M values)
MODEL_ROWS, MODEL_WIDTH = 48_000, 768


def whole_model(op: str, bits: int):
    """make_inputs for `op` on MODEL_ROWS x MODEL_WIDTH quantised values (int8 codes in the `bits`-bit range)."""
    def make(device: str, s: int):
        g = torch.Generator().manual_seed(2000 + s)
        q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (MODEL_ROWS, MODEL_WIDTH), generator=g, dtype=torch.int8)
        if op == "pack_bits":
            return (q.to(device), bits), {}
        packed = ops.pack_bits(q, bits).to(device)
        if op == "unpack_bits":
            return (packed, MODEL_WIDTH, bits), {}
        scale = (torch.rand(MODEL_ROWS, generator=g) + 0.5) / 2 ** (bits - 1)
        return (packed, scale.to(device), MODEL_WIDTH, bits), {}
    return make


WHOLE = f"{MODEL_ROWS * MODEL_WIDTH / 1e6:.1f}M values"
CASES = [
    Case("mamba3_scan", example_case("mamba3_scan", 2000), "Mamba-3 scan (MIMO 2, rotating, trapezoid)",
         ops.mamba3_scan_recurrent, {"chunked matrix form": ops.mamba3_scan}),
    Case("pack_bits", example_case("pack_bits int6 [B, H, T*D + 3]", 2000), "pack INT6", ops.pack_bits),
    Case("unpack_bits", example_case("unpack_bits int6 [B, H, bytes]", 2000), "unpack INT6", ops.unpack_bits),
    Case("dequantize_packed", example_case("dequantize_packed int6 [B*H, bytes]", 2000), "dequantise packed INT6",
         ops.dequantize_packed),
    Case("pack_bits", example_case("pack_bits int4 [B, H, T*D + 3]", 2000), "pack INT4", ops.pack_bits),
    Case("dequantize_packed", example_case("dequantize_packed int4 [B*H, bytes]", 2000), "dequantise packed INT4",
         ops.dequantize_packed),
    Case("pack_bits", whole_model("pack_bits", 6), f"pack INT6, {WHOLE}", ops.pack_bits),
    Case("unpack_bits", whole_model("unpack_bits", 6), f"unpack INT6, {WHOLE}", ops.unpack_bits),
    Case("dequantize_packed", whole_model("dequantize_packed", 6), f"dequantise INT6, {WHOLE}", ops.dequantize_packed),
    Case("pack_bits", whole_model("pack_bits", 4), f"pack INT4, {WHOLE}", ops.pack_bits),
    Case("dequantize_packed", whole_model("dequantize_packed", 4), f"dequantise INT4, {WHOLE}", ops.dequantize_packed),
]


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("henn", __doc__, CASES, argv)


if __name__ == "__main__":
    sys.exit(main())
