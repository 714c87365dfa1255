"""book.check_and_swap, the kernel lesson's one call: a table of checks, a swap that must reach the model, an
output that must not change; each failure raises, saying what."""

from __future__ import annotations

import pytest
import torch

from book.swap import check_and_swap
from kernels.registry import get, replaced
from refimpl.baseline import BaselineConfig, BaselineLM


def _model_and_idx():
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)).eval()
    return model, torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_checks_swaps_and_reports_which_kernels_ran(capsys):
    model, idx = _model_and_idx()
    report = check_and_swap(["rms_norm", "attention"], run=lambda: model(idx), size="tiny", label="logits")
    assert report.passed and report.checks_passed and report.comparison.passed
    assert report.swap.calls["rms_norm"] > 0 and report.swap.calls["attention"] > 0
    assert {row[0] for row in report.rows} >= {"numba"}
    out = capsys.readouterr().out
    assert "| backend | size | output | verdict |" in out and "numba kernels that ran: rms_norm x" in out


def test_a_swap_the_model_never_reaches_fails():
    model, idx = _model_and_idx()
    with pytest.raises(AssertionError, match="vq_nearest was swapped in but never ran"):
        check_and_swap(["rms_norm"], run=lambda: model(idx), swap_ops=["rms_norm", "vq_nearest"], size="tiny",
                       show=False)


def test_a_wrong_kernel_fails_its_check_and_changes_the_output():
    model, idx = _model_and_idx()
    right = get("rms_norm", "numba")
    with replaced("rms_norm", "numba", lambda x, weight, eps=1e-6: right(x, weight, eps) * 1.5):
        with pytest.raises(AssertionError, match=r"numba tiny rms_norm.* failed its check.*logits with numba kernels"):
            check_and_swap(["rms_norm"], run=lambda: model(idx), size="tiny", label="logits", show=False)


def test_run_must_return_a_tensor():
    with pytest.raises(TypeError, match="run\\(\\) must return a tensor"):
        check_and_swap(["rms_norm"], run=lambda: "logits", size="tiny", show=False)
