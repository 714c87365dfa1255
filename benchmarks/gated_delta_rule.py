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
from kernels.bench import benchmark_op, measure_ceilings, provenance, save_and_report, script_options  # noqa: E402
from kernels.check import example_inputs, example_shapes  # noqa: E402
from refimpl.gated_deltanet import gated_delta_rule_chunked, gated_delta_rule_recurrent  # noqa: E402

BACKENDS = {"cpu": ["numba"], "cuda": ["numba_cuda", "cupy"]}


def make_inputs(device: str, seed: int):
    _, args, kwargs = example_inputs("small", device, seed=2000 + seed)["gated_delta_rule"]
    return args, kwargs


def main(argv: list[str] | None = None) -> int:
    args, timing = script_options(__doc__.split("\n\n")[0], argv)
    info = provenance()
    ceilings = measure_ceilings(args.device, quick=args.quick)
    print(f"device {args.device}; gated delta rule at {example_shapes('small')} ...", flush=True)
    result = benchmark_op("gated_delta_rule", make_inputs, ["chunked (refimpl op)"] + BACKENDS[args.device],
                          compile=not args.quick, device=args.device, label="gated delta rule",
                          reference=gated_delta_rule_recurrent,
                          kernel_overrides={"chunked (refimpl op)": gated_delta_rule_chunked},
                          ceilings=ceilings, **timing)
    record = {"benchmark": "gated_delta_rule", "script": "benchmarks/gated_delta_rule.py",
              "settings": {"device": args.device, "quick": args.quick, "compile": not args.quick,
                           "reference": "gated_delta_rule_recurrent (step loop)", "timing": timing,
                           "shapes": example_shapes("small")},
              "provenance": info, "ceilings": ceilings, "results": [result]}
    return save_and_report(record, ROOT / "benchmarks" / "results" / f"gated_delta_rule_{args.device}.json",
                           ROOT / "figures" / "benchmarks" / f"gated_delta_rule_{args.device}.png")


if __name__ == "__main__":
    sys.exit(main())
