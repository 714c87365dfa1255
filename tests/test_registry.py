"""The registry: lookups that explain themselves, and `use` swapping a model's ops for one block."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.check import assert_close
from refimpl import ops
from refimpl.baseline import BaselineConfig, BaselineLM


def test_every_op_has_every_backend():
    table = kernels.registered()
    assert {"rms_norm", "attention", "moe_dispatch", "moe_combine", "gated_delta_rule", "selective_scan", "mlstm",
            "fast_weight_memory", "ties_merge"} <= set(table)
    for op, backends in table.items():
        assert backends == list(kernels.BACKENDS), op


def test_missing_pair_lists_what_exists():
    with pytest.raises(kernels.KernelNotFound) as err:
        kernels.get("slstm", "numba")
    assert "no kernel for op 'slstm' on backend 'numba'" in str(err.value)
    assert "rms_norm: reference, numba, numba_cuda, cupy" in str(err.value)
    with pytest.raises(ValueError, match="unknown backend"):
        with kernels.use("triton"):
            pass


def test_use_swaps_and_restores():
    original = ops.rms_norm
    with kernels.use("numba") as swapped:
        assert set(swapped) == set(kernels.registered())          # every op has a numba kernel
        assert ops.rms_norm.__wrapped__ is kernels.get("rms_norm", "numba")   # the kernel, behind a call counter
    assert ops.rms_norm is original
    with pytest.raises(RuntimeError):
        with kernels.use("numba", ops=["rms_norm"]):
            assert ops.rms_norm.__wrapped__ is kernels.get("rms_norm", "numba")
            assert ops.attention is kernels.get("attention", "reference")
            raise RuntimeError("restored even when the block fails")
    assert ops.rms_norm is original


def test_use_refuses_a_backend_this_machine_cannot_run():
    if kernels.has_cuda_gpu():
        pytest.skip("this machine has a GPU, so cupy can run")
    with pytest.raises(RuntimeError, match="cannot run on this machine"):
        with kernels.use("cupy"):
            pass


@pytest.mark.parametrize("n_experts", [0, 4], ids=["dense", "moe"])
def test_model_under_numba_kernels_matches_the_reference(n_experts):
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig.preset("tiny", n_experts=n_experts, window=16)).eval()
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        expected, _ = model(idx)
        with kernels.use("numba"):
            got, _ = model(idx)
    assert_close(got, expected, "BaselineLM logits, numba vs reference")


def test_use_counts_each_kernels_calls_and_names_the_ones_never_called():
    torch.manual_seed(0)
    model = BaselineLM(BaselineConfig.preset("tiny", n_experts=0, window=16)).eval()      # dense: no MoE
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), kernels.use("numba", ops=["rms_norm", "attention", "moe_dispatch"]) as swapped:
        model(idx)
        model(idx)
    n_layers = model.cfg.n_layers
    assert swapped.calls["attention"] == 2 * n_layers                    # one per layer per forward
    assert swapped.calls["rms_norm"] >= 2 * (2 * n_layers + 1)           # two per layer and the final norm
    assert swapped.never_called() == ["moe_dispatch"]
    assert swapped.summary().endswith("swapped in but never called: moe_dispatch")
    assert swapped == ["rms_norm", "attention", "moe_dispatch"]          # still the list of names
