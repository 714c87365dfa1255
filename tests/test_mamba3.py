"""The Mamba-3 scan and layer: reduction to S6, carried state, the rotating state, the trapezoid, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.check import assert_close, parameters_without_gradient, random_tensor
from refimpl.mamba3 import Mamba3Layer, Mamba3State
from refimpl.ops import Mamba3ScanState, mamba3_scan, mamba3_scan_parallel, mamba3_scan_recurrent
from refimpl.ops import selective_scan_recurrent


def _inputs(B=2, T=19, H=3, R=2, P=4, N=6, K=3, seed=0):
    """Random fp64 scan inputs: x, dt, A, Bm, Cm, theta, trap, D."""
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((B, T, H, R, P), torch.float64, generator=g)
    dt = F.softplus(random_tensor((B, T, H), torch.float64, generator=g))
    A = -2 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    Bm = random_tensor((B, T, H, R, N), torch.float64, generator=g)
    Cm = random_tensor((B, T, H, R, N), torch.float64, generator=g)
    theta = math.pi * torch.tanh(random_tensor((B, T, H, K), torch.float64, generator=g))
    trap = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    D = random_tensor((H,), torch.float64, generator=g)
    return x, dt, A, Bm, Cm, theta, trap, D


@pytest.mark.parametrize("euler", ["trap-None", "trap-ones"])
def test_reduces_to_the_s6_scan(euler):
    """R = 1, no rotation, lambda = 1, one head per S6 channel (P = 1), S6 rates constant along N."""
    B, T, Dm, N = 2, 23, 5, 4
    g = torch.Generator().manual_seed(1)
    u = random_tensor((B, T, Dm), torch.float64, generator=g)
    delta = F.softplus(random_tensor((B, T, Dm), torch.float64, generator=g))
    a = -3 * torch.rand(Dm, generator=g, dtype=torch.float64)
    A_s6 = a[:, None].expand(Dm, N).contiguous()                              # [Dm, N], rows constant
    Bm, Cm = (random_tensor((B, T, N), torch.float64, generator=g) for _ in range(2))
    D = random_tensor((Dm,), torch.float64, generator=g)
    h0 = random_tensor((B, Dm, N), torch.float64, generator=g)
    y_s6, h_s6 = selective_scan_recurrent(u, delta, A_s6, Bm, Cm, D, h0)

    trap = None if euler == "trap-None" else torch.ones(B, T, Dm, dtype=torch.float64)
    theta = torch.zeros(B, T, Dm, N // 2, dtype=torch.float64)               # zero angles: no turning
    y, state = mamba3_scan_recurrent(
        u[..., None, None],                                                   # x  [B, T, H=Dm, R=1, P=1]
        delta,                                                                # dt [B, T, H]
        a.expand(B, T, Dm),                                                   # A  [B, T, H]
        Bm[:, :, None, None, :].expand(B, T, Dm, 1, N),                       # Bm [B, T, H, 1, N], shared by heads
        Cm[:, :, None, None, :].expand(B, T, Dm, 1, N),
        theta, trap, D, Mamba3ScanState(h0[:, :, None, :]))                   # h  [B, H, P=1, N]
    assert_close(y[:, :, :, 0, 0], y_s6, "outputs", atol=1e-10, rtol=0.0)
    assert_close(state.h[:, :, 0, :], h_s6, "final state", atol=1e-10, rtol=0.0)


@pytest.mark.parametrize("rotate", [True, False], ids=["rotating", "real"])
def test_carried_state_equals_one_run(rotate):
    x, dt, A, Bm, Cm, theta, trap, D = _inputs()
    theta = theta if rotate else None
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap, D)
    s = 8
    first = [t[:, :s] if t is not None else None for t in (x, dt, A, Bm, Cm, theta, trap)]
    second = [t[:, s:] if t is not None else None for t in (x, dt, A, Bm, Cm, theta, trap)]
    y1, state1 = mamba3_scan_recurrent(*first, D=D)
    y2, state2 = mamba3_scan_recurrent(*second, D=D, initial_state=state1)
    assert_close(torch.cat([y1, y2], dim=1), y, "outputs, split at 8")
    for name in Mamba3ScanState._fields:
        if getattr(state, name) is not None:
            assert_close(getattr(state2, name), getattr(state, name), f"carried {name}")
    # Without the carried previous input (trapezoid) or angle (rotation), the second half is wrong:
    y2_no_prev, _ = mamba3_scan_recurrent(*second, D=D, initial_state=Mamba3ScanState(state1.h, state1.angle))
    assert not torch.allclose(y2_no_prev, y2)
    if rotate:
        y2_no_angle, _ = mamba3_scan_recurrent(*second, D=D, initial_state=state1._replace(angle=None))
        assert not torch.allclose(y2_no_angle, y2)


@pytest.mark.parametrize("form", [mamba3_scan_parallel, mamba3_scan], ids=["parallel", "chunked"])
@pytest.mark.parametrize("variant", ["full", "euler-real", "fresh-start"])
def test_matrix_forms_equal_the_step_loop(form, variant):
    """The masked-matrix form (whole call, and on chunks of 64 carrying the state) equals the step loop."""
    x, dt, A, Bm, Cm, theta, trap, D = _inputs(T=150, seed=3)
    g = torch.Generator().manual_seed(4)
    start = Mamba3ScanState(random_tensor((2, 3, 4, 6), torch.float64, generator=g),
                            2 * math.pi * torch.rand(2, 3, 3, generator=g, dtype=torch.float64),
                            random_tensor((2, 3, 2, 6), torch.float64, generator=g),
                            random_tensor((2, 3, 2, 4), torch.float64, generator=g))
    args = {"full": (x, dt, A, Bm, Cm, theta, trap, D, start),
            "euler-real": (x, dt, A, Bm, Cm, None, None, None, start._replace(angle=None)),
            "fresh-start": (x, dt, A, Bm, Cm, theta, trap, D, None)}[variant]
    y_loop, state_loop = mamba3_scan_recurrent(*args)
    y, state = form(*args)
    assert_close(y, y_loop, f"{variant}: y")
    for name in Mamba3ScanState._fields:
        if getattr(state_loop, name) is None:
            assert getattr(state, name) is None
        else:
            assert_close(getattr(state, name), getattr(state_loop, name), f"{variant}: {name}")


def test_matrix_form_gradients_equal_the_step_loop():
    x, dt, A, Bm, Cm, theta, trap, D = (t.requires_grad_() for t in _inputs(T=21, seed=5))
    grads = []
    for form in (mamba3_scan_recurrent, mamba3_scan_parallel):
        y, state = form(x, dt, A, Bm, Cm, theta, trap, D)
        (y.sin().sum() + state.h.square().sum()).backward()
        grads.append([t.grad.clone() for t in (x, dt, A, Bm, Cm, theta, trap, D)])
        for t in (x, dt, A, Bm, Cm, theta, trap, D):
            t.grad = None
    for name, g_loop, g_matrix in zip("x dt A B C theta trap D".split(), *grads):
        assert_close(g_matrix, g_loop, f"d/d{name}")


def test_rotations_equal_a_complex_valued_state():
    """The scan (rotation moved onto B and C) equals the explicit complex recurrence
    g_t = e^{-i dt theta} (alpha g_{t-1} + beta B_{t-1} x_{t-1}) + gamma B_t x_t,  y_t = Re<C_t, g_t>,
    with pair k of the state as the complex number g_2k + i g_2k+1 and B, C never rotated."""
    x, dt, A, Bm, Cm, theta, trap, D = _inputs(N=6, K=3)
    y, _ = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap)
    Bc = torch.view_as_complex(Bm.unflatten(-1, (3, 2)))                     # [B, T, H, R, K] pairs as complex numbers
    Cc = torch.view_as_complex(Cm.unflatten(-1, (3, 2)))
    xc = x.to(torch.complex128)
    g = torch.zeros(2, 3, 4, 3, dtype=torch.complex128)                        # [B, H, P, K]
    prev = torch.zeros_like(g)
    ys = []
    for t in range(x.shape[1]):
        alpha = torch.exp(dt[:, t] * A[:, t])[..., None, None]                 # [B, H, 1, 1]
        beta = ((1 - trap[:, t]) * dt[:, t])[..., None, None] * alpha
        gamma = (trap[:, t] * dt[:, t])[..., None, None]
        turn = torch.exp(-1j * dt[:, t, :, None] * theta[:, t])[:, :, None, :]  # [B, H, 1, K]
        now = torch.einsum("bhrp,bhrk->bhpk", xc[:, t], Bc[:, t])
        g = turn * (alpha * g + beta * prev) + gamma * now
        ys.append(torch.einsum("bhpk,bhrk->bhrp", g, Cc[:, t].conj()).real)   # sum_k Re(conj(C_k) g_k)
        prev = now
    assert_close(y, torch.stack(ys, dim=1), "scan vs complex state")


def test_rotation_turns_the_state_without_changing_its_norm():
    """A = 0 and no input after t0: the un-rotated state g only turns, pair k by -dt_t theta_t[k] each step.

    With R = N ranks and C_t,r = e_r, the outputs read the whole un-rotated state: y_t[r, p] = g_t[p, r]."""
    B, T, H, P, N, t0 = 1, 12, 2, 3, 4, 4
    x, dt, A, Bm, Cm, theta, trap, D = _inputs(B=B, T=T, H=H, R=N, P=P, N=N, K=N // 2, seed=3)
    x[:, t0 + 1:] = 0.0                                                       # nothing written after t0
    A = torch.zeros_like(A)                                                   # nothing forgotten
    Cm = torch.eye(N, dtype=torch.float64).expand(B, T, H, N, N)               # C_t,r = e_r
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap)
    g = y.transpose(-1, -2)                                                   # [B, T, H, P, N] the un-rotated state
    settled = range(t0 + 2, T)                                                # t0 + 1 still adds x_t0 (trapezoid)
    norm = g[:, t0 + 1].norm(dim=(-1, -2))                                    # [B, H]
    for t in settled:
        assert_close(g[:, t].norm(dim=(-1, -2)), norm, f"state norm at t={t}")
        assert (g[:, t] - g[:, t - 1]).abs().max() > 1e-3                     # but it does turn
        gc_now, gc_before = (torch.view_as_complex(g[:, s].unflatten(-1, (N // 2, 2)).contiguous()) for s in (t, t - 1))
        turn = torch.exp(-1j * dt[:, t, :, None, None] * theta[:, t, :, None, :])  # [B, H, 1, K]
        assert_close(torch.view_as_real(gc_now), torch.view_as_real(turn * gc_before), f"turn at t={t}")


def test_trapezoid_by_hand():
    """One head, P = N = R = 1, no rotation: A = -ln 2 and dt = 1 give alpha = 1/2; lambda = 1/2 gives
    beta = (1 - 1/2) * 1 * 1/2 = 1/4 and gamma = 1/2.  B = (1, 2, 3), x = (2, 4, 0), C = (1, 1, 2):
        h_0 = 1/2 * 0 + 1/4 * 0       + 1/2 * (1 * 2) = 1
        h_1 = 1/2 * 1 + 1/4 * (1 * 2) + 1/2 * (2 * 4) = 5
        h_2 = 1/2 * 5 + 1/4 * (2 * 4) + 1/2 * (3 * 0) = 4.5       (the previous term is B_1 x_1, not B_2 x_1)
        y   = C h = (1, 5, 9)"""
    def seq(*v):
        return torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1, 1)
    x, Bm, Cm = seq(2, 4, 0), seq(1, 2, 3), seq(1, 1, 2)
    dt = torch.ones(1, 3, 1, dtype=torch.float64)
    A = torch.full((1, 3, 1), -math.log(2), dtype=torch.float64)
    trap = torch.full((1, 3, 1), 0.5, dtype=torch.float64)
    y, state = mamba3_scan_recurrent(x, dt, A, Bm, Cm, trap=trap)
    assert_close(y.flatten(), torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64), "y")
    assert_close(state.h.flatten(), torch.tensor([4.5], dtype=torch.float64), "h_2")


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


def test_bad_arguments_are_value_errors():
    x, dt, A, Bm, Cm, theta, trap, D = _inputs()
    with pytest.raises(ValueError, match=r"x must be \[B, T, H, R, P\]"):
        mamba3_scan_recurrent(x[..., 0], dt, A, Bm, Cm)
    with pytest.raises(ValueError, match=r"A must be \[B, T, H\]"):
        mamba3_scan_recurrent(x, dt, A[0], Bm, Cm)
    with pytest.raises(ValueError, match=r"Cm must be \[B, T, H, R, N\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm[..., :1, :])
    with pytest.raises(ValueError, match=r"theta must be \[B, T, H, K\].*N/2 = 3"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, torch.cat([theta, theta], dim=-1))
    with pytest.raises(ValueError, match=r"trap must be \[B, T, H\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap[:, :3])
    with pytest.raises(ValueError, match=r"D must be \[H\]"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta, trap, D[:1])
    with pytest.raises(ValueError, match=r"initial_state.h must be \[B, H, P, N\]"):
        h_wrong = torch.zeros(2, 3, 6, 4, dtype=torch.float64)               # [B, H, N, P]: transposed
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, initial_state=Mamba3ScanState(h_wrong))
    with pytest.raises(ValueError, match=r"initial_state must be a Mamba3ScanState"):
        mamba3_scan_recurrent(x, dt, A, Bm, Cm, initial_state=torch.zeros(2, 3, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"head_dim 5 must divide"):
        Mamba3Layer(12, head_dim=5)
