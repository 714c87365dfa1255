"""The Mamba layer around the selective scan: projections, a causal convolution, the gate.

Paper: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752 (section 3, figure 3). The scan is the op `refimpl.ops.selective_scan`; this file
wraps it as a layer, x [B, T, C] -> [B, T, C], with a `MambaState` to carry between calls. Chapter 05
(the Thalamus router) uses it.

Does not include: the scan (refimpl/ops/selective_scan.py) or a kernel (kernels/selective_scan.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops


class MambaState:
    """What a MambaLayer carries between calls: the scan state and the convolution's last inputs."""

    def __init__(self):
        self.h: torch.Tensor | None = None       # [B, Dm, N]
        self.conv: torch.Tensor | None = None    # [B, conv_size - 1, Dm]


class MambaLayer(nn.Module):
    """The Mamba (S6) block: in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective scan with
    input-dependent Delta = softplus(dt_proj(.)), B, C; y * SiLU(z) -> out_proj. x: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, conv_size: int = 4, dt_rank: int | None = None):
        super().__init__()
        if min(dim, d_state, expand, conv_size) < 1:
            raise ValueError("MambaLayer: dim, d_state, expand, conv_size must be >= 1")
        self.d_inner, self.d_state, self.conv_size = expand * dim, d_state, conv_size
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        Dm, N = self.d_inner, d_state
        self.in_proj = nn.Linear(dim, 2 * Dm, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(Dm, conv_size) / conv_size)
        self.conv_bias = nn.Parameter(torch.zeros(Dm))
        self.x_proj = nn.Linear(Dm, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, Dm)
        dt = torch.exp(torch.empty(Dm).uniform_(math.log(1e-3), math.log(1e-1)))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))               # softplus(bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Dm, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(Dm))
        self.out_proj = nn.Linear(Dm, dim, bias=False)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)                                     # [B, T, Dm] each
        history = state.conv if state is not None and state.conv is not None else xs.new_zeros(Bsz, self.conv_size - 1, self.d_inner)
        padded = torch.cat([history, xs], dim=1)                                     # [B, conv - 1 + T, Dm]
        if state is not None:
            state.conv = padded[:, padded.shape[1] - (self.conv_size - 1):]
        xs = F.silu((padded.unfold(1, self.conv_size, 1) * self.conv_weight).sum(-1) + self.conv_bias)  # [B, T, Dm]
        dt_raw, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_raw))                                     # [B, T, Dm], > 0
        A = -self.A_log.exp()                                                        # [Dm, N], < 0
        h0 = state.h if state is not None else None
        y, h = ops.selective_scan(xs, delta, A, Bm, Cm, self.D, h0)                      # [B, T, Dm]
        if state is not None:
            state.h = h
        return self.out_proj(y * F.silu(z))                                          # [B, T, C]
