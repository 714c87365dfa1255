"""The kernel lesson's one call: check every backend of some ops, show the table, swap the kernels into a model,
show which ran and whether its output stayed the same.

    report = book.check_and_swap(["gated_delta_rule"], run=lambda: model(idx)[0], label="superblock logits",
                                 swap_ops=["rms_norm", "attention", "gated_delta_rule"])
    report.passed          # every check passed, every swapped op ran, the output matched

Step 1 runs the book's one check (`kernels.check.check_backend`: poisoned outputs, a float64 reference) for every
backend this machine can run, at `size` (`tiny` for numba's CUDA simulator). Step 2 calls `run()` twice under
torch.no_grad(), with the reference ops and inside `kernels.use(backend, ops=swap_ops)`, and compares the two
outputs; the swap's call counts say which kernels ran. Anything that fails raises AssertionError saying what.

Does not include: timing (the benchmarks and each chapter's timing cell do that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import kernels
from book.show import display_markdown
from kernels.check import Comparison, check_backend, compare
from kernels.machine import device_for


@dataclass
class KernelReport:
    """What check_and_swap found: the check table's rows, the swap (which ops ran) and the output comparison."""
    rows: list[tuple[str, str, str, bool, float]] = field(default_factory=list)   # backend, size, output, passed, rel L2
    swap: kernels.registry.Swap | None = None
    comparison: Comparison | None = None

    @property
    def checks_passed(self) -> bool:
        return all(row[3] for row in self.rows)

    @property
    def passed(self) -> bool:
        """Every check passed, and (if a model was swapped) every swapped op ran and the output matched."""
        swapped_ok = self.swap is None or (not self.swap.never_called() and self.comparison.passed)
        return self.checks_passed and swapped_ok

    def markdown(self) -> str:
        """The check table, as Markdown."""
        return ("| backend | size | output | verdict | rel L2 err |\n|---|---|---|---|---|\n"
                + "\n".join(f"| {b} | {s} | {name} | {'pass' if ok else '**FAIL**'} | {err:.1e} |"
                            for b, s, name, ok, err in self.rows))


def _first_tensor(value) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"check_and_swap: run() must return a tensor (or a tuple starting with one), got "
                        f"{type(value).__name__}")
    return value


def check_and_swap(ops: list[str] | tuple[str, ...], run: Callable[[], object] | None = None, *,
                   swap_ops: list[str] | tuple[str, ...] | None = None, backend: str = "numba", size: str = "small",
                   label: str = "output", show: bool = True) -> KernelReport:
    """Check `ops` on every runnable backend; then, given `run`, compare its output with `swap_ops` (default `ops`)
    swapped in from `backend`. Displays the table and the swap's summary; raises AssertionError on any failure."""
    report = KernelReport()
    for name in [b for b in kernels.runnable_backends() if b != "reference"]:
        here = "tiny" if (name == "numba_cuda" and kernels.cuda_simulator_enabled()) else size
        for result in check_backend(name, here, device=device_for(name), ops=ops):
            report.rows.append((name, here, result.name, result.passed, result.rel_l2_error))
    if show:
        display_markdown(report.markdown())
    if run is not None:
        with torch.no_grad():
            expected = _first_tensor(run())
            with kernels.use(backend, ops=list(swap_ops or ops)) as swapped:
                got = _first_tensor(run())
        report.swap = swapped
        report.comparison = compare(got, expected, f"{label} with {backend} kernels")
        if show:
            print(f"{swapped.summary()}\n{report.comparison.message}")
    problems = [f"{b} {s} {n} failed its check" for b, s, n, ok, _ in report.rows if not ok]
    if report.swap is not None:
        problems += [f"{op} was swapped in but never ran" for op in report.swap.never_called()]
        if not report.comparison.passed:
            problems.append(report.comparison.message)
    if problems:
        raise AssertionError("; ".join(problems))
    return report
