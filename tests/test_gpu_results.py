"""book.gpu_results: a chapter shows the newest real-GPU record for its ops, with where and when it was measured,
and says plainly when there is none; a dry run is never shown as a GPU result."""

from __future__ import annotations

import json

from book import gpu_results


def record(date: str, gpu: str, kind: str = "gpu") -> dict:
    return {"gpu_check": kind,
            "machine": {"provenance": {"date_utc": date, "gpu": {"name": gpu, "driver": "999.1", "cuda_runtime": "12.9"},
                                       "versions": {"torch": "2.13.0"}}},
            "steps": {"kernels": {"result": {"cupy": {"tiny": {"comparisons": 40, "failed": []},
                                                      "large": {"comparisons": 40, "failed": [{"name": "x"}]}}}},
                      "benchmarks": {"result": {"shared_blocks": [
                          {"op": "attention", "label": "attention (causal GQA)", "failed": ["numba_cuda"],
                           "variants": {"reference": {"timing": {"median_s": 2e-3}, "speedup_vs_reference": 1.0,
                                                      "speedup_vs_torch_compile": 0.5},
                                        "cupy": {"timing": {"median_s": 5e-4}, "speedup_vs_reference": 4.0,
                                                 "speedup_vs_torch_compile": 2.0},
                                        "numba_cuda": {"timing": None}}},
                          {"op": "rms_norm", "label": "rms_norm", "failed": [], "variants": {}}]}}}}


def test_no_record_says_so_plainly(tmp_path):
    assert gpu_results.report(["attention"], tmp_path) == gpu_results.NONE_YET
    (tmp_path / "gpu_check_dry.json").write_text(json.dumps(record("2027-01-01T00:00:00+00:00", "sim", "dry run")))
    assert gpu_results.latest(tmp_path) is None


def test_the_newest_record_is_shown_for_the_chapters_ops(tmp_path):
    (tmp_path / "gpu_check_a100.json").write_text(json.dumps(record("2026-01-01T00:00:00+00:00", "A100")))
    (tmp_path / "gpu_check_h100.json").write_text(json.dumps(record("2026-12-01T00:00:00+00:00", "H100")))
    text = gpu_results.report(["attention"], tmp_path)
    assert "on H100 (driver 999.1, CUDA 12.9, torch 2.13.0) on 2026-12-01" in text and "gpu_check_h100.json" in text
    assert "cupy tiny: 40/40 checks passed; cupy large: 39/40 checks passed" in text
    assert "| attention (causal GQA) | cupy | 0.5 | 4.00× | 2.00× |" in text
    assert "| attention (causal GQA) | numba_cuda | failed its gate | — | — |" in text
    assert "rms_norm" not in text.split("| case |")[1]          # only the ops asked for
    assert "has no benchmark of moe_dispatch" in gpu_results.report(["moe_dispatch"], tmp_path)
