"""The Mamba layer: carried state and causality. (The selective scan op's own tests: tests/ops/test_selective_scan.py.)"""

from __future__ import annotations

import torch

from kernels.check import assert_close
from refimpl.ssm import MambaLayer, MambaState


def test_mamba_layer_carries_state_and_is_causal():
    torch.manual_seed(0)
    layer = MambaLayer(16, d_state=4).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    full = layer(x)
    state = MambaState()
    pieces = [layer(x[:, a:b], state) for a, b in [(0, 5), (5, 6), (6, 21)]]
    assert_close(torch.cat(pieces, dim=1), full, "in pieces vs one call")
    x2 = x.clone()
    x2[:, 9] += 1.0
    assert_close(layer(x2)[:, :9], full[:, :9], "outputs before the change")
