"""The Mamba-3 layer: a trapezoidal step, a rotating (complex) state, and MIMO, around the scan.

Paper: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu 2026, "Mamba-3: Improved Sequence Modeling
using State Space Principles", arXiv:2603.15569. Chapter 02 (seed 001, H-ENN): the write-up claims a
Mamba-3 MIMO backbone with a complex state; its public code has none. This file is what such a layer
computes; the recurrence itself (its equations, glossary and two forms) is the op
`refimpl.ops.mamba3_scan`.

What each piece is for:
  - Exponential-trapezoidal step (section 3.1). Over one step the exact solution of
    h' = A h + B(s) x(s) is e^{dt A} h_{t-1} + integral of e^{(t-s) A} B(s) x(s) ds. Mamba-1/2
    approximate the integral by its right end only, dt B_t x_t ("exponential-Euler"); Mamba-3
    blends both ends, the left one carrying its decay e^{dt A}, with a learned gate lambda_t in
    [0, 1]: lambda = 1 is Mamba-2's rule, lambda = 1/2 the classical trapezoid. This is why the
    scan must remember the previous token's B~ x.
  - Complex state as rotations (section 3.2). A complex diagonal state, eigenvalue A + i*omega per
    pair of real state dimensions, turns each pair by dt*omega every step. Multiplying the state by the running
    rotation Rot(phi_t) cancels the turning from the recurrence and moves it onto B and C ("the RoPE
    trick"): what is left is a real recurrence with a scalar decay, Mamba-2's shape. With the
    un-rotated state g_t = Rot(phi_t)^T h_t the same scan reads
        g_t = Rot(-dt_t theta_t) (alpha_t g_{t-1} + (1 - lambda_t) dt_t alpha_t B_{t-1} x_{t-1}) + lambda_t dt_t B_t x_t,
        y_t = g_t C_t,
    a complex state with omega = -theta. The sign is a convention (theta is learned, and its
    bound is symmetric); we rotate B and C by +phi as the reference code does.
  - MIMO (section 3.3). Each head takes R input channels x_t,r (each [P]) instead of one and gives
    R outputs; the state update becomes rank R. Decoding reads and writes the same [P, N] state, so
    R times the arithmetic costs almost no extra time on memory-bound hardware.

Does not include: the scan (refimpl/ops/mamba3_scan.py) or a kernel (kernels/mamba3_scan.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops
from refimpl.blocks import RMSNorm, one_dtype


class Mamba3State:
    """What a Mamba3Layer carries between calls: the scan's state (h, angle, previous B~ and x).

    Mamba-3 has no short convolution, so unlike MambaState there is no window of past inputs."""

    def __init__(self):
        self.scan: ops.Mamba3ScanState | None = None


class Mamba3Layer(nn.Module):
    """The Mamba-3 block around the scan. u: [B, T, C] -> [B, T, C].

        x, z    = W_x u, W_z u                                   [B, T, H, P] each
        dt      = softplus(W_dt u + dt_bias)                     [B, T, H]
        A       = min(-softplus(W_A u), -A_floor)                [B, T, H]  the floor keeps alpha < 1
        lambda  = sigmoid(W_lambda u)                            [B, T, H]  the trapezoid gate
        theta   = pi * tanh(W_theta u)                           [B, T, K]  shared by all heads (each turns by its own dt)
        B, C    = RMSNorm(W_B u) + B_bias, RMSNorm(W_C u) + C_bias   [B, T, H, R, N]  one projection for all heads,
                                                                      a learned bias per head and rank (starts at 1)
        x_r     = x * mimo_x[r],  z_r = z * mimo_z[r]            [B, T, H, R, P]  (R > 1: per-rank scales of each head dim)
        y_r     = mamba3_scan(x_r, dt, A, B, C, theta, lambda, D)
        out     = W_o sum_r mimo_o[r] * y_r * SiLU(z_r)          (R = 1: W_o (y * SiLU(z)))

    K = floor(d_state * rope_fraction / 2) pairs of state dims turn (the reference default: half);
    rope_fraction = 0 gives a real-valued state. No convolution and no output norm: the reference
    module drops Mamba's short convolution, and its output RMSNorm is off by default.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, head_dim: int = 16, mimo_rank: int = 4,
                 rope_fraction: float = 0.5, A_floor: float = 1e-4, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4):
        super().__init__()
        if min(dim, d_state, expand, head_dim, mimo_rank) < 1:
            raise ValueError(f"Mamba3Layer: dim, d_state, expand, head_dim, mimo_rank must be >= 1, "
                             f"got {dim}, {d_state}, {expand}, {head_dim}, {mimo_rank}")
        if (expand * dim) % head_dim:
            raise ValueError(f"Mamba3Layer: head_dim {head_dim} must divide d_inner = expand * dim = {expand * dim}")
        if not 0.0 <= rope_fraction <= 1.0:
            raise ValueError(f"Mamba3Layer: rope_fraction must be in [0, 1], got {rope_fraction}")
        if not (A_floor >= 0 and 0 < dt_min <= dt_max):
            raise ValueError(f"Mamba3Layer: need A_floor >= 0 and 0 < dt_min <= dt_max, "
                             f"got {A_floor}, {dt_min}, {dt_max}")
        self.d_inner = expand * dim
        self.n_heads, self.head_dim = self.d_inner // head_dim, head_dim
        self.d_state, self.mimo_rank = d_state, mimo_rank
        self.n_angles = int(d_state * rope_fraction) // 2                             # K rotated pairs
        self.A_floor = A_floor
        H, P, N, R, K = self.n_heads, head_dim, d_state, mimo_rank, self.n_angles
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)                   # x and z
        self.dt_proj = nn.Linear(dim, H, bias=False)
        self.A_proj = nn.Linear(dim, H, bias=False)
        self.trap_proj = nn.Linear(dim, H, bias=False)
        self.theta_proj = nn.Linear(dim, K, bias=False) if K > 0 else None
        self.B_proj = nn.Linear(dim, R * N, bias=False)
        self.C_proj = nn.Linear(dim, R * N, bias=False)
        self.B_norm, self.C_norm = RMSNorm(N, eps=1e-5), RMSNorm(N, eps=1e-5)
        self.B_bias = nn.Parameter(torch.ones(H, R, N))
        self.C_bias = nn.Parameter(torch.ones(H, R, N))
        dt = torch.exp(torch.empty(H).uniform_(math.log(dt_min), math.log(dt_max))).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))               # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(H))
        if R > 1:
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R))               # one head vector -> R inputs
            self.mimo_z = nn.Parameter(torch.ones(H, R, P))                           # and R gates
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R))               # R outputs -> one head vector
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, u: torch.Tensor, state: Mamba3State | None = None) -> torch.Tensor:
        """u: [B, T, C] -> [B, T, C]. Pass a Mamba3State to carry the scan across calls."""
        Bsz, T, _ = u.shape
        H, P, N, R, K = self.n_heads, self.head_dim, self.d_state, self.mimo_rank, self.n_angles
        x, z = self.in_proj(u).view(Bsz, T, 2, H, P).unbind(dim=2)                   # [B, T, H, P] each
        dt = F.softplus(self.dt_proj(u) + self.dt_bias)                               # [B, T, H], > 0
        A = (-F.softplus(self.A_proj(u))).clamp(max=-self.A_floor)                    # [B, T, H], <= -A_floor
        lam = torch.sigmoid(self.trap_proj(u))                                        # [B, T, H], in (0, 1)
        theta = None
        if K > 0:
            theta = (math.pi * torch.tanh(self.theta_proj(u)))[:, :, None, :].expand(Bsz, T, H, K)  # [B, T, H, K]
        Bm = self.B_norm(self.B_proj(u).view(Bsz, T, 1, R, N)) + self.B_bias          # [B, T, H, R, N]
        Cm = self.C_norm(self.C_proj(u).view(Bsz, T, 1, R, N)) + self.C_bias          # [B, T, H, R, N]
        if R > 1:
            xs, zs = x[:, :, :, None] * self.mimo_x, z[:, :, :, None] * self.mimo_z  # [B, T, H, R, P] each
        else:
            xs, zs = x[:, :, :, None], z[:, :, :, None]                               # [B, T, H, 1, P]
        start = state.scan if state is not None else None
        xs, dt, A, Bm, Cm, theta, lam, D = one_dtype(xs, dt, A, Bm, Cm, theta, lam, self.D)   # bf16 autocast
        y, carried = ops.mamba3_scan(xs, dt, A, Bm, Cm, theta, lam, D, start)             # [B, T, H, R, P]
        if state is not None:
            state.scan = carried
        y = y * F.silu(zs)                                                            # output gate, per rank
        y = (y * self.mimo_o).sum(dim=3) if R > 1 else y[:, :, :, 0]                  # [B, T, H, P]
        return self.out_proj(y.reshape(Bsz, T, H * P))                                # [B, T, C]
