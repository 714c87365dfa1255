"""`make gpu-check`, rehearsed: the dry run (numba's CUDA simulator, tiny sizes) passes end to end, a wrong
kernel makes it exit 1, and a size limit the `large` GPU inputs would hit is found on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from book import gpu_check
from kernels.registry import get, replaced

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_every_step(tmp_path):
    done = subprocess.run([sys.executable, "-m", "book.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "dry_run.json").read_text())
    assert set(record["steps"]) == set(gpu_check.STEPS)
    assert all(not step["failures"] for step in record["steps"].values())
    tiny = record["steps"]["kernels"]["result"]["numba_cuda"]["tiny"]
    assert tiny["comparisons"] >= 50 and not tiny["failed"]
    benchmarks = record["steps"]["benchmarks"]["result"]
    assert set(benchmarks) == set(gpu_check.BENCHMARK_SCRIPTS) and all(benchmarks.values())
    assert "all steps passed" in done.stdout


def test_a_wrong_kernel_fails_the_check(tmp_path):
    right = get("rms_norm", "numba_cuda")

    def wrong(x, weight, eps=1e-6):
        return right(x, weight, eps) * 1.01
    with replaced("rms_norm", "numba_cuda", wrong):
        code = gpu_check.main(["--dry-run", "--steps", "kernels", "--ops", "rms_norm", "--out", str(tmp_path)])
    assert code == 1
    record = json.loads((tmp_path / "dry_run.json").read_text())
    assert any("rms_norm" in f for f in record["steps"]["kernels"]["failures"])


def test_a_size_limit_of_the_large_inputs_is_found_without_a_gpu(monkeypatch):
    import kernels.mlstm
    assert gpu_check._accepts_large_inputs("numba_cuda", ["mlstm"]) == []
    monkeypatch.setattr(kernels.mlstm, "MAX_HEAD_DIM", 16)          # as if the kernel held less per thread
    refused = gpu_check._accepts_large_inputs("numba_cuda", ["mlstm"])
    assert refused and all("mlstm" in r and "(large)" in r for r in refused)


def test_without_a_gpu_the_real_check_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check runs")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
