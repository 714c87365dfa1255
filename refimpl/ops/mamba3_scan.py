"""The Mamba-3 scan: a trapezoidal step, a rotating (complex) state, and MIMO.

Paper: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu 2026, "Mamba-3: Improved Sequence Modeling
using State Space Principles", arXiv:2603.15569 (section 3: the exponential-trapezoidal
discretisation, the complex-valued state as data-dependent rotations, and MIMO). Reference code:
state-spaces/mamba, `mamba_ssm/modules/mamba3.py`; its step-by-step test references
(`tests/ops/triton/test_mamba3_siso.py`, `tests/ops/tilelang/test_mamba3_mimo.py`) settle the
details below that the paper's equations leave to the code (where the bias, the rotation and the
angle's bound go). What each piece is for (the trapezoid, the rotations, MIMO) is told in `refimpl.mamba3`, the layer's file.

Per batch element and head, at step t (ranks r = 1..R; the state h is a [P, N] matrix):

    phi_t   = phi_{t-1} + dt_t theta_t                       rotation angles, one per pair of state dims
    B~_t,r  = Rot(phi_t) B_t,r,   C~_t,r = Rot(phi_t) C_t,r  pairs (2k, 2k+1) turned by phi_t[k]
    alpha_t = exp(dt_t A_t)                                  decay, A_t <= 0 a scalar per head
    h_t     = alpha_t h_{t-1}
            + (1 - lambda_t) dt_t alpha_t  sum_r x_{t-1,r} B~_{t-1,r}^T    the previous input (trapezoid)
            +      lambda_t  dt_t          sum_r x_{t,r}   B~_{t,r}^T      the current input
    y_t,r   = h_t C~_t,r + D x_t,r

Glossary (the reference code's letters, Bm/Cm as in refimpl/ssm.py)
    B  batch   T tokens   H heads   P head dim   N state size   R MIMO rank   K rotated pairs (K <= N/2)
    x       [B, T, H, R, P]  inputs, R channels per head (the layer makes them from one [P] vector)
    dt      [B, T, H]        step sizes, > 0
    A       [B, T, H]        rates, <= 0: a scalar per head and token (Mamba-3's A is data-dependent;
                             a constant one is A.expand(B, T, H))
    Bm, Cm  [B, T, H, R, N]  input and output maps, before rotation
    theta   [B, T, H, K]     angular velocities; pairs K..N/2 - 1 do not turn. None: a real state
    trap    [B, T, H]        lambda in [0, 1]. None: lambda = 1 (exponential-Euler, as Mamba-2)
    D       [H]              skip
    y       [B, T, H, R, P]  outputs, one per rank
    Mamba3ScanState, what a call carries to the next:
      h       [B, H, P, N]   the state (rotated frame)
      angle   [B, H, K]      phi of the last token, kept in [0, 2 pi)
      B_prev  [B, H, R, N]   the last token's B~, already rotated
      x_prev  [B, H, R, P]   the last token's x

Reduction to S6 (`refimpl.ops.selective_scan`): R = 1, theta None (or zeros), trap None
(or ones), one head per S6 channel with head dim P = 1, and an S6 A whose rows are constant,
A_s6[d, n] = a_d (Mamba-3, like Mamba-2, has one scalar rate per head where S6 has one per state
index). With Dm = H:
    x[b, t, d, 0, 0] = u[b, t, d]          dt[b, t, d] = delta[b, t, d]     A[b, t, d] = a_d
    Bm[b, t, d, 0, :] = B_s6[b, t, :]      Cm[b, t, d, 0, :] = C_s6[b, t, :]   D = D_s6
    h[b, d, 0, :] = h_s6[b, d, :]          and then y[b, t, d, 0, 0] = y_s6[b, t, d].

Two forms: `mamba3_scan_recurrent`, the step loop (the ground truth), and `mamba3_scan_parallel`, one
masked matrix product per chunk (what training runs; `mamba3_scan` is the op, on chunks of 64 tokens).

Shapes: x [B, T, H, R, P], dt, A [B, T, H], Bm, Cm [B, T, H, R, N], theta [B, T, H, K] or None,
trap [B, T, H] or None, D [H] or None -> (y [B, T, H, R, P], Mamba3ScanState).

Does not include: the layer (`refimpl.mamba3.Mamba3Layer`), kernels (kernels/mamba3_scan.py); several
groups of B and C (the layer projects one B and one C for all heads, plus a bias per head, as the
reference's default ngroups = 1 does); the
optional gated RMSNorm before the output projection (`is_outproj_norm`); variable-length batches;
the MIMO kernel's pairing of dim i with i + N/2 (a memory layout; we pair (2k, 2k+1) throughout,
as the reference's step functions do).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from refimpl.ops.contract import Contract


class Mamba3ScanState(NamedTuple):
    """What one scan call hands to the next. Any field may be None, which means zeros (a fresh start).

    angle is None when the scan has no rotation; B_prev and x_prev are None before the first token
    (the trapezoid's "previous input" term is then zero)."""
    h: torch.Tensor | None                   # [B, H, P, N] the state, in the rotated frame
    angle: torch.Tensor | None = None        # [B, H, K] the last token's phi, in [0, 2 pi)
    B_prev: torch.Tensor | None = None       # [B, H, R, N] the last token's rotated B
    x_prev: torch.Tensor | None = None       # [B, H, R, P] the last token's input


MAMBA3_SCAN = Contract("mamba3_scan", {
    "x": "B T H R P", "dt": "B T H", "A": "B T H", "Bm": "B T H R N", "Cm": "B T H R N", "theta": "B T H K?",
    "trap": "B T H?", "D": "H?", "initial_state.h": "B H P N?", "initial_state.angle": "B H K?",
    "initial_state.B_prev": "B H R N?", "initial_state.x_prev": "B H R P?"})


def check_mamba3_args(x, dt, A, Bm, Cm, theta, trap, D, initial_state):
    """Validate the scan's arguments; return (B, T, H, R, P, N, K), with K = 0 when theta is None."""
    if initial_state is not None and not isinstance(initial_state, Mamba3ScanState):
        raise ValueError(f"mamba3_scan: initial_state must be a Mamba3ScanState or None, "
                         f"got {type(initial_state).__name__}")
    state = initial_state if initial_state is not None else Mamba3ScanState(None)
    if (state.B_prev is None) != (state.x_prev is None):
        raise ValueError("mamba3_scan: initial_state.B_prev and x_prev must be given together (or both None)")
    sizes = MAMBA3_SCAN.check({
        "x": x, "dt": dt, "A": A, "Bm": Bm, "Cm": Cm, "theta": theta, "trap": trap, "D": D, "initial_state.h": state.h,
        "initial_state.angle": state.angle if theta is not None else None,   # no rotation: the angle passes through
        "initial_state.B_prev": state.B_prev, "initial_state.x_prev": state.x_prev})
    N, K = sizes[5], sizes[6]
    if theta is not None and not 1 <= K <= N // 2:
        raise ValueError(f"mamba3_scan: theta must be [B, T, H, K] with 1 <= K <= N/2 = {N // 2}, got {list(theta.shape)}")
    return sizes


def rotate_pairs(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn the pairs (v[..., 2k], v[..., 2k+1]) by angle[..., k] for k < K; dims 2K and on stay as they are.

    v: [..., N], angle: [..., K] (broadcast against v's leading dims) -> [..., N].
    As complex numbers v_2k + i v_2k+1, this multiplies pair k by e^{i angle_k}.
    """
    K = angle.shape[-1]
    pairs = v[..., :2 * K].unflatten(-1, (K, 2))                   # [..., K, 2]
    re, im = pairs[..., 0], pairs[..., 1]                           # [..., K] each
    cos, sin = angle.cos(), angle.sin()
    turned = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)  # [..., 2K]
    return torch.cat([turned, v[..., 2 * K:]], dim=-1)             # [..., N]


def mamba3_scan_recurrent(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None):
    """The step loop: the ground truth. Returns (y [B, T, H, R, P], Mamba3ScanState after the last token).

    Running the sequence in two calls, the second starting from the first's returned state, gives
    the same outputs and state as one call.
    """
    Bsz, T, H, R, P, N, K = check_mamba3_args(x, dt, A, Bm, Cm, theta, trap, D, initial_state)
    start = initial_state if initial_state is not None else Mamba3ScanState(None)
    h = start.h if start.h is not None else x.new_zeros(Bsz, H, P, N)                 # [B, H, P, N]
    angle = start.angle
    if theta is not None and angle is None:
        angle = x.new_zeros(Bsz, H, K)                                                # [B, H, K]
    # Before the first token there is no previous input: zeros make its trapezoid term vanish.
    B_prev = start.B_prev if start.B_prev is not None else x.new_zeros(Bsz, H, R, N)  # [B, H, R, N]
    x_prev = start.x_prev if start.x_prev is not None else x.new_zeros(Bsz, H, R, P)  # [B, H, R, P]
    ys = []
    for t in range(T):
        B_t, C_t, x_t, dt_t = Bm[:, t], Cm[:, t], x[:, t], dt[:, t]                    # [B, H, R, N|P], [B, H]
        if theta is not None:
            # phi grows by dt * theta; kept in [0, 2 pi) so cos and sin stay accurate over long sequences
            angle = torch.remainder(angle + dt_t[..., None] * theta[:, t], 2 * math.pi)  # [B, H, K]
            B_t = rotate_pairs(B_t, angle[:, :, None, :])                             # [B, H, R, N] B~_t
            C_t = rotate_pairs(C_t, angle[:, :, None, :])                             # [B, H, R, N] C~_t
        lam = trap[:, t] if trap is not None else torch.ones_like(dt_t)               # [B, H]
        alpha = torch.exp(dt_t * A[:, t])                                             # [B, H] decay
        beta = (1 - lam) * dt_t * alpha                                               # [B, H] weight of the previous input
        gamma = lam * dt_t                                                            # [B, H] weight of the current input
        now = torch.einsum("bhrp,bhrn->bhpn", x_t, B_t)                               # [B, H, P, N] sum_r x_r B~_r^T
        before = torch.einsum("bhrp,bhrn->bhpn", x_prev, B_prev)                      # [B, H, P, N] the same, at t - 1
        h = alpha[..., None, None] * h + beta[..., None, None] * before + gamma[..., None, None] * now
        ys.append(torch.einsum("bhpn,bhrn->bhrp", h, C_t))                            # [B, H, R, P] h C~_r
        B_prev, x_prev = B_t, x_t
    y = torch.stack(ys, dim=1)                                                        # [B, T, H, R, P]
    if D is not None:
        y = y + D[:, None, None] * x
    return y, Mamba3ScanState(h, angle, B_prev.contiguous(), x_prev.contiguous())


def decay_matrix(log_alpha: torch.Tensor) -> torch.Tensor:
    """L[..., t, s] = alpha_{s+1} ... alpha_t = exp(c_t - c_s) for s <= t (1 on the diagonal), 0 above it,
    with c the running sum of log alpha. log_alpha [..., T] (<= 0) -> L [..., T, T]: how much of what was
    written at token s is still in the state at token t. A difference of running sums, never a product of
    many small factors (which would underflow); the masked entries are exp(-inf) = 0."""
    c = torch.cumsum(log_alpha, dim=-1)                                               # [..., T]
    T = log_alpha.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=log_alpha.device).tril()      # [t, s]: s <= t
    return torch.exp((c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")))


def mamba3_scan_parallel(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None):
    """The same scan as one masked matrix product over the whole call (Mamba-2's "SSD" view, plus the trapezoid).

    Unrolling h_t = alpha_t h_{t-1} + beta_t v_{t-1} + gamma_t v_t, with v_s = sum_r x_s,r B~_s,r^T,
    L[t, s] = alpha_{s+1} ... alpha_t = exp(c_t - c_s) (c the running sum of dt A), gives

        h_t = exp(c_t) h_0  +  beta_0 L[t, 0] v_{-1}  +  sum_{s <= t} W[t, s] v_s,
        W[t, s] = gamma_s L[t, s] + beta_{s+1} L[t, s+1]     (the second term only for s < t)

    so y_t,r = h_t C~_t,r needs only the scores C~_t,r . B~_s,q, weighted by W and applied to x_s,q:
    attention with a decaying, trapezoid-shaped causal mask. v_{-1} is the previous call's last input
    (the state's B_prev, x_prev). Cost O(T^2) per head: the op runs it on chunks (`mamba3_scan`).
    Returns what `mamba3_scan_recurrent` returns; tested equal to it.
    """
    Bsz, T, H, R, P, N, K = check_mamba3_args(x, dt, A, Bm, Cm, theta, trap, D, initial_state)
    start = initial_state if initial_state is not None else Mamba3ScanState(None)
    h0 = start.h if start.h is not None else x.new_zeros(Bsz, H, P, N)                # [B, H, P, N]
    B_prev = start.B_prev if start.B_prev is not None else x.new_zeros(Bsz, H, R, N)  # [B, H, R, N]
    x_prev = start.x_prev if start.x_prev is not None else x.new_zeros(Bsz, H, R, P)  # [B, H, R, P]
    angle = start.angle
    if theta is not None:
        angle0 = angle if angle is not None else x.new_zeros(Bsz, H, K)
        phi = torch.remainder(angle0[:, None] + torch.cumsum(dt[..., None] * theta, dim=1), 2 * math.pi)  # [B, T, H, K]
        Bm = rotate_pairs(Bm, phi[:, :, :, None, :])                                  # [B, T, H, R, N] B~
        Cm = rotate_pairs(Cm, phi[:, :, :, None, :])                                  # [B, T, H, R, N] C~
        angle = phi[:, -1]
    lam = trap if trap is not None else torch.ones_like(dt)                           # [B, T, H]
    log_alpha = dt * A                                                                # [B, T, H]
    c = torch.cumsum(log_alpha, dim=1)                                                # [B, T, H]
    gamma = lam * dt                                                                  # [B, T, H]
    beta = (1 - lam) * dt * torch.exp(log_alpha)                                      # [B, T, H]
    L = decay_matrix(log_alpha.movedim(1, -1)).movedim(-2, 1).movedim(-1, 2)   # [B, T, T, H], 0 above the diagonal
    W = gamma[:, None] * L                                                            # [B, T, T, H]
    W = W + F.pad(beta[:, None, 1:] * L[:, :, 1:], (0, 0, 0, 1))                     # + beta_{s+1} L[t, s+1]
    w_prev = beta[:, :1] * L[:, :, 0]                                                 # [B, T, H]  beta_0 L[t, 0]
    w_h0 = torch.exp(c)                                                               # [B, T, H]
    scores = torch.einsum("bthrn,bshqn->btshrq", Cm, Bm) * W[..., None, None]         # [B, T, T, H, R, R]
    y = torch.einsum("btshrq,bshqp->bthrp", scores, x)                                # [B, T, H, R, P]
    y = y + torch.einsum("bthrn,bhqn,bhqp->bthrp", Cm, B_prev, x_prev) * w_prev[..., None, None]
    y = y + torch.einsum("bhpn,bthrn->bthrp", h0, Cm) * w_h0[..., None, None]
    h = (w_h0[:, -1, :, None, None] * h0
         + torch.einsum("bsh,bshqp,bshqn->bhpn", W[:, -1], x, Bm)
         + w_prev[:, -1, :, None, None] * torch.einsum("bhqp,bhqn->bhpn", x_prev, B_prev))  # [B, H, P, N]
    if D is not None:
        y = y + D[:, None, None] * x
    # Contiguous copies, not views into this call's inputs: a state read back from a file is contiguous,
    # and the next call must compute exactly the same way from either (bit-identical resumption).
    return y, Mamba3ScanState(h, angle.contiguous() if angle is not None else None,
                              Bm[:, -1].contiguous(), x[:, -1].contiguous())


def mamba3_scan(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None, chunk_size: int = 64):
    """The op models call: `mamba3_scan_parallel` on chunks of `chunk_size` tokens, the state carried
    from chunk to chunk (so memory grows linearly in T, not quadratically). Kernels replace it.
    Returns (y [B, T, H, R, P], Mamba3ScanState)."""
    T = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 5 else 0
    if T <= chunk_size:
        return mamba3_scan_parallel(x, dt, A, Bm, Cm, theta, trap, D, initial_state)
    ys, state = [], initial_state
    for lo in range(0, T, chunk_size):
        part = slice(lo, lo + chunk_size)
        y, state = mamba3_scan_parallel(x[:, part], dt[:, part], A[:, part], Bm[:, part], Cm[:, part],
                                        theta[:, part] if theta is not None else None,
                                        trap[:, part] if trap is not None else None, D, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state
