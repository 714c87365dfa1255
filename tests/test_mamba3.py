"""The Mamba-3 layer: carried state, causality, gradients. (The scan op's own tests, reduction to S6, the rotating
state, the trapezoid: tests/ops/test_mamba3_scan.py.)"""

from __future__ import annotations

import pytest
import torch

from kernels.check import assert_close, parameters_without_gradient
from refimpl.mamba3 import Mamba3Layer, Mamba3State


@pytest.mark.parametrize("rank", [1, 3], ids=["SISO", "MIMO-R3"])
def test_layer_carries_state_and_is_causal(rank):
    torch.manual_seed(0)
    layer = Mamba3Layer(12, d_state=8, head_dim=6, mimo_rank=rank).double()
    u = torch.randn(2, 17, 12, dtype=torch.float64)
    full = layer(u)
    state = Mamba3State()
    pieces = [layer(u[:, a:b], state) for a, b in [(0, 5), (5, 6), (6, 17)]]
    assert_close(torch.cat(pieces, dim=1), full, "in pieces vs one call")
    u2 = u.clone()
    u2[:, 9] += 1.0
    assert_close(layer(u2)[:, :9], full[:, :9], "outputs before the change")


@pytest.mark.parametrize("rank", [1, 4], ids=["SISO", "MIMO-R4"])
def test_gradients_reach_every_parameter(rank):
    torch.manual_seed(0)
    layer = Mamba3Layer(16, d_state=8, head_dim=8, mimo_rank=rank).double()
    layer(torch.randn(2, 9, 16, dtype=torch.float64)).square().mean().backward()
    assert parameters_without_gradient(layer) == []
