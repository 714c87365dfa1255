"""The selective scan (S6): the chunked form against the step loop, carried state, and the Mamba layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.check import assert_close, random_tensor
from refimpl.ssm import MambaLayer, MambaState
from refimpl.ops import selective_scan_chunked, selective_scan_recurrent


def _inputs(B=2, T=37, Dm=5, N=4, seed=0, big_steps=False):
    g = torch.Generator().manual_seed(seed)
    u = random_tensor((B, T, Dm), torch.float64, generator=g)
    delta = F.softplus(random_tensor((B, T, Dm), torch.float64, generator=g) + (4.0 if big_steps else 0.0))
    A = -3 * torch.rand(Dm, N, generator=g, dtype=torch.float64)
    Bm, Cm = random_tensor((B, T, N), torch.float64, generator=g), random_tensor((B, T, N), torch.float64, generator=g)
    D = random_tensor((Dm,), torch.float64, generator=g)
    h0 = random_tensor((B, Dm, N), torch.float64, generator=g)
    return u, delta, A, Bm, Cm, D, h0


@pytest.mark.parametrize("chunk_size", [1, 8, 32, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("big_steps", [False, True], ids=["small-steps", "large-steps-forget-fast"])
def test_chunked_scan_equals_step_loop(chunk_size, big_steps):
    args = _inputs(big_steps=big_steps)
    y_ref, h_ref = selective_scan_recurrent(*args)
    y, h = selective_scan_chunked(*args, chunk_size=chunk_size)
    assert_close(y, y_ref, "outputs")
    assert_close(h, h_ref, "final state")


def test_carried_state_equals_one_shot():
    u, delta, A, Bm, Cm, D, h0 = _inputs()
    y, h = selective_scan_recurrent(u, delta, A, Bm, Cm, D, h0)
    y1, h1 = selective_scan_chunked(u[:, :20], delta[:, :20], A, Bm[:, :20], Cm[:, :20], D, h0)
    y2, h2 = selective_scan_chunked(u[:, 20:], delta[:, 20:], A, Bm[:, 20:], Cm[:, 20:], D, h1)
    assert_close(torch.cat([y1, y2], dim=1), y, "outputs, split at 20")
    assert_close(h2, h, "final state, split at 20")


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


def test_bad_arguments_are_value_errors():
    u, delta, A, Bm, Cm, D, h0 = _inputs()
    with pytest.raises(ValueError, match=r"A must be \[Dm, N\]"):
        selective_scan_recurrent(u, delta, A.T, Bm, Cm)
    with pytest.raises(ValueError, match=r"Cm must be \[B, T, N\]"):
        selective_scan_chunked(u, delta, A, Bm, Cm[:, :3])
    with pytest.raises(ValueError, match=r"initial_state must be \[B, Dm, N\]"):
        selective_scan_chunked(u, delta, A, Bm, Cm, D, h0[:1])
