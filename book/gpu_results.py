"""The GPU results in the book: each chapter shows the latest table `make gpu-check` recorded on a real GPU for
its ops (where and when it was measured), and says plainly when no GPU has run it yet.

    book.gpu_results.report(["gated_delta_rule", "attention"])    # in a chapter's kernel section

The record is the newest benchmarks/results/gpu_check_<gpu>.json (by the date in its provenance). The table has
one row per benchmarked case of those ops and per variant: the median time with CUDA events and the speed-up
over the reference and over torch.compile; a variant that failed the correctness gate says so instead of a time.
The kernel check's verdicts (every numba_cuda and cupy kernel, at each size) are summarised above it.

Does not include: any number measured in the reader's own session (the chapter's timing cells do that).
"""

from __future__ import annotations

from pathlib import Path

from book.show import display_markdown
from refimpl.io import read_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
NONE_YET = ("**On a GPU:** no GPU has run `make gpu-check` yet (there is no `benchmarks/results/gpu_check_*.json`), "
            "so nothing in this chapter has been timed on one. The CUDA kernels have run only on numba's CUDA "
            "simulator (`numba_cuda`, for correctness) and been compiled with nvcc (`cupy`).")


def latest(results_dir: Path = RESULTS) -> tuple[Path, dict] | None:
    """(path, record) of the newest GPU check recorded in `results_dir`, or None when there is none."""
    found = []
    for path in sorted(Path(results_dir).glob("gpu_check_*.json")):
        record = read_json(path)
        if record.get("gpu_check") != "gpu":
            continue                                  # a dry run copied here by mistake: not a GPU result
        date = ((record.get("machine") or {}).get("provenance") or {}).get("date_utc") or ""
        found.append((date, path, record))
    if not found:
        return None
    _, path, record = max(found, key=lambda item: item[0])
    return path, record


def _ms(value) -> str:
    return "—" if value is None else f"{value * 1e3:.3g}"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(path: Path, record: dict, ops: list[str]) -> str:
    """The record's rows for `ops`, with where and when it was measured, as Markdown."""
    provenance = (record.get("machine") or {}).get("provenance") or {}
    gpu = provenance.get("gpu") or {}
    versions = provenance.get("versions") or {}
    lines = [f"**On a GPU:** measured by `make gpu-check` on {gpu.get('name', 'an unnamed GPU')} "
             f"(driver {gpu.get('driver', '?')}, CUDA {gpu.get('cuda_runtime', '?')}, torch {versions.get('torch', '?')}) "
             f"on {provenance.get('date_utc', 'an unrecorded date')}; record `{path.name}`."]
    kernels = ((record.get("steps") or {}).get("kernels") or {}).get("result") or {}
    verdicts = [f"{backend} {size}: {v['comparisons'] - len(v['failed'])}/{v['comparisons']} checks passed"
                for backend, sizes in kernels.items() if isinstance(sizes, dict)
                for size, v in sizes.items() if isinstance(v, dict) and "comparisons" in v]
    if verdicts:
        lines.append("Kernel check, every op: " + "; ".join(verdicts) + ".")
    rows = []
    benchmarks = ((record.get("steps") or {}).get("benchmarks") or {}).get("result") or {}
    for results in benchmarks.values():
        for result in results:
            if result.get("op") not in ops:
                continue
            for name, variant in result.get("variants", {}).items():
                timing = (variant.get("timing") or {}).get("median_s")
                cells = ([_ms(timing), _ratio(variant.get("speedup_vs_reference")),
                          _ratio(variant.get("speedup_vs_torch_compile"))] if timing is not None
                         else ["failed its gate" if name in result.get("failed", []) else "not timed", "—", "—"])
                rows.append(f"| {result.get('label', result['op'])} | {name} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "| case | variant | median (ms) | vs reference | vs torch.compile |", "|---|---|---|---|---|", *rows]
    else:
        lines.append(f"The record has no benchmark of {', '.join(ops)}.")
    return "\n".join(lines)


def report(ops: list[str], results_dir: Path = RESULTS) -> str:
    """Display the latest GPU table for `ops` (or say that none exists yet); return the Markdown."""
    found = latest(results_dir)
    text = NONE_YET if found is None else markdown(*found, ops)
    display_markdown(text)
    return text
