"""`make gpu-check`: the one script a GPU machine runs, and that every CPU run rehearses (`--dry-run`).

    python -m book.gpu_check                # on a CUDA GPU: every step below, at GPU sizes
    python -m book.gpu_check --dry-run      # anywhere: the same steps, numba's CUDA simulator, tiny sizes
    python -m book.gpu_check --steps kernels,benchmarks --out DIR

The steps, in order (each one's result goes into one JSON record, with provenance):
    machine     the GPU, the driver, the library versions (`kernels.bench.provenance`)
    ceilings    the device's copy bandwidth and matmul rate (`kernels.bench.measure_ceilings`)
    kernels     every numba_cuda and cupy kernel against its reference with the one check
                (`kernels.check.check_backend`): at the CPU tests' sizes (tiny, small) and at `large`,
                sized for a GPU. The dry run checks `tiny` on the simulator, and hands the `large`
                inputs to every CUDA wrapper with the launch itself skipped, so a size limit a GPU
                would hit (a head dim above a kernel's MAX_*) is found on the CPU.
    benchmarks  every case of every script in benchmarks/, timed against PyTorch eager and
                torch.compile with CUDA events (`kernels.bench.benchmark_op`). The dry run times the
                numba CPU kernels instead, quickly and without torch.compile: the same code path, no
                claim about a GPU.
    chapters    each chapter notebook run end to end in its `ci` profile (papermill), on the GPU: BOOK_DEVICE
                is set to it, so a chapter that takes its device from `book.device_for_profile` puts its
                models, batches and kernels there at the `ci` sizes (the gpu profile's code paths, scaled
                down). Skipped by the dry run: `make test` executes the same notebooks on the CPU.

Writes `benchmarks/results/gpu_check_<gpu>.json` on a GPU (commit it) or `build/gpu_check/dry_run.json`,
prints a summary table, and exits 1 if any kernel disagreed with its reference or any step failed, 0 otherwise.
It uses the Python it is run with: on a GPU machine, the machine's torch, CuPy and numba-cuda (the Makefile
installs only the project itself, `pip install --no-deps -e .`).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("machine", "ceilings", "kernels", "benchmarks", "chapters")
GPU_BACKENDS = ("numba_cuda", "cupy")
BENCHMARK_SCRIPTS = ("shared_blocks", "gated_delta_rule", "synapse", "henn", "geometric", "sintellix")


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: --dry-run, --steps, --out, --ops."""
    parser = argparse.ArgumentParser(prog="python -m book.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: numba's CUDA simulator at tiny sizes, CPU timings (what CI runs)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON record (default: see above)")
    parser.add_argument("--ops", default=None, help="comma-separated ops: check only these kernels (to rerun one)")
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    args.ops = [s.strip() for s in args.ops.split(",") if s.strip()] if args.ops else None
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    return args


# ----------------------------------------------------------------------------
# The steps: each returns plain data and a list of failures (strings); an exception is a failure too
# ----------------------------------------------------------------------------

def step_machine(device: str, dry_run: bool) -> tuple[dict, list[str]]:
    """Provenance (GPU, driver, versions) and what each kernel backend can do here."""
    from kernels import backend_status
    from kernels.bench import provenance
    return {"provenance": provenance(), "backends": backend_status()}, []


def step_ceilings(device: str, dry_run: bool) -> tuple[dict, list[str]]:
    """Copy bandwidth and matmul rate of the device (quick and rough in the dry run)."""
    from kernels.bench import measure_ceilings
    return measure_ceilings(device, quick=dry_run), []


@contextmanager
def launches_skipped():
    """Within the block every numba-cuda and CuPy launch returns at once: the wrappers still check their
    arguments and allocate their outputs, so sizes a kernel refuses are found without running it."""
    from kernels import launch
    saved = launch.numba_cuda, launch.cupy
    launch.numba_cuda = lambda *args, **kwargs: None
    launch.cupy = lambda *args, **kwargs: None
    try:
        yield
    finally:
        launch.numba_cuda, launch.cupy = saved


def _accepts_large_inputs(backend: str, ops: list[str] | None = None) -> list[str]:
    """Every `backend` kernel called on the `large` inputs with the launches skipped: the refusals."""
    from kernels.check import _to, example_inputs
    from kernels.registry import get, registered
    refused = []
    with launches_skipped():
        for case, (op, args, kwargs) in example_inputs("large").items():
            if backend not in registered().get(op, []) or (ops is not None and op not in ops):
                continue
            try:
                get(op, backend)(*_to(args, dtype=None), **kwargs)
            except (ValueError, RuntimeError) as err:
                refused.append(f"{backend} {case} (large): {err}")
    return refused


def step_kernels(device: str, dry_run: bool, ops: list[str] | None = None) -> tuple[dict, list[str]]:
    """Every GPU backend's kernels against their references with the one check, size by size."""
    from kernels import runnable_backends
    from kernels.check import check_backend
    runnable = [b for b in GPU_BACKENDS if b in runnable_backends()]
    sizes = ("tiny",) if dry_run else ("tiny", "small", "large")
    table, failures = {}, []
    for backend in GPU_BACKENDS:
        if backend not in runnable:
            table[backend] = {"skipped": "not runnable on this machine (see the machine step's backends)"}
            if not dry_run:
                failures.append(f"{backend}: not runnable on this GPU machine")
            continue
        table[backend] = {}
        for size in sizes:
            started = time.perf_counter()
            results = check_backend(backend, size, device, ops=ops)
            bad = [r for r in results if not r.passed]
            table[backend][size] = {"comparisons": len(results), "failed": [r.as_dict() for r in bad],
                                    "seconds": round(time.perf_counter() - started, 2)}
            failures += [f"{backend} {size}: {r.message}" for r in bad]
        if dry_run:
            refused = _accepts_large_inputs(backend, ops)
            table[backend]["large, launches skipped"] = {"refused": refused}
            failures += refused
    return table, failures


def _load_script(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpu_check_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_benchmarks(device: str, dry_run: bool, ceilings: dict | None) -> tuple[dict, list[str]]:
    """Every case of every benchmark script: gated, then timed against eager and torch.compile."""
    from kernels.bench import BACKENDS, TimerSettings, benchmark_op, measure_ceilings
    timer = TimerSettings(repeats=2, min_seconds=0.0, warmup=1) if dry_run else TimerSettings(repeats=50, warmup=2)
    ceilings = ceilings or measure_ceilings(device, quick=dry_run)
    table, failures = {}, []
    for name in BENCHMARK_SCRIPTS:
        cases = _load_script(name).CASES
        results = [benchmark_op(case, BACKENDS[device], device=device, compile=not dry_run, ceilings=ceilings,
                                timer=timer) for case in cases]
        table[name] = results
        failures += [f"benchmark {name}, {r['label']}: {variant} failed its gate" for r in results for variant in r["failed"]]
    return table, failures


def step_chapters(device: str, dry_run: bool) -> tuple[dict, list[str]]:
    """Each chapter notebook end to end in its ci profile (skipped by the dry run)."""
    if dry_run:
        return {"skipped": "dry run: `make test` executes every chapter notebook in its ci profile"}, []
    import os

    from book.chapters import chapters
    from book.notebook_run import run_notebook
    out_dir = ROOT / "build" / "gpu_check" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BOOK_OUTPUT_DIR", str(ROOT / "build" / "gpu_check"))   # figures stay out of the tree
    os.environ["BOOK_DEVICE"] = device                     # the ci sizes, on the GPU
    table, failures = {}, []
    for notebook in chapters():
        started = time.perf_counter()
        try:
            run_notebook(notebook, out_dir / notebook.name, parameters={"PROFILE": "ci"}, cwd=notebook.parent)
            table[notebook.stem] = {"ok": True}
        except Exception as err:                            # papermill's own error types: report, go on
            table[notebook.stem] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
            failures.append(f"chapter {notebook.stem}: {type(err).__name__}")
        table[notebook.stem]["seconds"] = round(time.perf_counter() - started, 1)
    return table, failures


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

def _gpu_slug(record: dict) -> str:
    gpu = (record.get("machine") or {}).get("provenance", {}).get("gpu") or {}
    return re.sub(r"[^a-z0-9]+", "_", (gpu.get("name") or "gpu").lower()).strip("_")


def summary_lines(record: dict) -> list[str]:
    """The table printed at the end: one line per step, then the failures."""
    lines = [f"{'step':11s} {'status':8s} {'seconds':>8s}  detail"]
    for step, entry in record["steps"].items():
        status = "FAILED" if entry["failures"] else ("skipped" if "skipped" in (entry.get("result") or {}) else "ok")
        detail = ""
        if step == "kernels" and isinstance(entry.get("result"), dict):
            detail = "; ".join(f"{backend}: " + (", ".join(
                f"{size} {v['comparisons'] - len(v['failed'])}/{v['comparisons']} passed" if "comparisons" in v
                else f"{size}: {len(v['refused'])} refused" for size, v in sizes.items() if isinstance(v, dict))
                or sizes.get("skipped", "")) for backend, sizes in entry["result"].items())
        elif step == "benchmarks" and isinstance(entry.get("result"), dict):
            detail = f"{sum(len(v) for v in entry['result'].values())} cases in {len(entry['result'])} scripts"
        lines.append(f"{step:11s} {status:8s} {entry['seconds']:8.1f}  {detail}")
    for step, entry in record["steps"].items():
        lines += [f"  {step}: {failure}" for failure in entry["failures"][:20]]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the steps, write the JSON record, print the summary; 0 if all passed, 1 if any failed, 2 without a GPU."""
    import torch

    from kernels.bench import json_safe   # (importing kernels first decides numba's target: the simulator)
    from refimpl.io import write_json

    args = options(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run with --dry-run to rehearse "
              "on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    record = {"gpu_check": "dry run" if args.dry_run else "gpu", "device": device, "steps": {}}
    ceilings = None
    for step in args.steps:
        print(f"gpu_check: {step} ...", flush=True)
        started = time.perf_counter()
        try:
            if step == "benchmarks":
                result, failures = step_benchmarks(device, args.dry_run, ceilings)
            elif step == "kernels":
                result, failures = step_kernels(device, args.dry_run, args.ops)
            else:
                result, failures = globals()[f"step_{step}"](device, args.dry_run)
            if step == "ceilings":
                ceilings = result
        except Exception:                                   # a step that crashes is a failure, not the end
            result, failures = None, [traceback.format_exc(limit=6)]
        record["steps"][step] = {"result": result, "failures": failures,
                                 "seconds": round(time.perf_counter() - started, 2)}
    if "machine" in record["steps"] and record["steps"]["machine"]["result"]:
        record["machine"] = record["steps"]["machine"]["result"]
    out = args.out or (ROOT / "build" / "gpu_check" if args.dry_run else ROOT / "benchmarks" / "results")
    path = out / ("dry_run.json" if args.dry_run else f"gpu_check_{_gpu_slug(record)}.json")
    write_json(path, json_safe(record))
    print("\n".join(summary_lines(record)))
    failed = any(entry["failures"] for entry in record["steps"].values())
    print(f"\nwrote {path}; {'FAILED' if failed else 'all steps passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
