"""Benchmark the shared blocks' kernels against the reference ops, at the `small` preset's shapes.

    python benchmarks/shared_blocks.py                  # CPU: numba vs reference, torch.compile, eager built-ins
    python benchmarks/shared_blocks.py --device cuda    # GPU: numba_cuda and cupy
    python benchmarks/shared_blocks.py --quick          # fewer runs (smoke test)

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

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402  (first: decides numba's CUDA target)
from kernels.bench import benchmark_op, measure_ceilings, provenance, save_and_report  # noqa: E402
from kernels.check import example_inputs, example_shapes  # noqa: E402
from refimpl import ops  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
FIGURES_DIR = ROOT / "figures" / "benchmarks"
BACKENDS = {"cpu": ["numba"], "cuda": ["numba_cuda", "cupy"]}

# The `small` preset's shapes: the same ones the tests and the overview check (kernels.check.example_shapes).
SHAPES = example_shapes("small")
B, T, C, H, G, D = (SHAPES[n] for n in "BTCHGD")
E, TOP_K, WINDOW = SHAPES["E"], SHAPES["k"], SHAPES["window"]
N = B * T


# ---------------------------------------------------------------- inputs: make_inputs(device, seed) -> (args, kwargs)

def case_inputs(case: str):
    """The inputs of one of `kernels.check.example_inputs("small")`'s cases (the ones the tests check)."""
    def make(device: str, seed: int):
        _, args, kwargs = example_inputs("small", device, seed=1000 + seed)[case]
        return args, kwargs
    return make


# ---------------------------------------------------------------- eager PyTorch built-ins, with the ops' signatures

def builtin_rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@functools.cache
def _allowed(T_: int, S: int, window: int | None, device: str) -> torch.Tensor:
    # Built once per shape, as a model would build it once per forward and share it across layers.
    return ops.attention_mask(T_, S, True, window, device=device)


def builtin_attention(q, k, v, *, causal=True, window=None, scale=None):
    """F.scaled_dot_product_attention in its [B, heads, T, D] layout, GQA via enable_gqa."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T_, S = q.shape[1], k.shape[1]
    if causal and window is None and T_ == S:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = _allowed(T_, S, window, q.device.type) if causal else None
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def attention_flops(window: int | None) -> int:
    """Useful FLOP: 2 D for q.k and 2 D for p.v per allowed (query, key) pair, per head and batch row."""
    pairs = int(ops.attention_mask(T, T, True, window).sum())
    return 4 * D * pairs * H * B


CASES = [
    # (label, op, make_inputs, eager built-in, flops)
    ("rms_norm", "rms_norm", case_inputs("rms_norm"), builtin_rms_norm, None),
    ("attention (causal GQA)", "attention", case_inputs("attention"), builtin_attention, attention_flops(None)),
    (f"attention (window {WINDOW})", "attention", case_inputs("attention (sliding window)"), builtin_attention,
     attention_flops(WINDOW)),
    ("moe_dispatch", "moe_dispatch", case_inputs("moe_dispatch"), None, None),
    ("moe_combine", "moe_combine", case_inputs("moe_combine"), None, None),
]
BUILTIN_NAMES = {"rms_norm": "torch.nn.functional.rms_norm",
                 "attention": "torch.nn.functional.scaled_dot_product_attention (enable_gqa)"}


# ---------------------------------------------------------------- run

def missing_kernels(device: str) -> list[str]:
    """'op: backend' for every kernel this benchmark needs that is not registered."""
    have = kernels.registered()
    needed = ["reference"] + BACKENDS[device]
    return [f"{op}: {backend}" for op in dict.fromkeys(case[1] for case in CASES)
            for backend in needed if backend not in have.get(op, [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs and smaller ceiling measurements")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes tens of seconds per op on a CPU)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False on this machine; run with --device cpu", file=sys.stderr)
        return 2
    missing = missing_kernels(args.device)
    if missing:
        print("cannot benchmark: these kernels are not registered (importing `kernels` registers them): "
              + ", ".join(missing) + f"\nregistered: {kernels.registered()}", file=sys.stderr)
        return 1

    timing = {"repeats": 5, "min_seconds": 0.05, "warmup": 2} if args.quick else {"repeats": 30, "min_seconds": 1.0, "warmup": 3}
    if args.device == "cuda":
        timing = {"repeats": 20 if args.quick else 200, "warmup": timing["warmup"]}

    info = provenance()  # before the run, so its load average says how busy the machine was beforehand
    print(f"device {args.device}; backends {BACKENDS[args.device]}; measuring ceilings ...", flush=True)
    ceilings = measure_ceilings(args.device, quick=args.quick)
    results = []
    for label, op, make_inputs, builtin, flops in CASES:
        print(f"{label} ...", flush=True)
        results.append(benchmark_op(op, make_inputs, BACKENDS[args.device], compile=not args.no_compile,
                                    eager_builtin=builtin, eager_builtin_name=BUILTIN_NAMES.get(op),
                                    device=args.device, label=label, ceilings=ceilings, flops=flops, **timing))

    record = {
        "benchmark": "shared_blocks",
        "script": "benchmarks/shared_blocks.py",
        "settings": {"device": args.device, "quick": args.quick, "compile": not args.no_compile,
                     "backends": BACKENDS[args.device], "preset": "small", "timing": timing,
                     "shapes": {**SHAPES, "N": N}},
        "provenance": info,
        "ceilings": ceilings,
        "results": results,
    }
    return save_and_report(record, RESULTS_DIR / f"shared_blocks_{args.device}.json",
                           FIGURES_DIR / f"shared_blocks_{args.device}.png")


if __name__ == "__main__":
    sys.exit(main())
