"""The MoE dispatch and combine kernels against `refimpl.ops.moe_dispatch` / `moe_combine`: experts with no
tokens, k = 1 and 3, int32 indices, and bad indices. Outputs are poisoned with NaN (floats) or -1
(indices) before a kernel writes them; numba_cuda runs on numba's CUDA simulator when there is no GPU
(the biggest cases then skip with a reason), cupy cases skip without a GPU. The check every kernel
passes (tests/test_every_kernel.py) runs beside these. The last part tests the reference ops
themselves: combine(dispatch(x)) is the identity.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.check import assert_close, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, seeded, skip_unless_runnable
from refimpl import ops


# id -> (N, C, E, k, experts actually used)
MOE_CASES = {
    "N7-C12-E3-k2": (7, 12, 3, 2, 3),
    "N5-C60-E1-k1": (5, 60, 1, 1, 1),
    "N33-C20-E8-k3": (33, 20, 8, 3, 8),
    "N17-C9-E6-k2-two-experts-idle": (17, 9, 6, 2, 4),
}


def _moe_inputs(case, dtype, device, seed=5):
    N, C, E, k, used = case
    g = seeded(seed)
    x = random_tensor((N, C), dtype, device, g)
    index = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(N)]).to(device)  # [N, k]
    weight = torch.rand(N, k, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    expert_out = random_tensor((N * k, C), dtype, device, g)
    return x, index, E, weight, expert_out


@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_moe_dispatch_and_combine_kernels_vs_reference(backend, case, dtype):
    skip_unless_runnable(backend)
    x, index, E, weight, expert_out = _moe_inputs(case, dtype, device_for(backend))
    if dtype == torch.float64:
        index = index.to(torch.int32)          # the kernels take int32 indices too
    ref_sorted, ref_offsets, ref_slot = kernels.get("moe_dispatch", "reference")(x, index, E)
    with poisoned_outputs():
        got_sorted, got_offsets, got_slot = kernels.get("moe_dispatch", backend)(x, index, E)
    assert_close(got_offsets, ref_offsets, "offsets")
    assert_close(got_slot, ref_slot, "slot")
    assert_close(got_sorted, ref_sorted, "x_sorted")
    expected = kernels.get("moe_combine", "reference")(expert_out, ref_slot, weight)
    with poisoned_outputs():
        got = kernels.get("moe_combine", backend)(expert_out, ref_slot, weight)
    assert_close(got, expected, f"moe_combine[{backend}]")


def test_moe_dispatch_bad_indices_are_value_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        kernels.get("moe_dispatch", "numba")(x, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        kernels.get("moe_dispatch", "numba")(x, torch.tensor([[0], [1]]), 3)


# ---------------------------------------------------------------- the reference op: dispatch and combine

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_moe_dispatch_combine_roundtrip_is_identity():
    g = _gen(8)
    x = random_tensor((9, 5), generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    x_sorted, offsets, slot = ops.moe_dispatch(x, index, 4)
    assert offsets.tolist() == [0] + torch.bincount(index.flatten(), minlength=4).cumsum(0).tolist()
    for e in range(4):  # each expert's rows hold exactly the tokens that chose it, in token order
        tokens = (index == e).any(dim=1).nonzero().flatten()
        assert_close(x_sorted[offsets[e]:offsets[e + 1]], x[tokens], f"expert {e}")
    assert_close(ops.moe_combine(x_sorted, slot, torch.full((9, 2), 0.5)), x, "combine(dispatch(x)) with weights 1/2")
