"""The Gated DeltaNet layer: projections, a short convolution, the gates, the rule, an output gate.

Paper: Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
arXiv:2412.06464 (section 3). The recurrence itself, its step loop and its chunked form are the op
`refimpl.ops.gated_delta_rule`; this file wraps it as a token mixer, x [B, T, C] -> [B, T, C],
whose state (`GatedDeltaNetState`) can be carried from call to call.

Does not include: the recurrence (refimpl/ops/gated_delta_rule.py) or a kernel (kernels/gated_delta_rule.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops
from refimpl.blocks import RMSNorm, one_dtype


# ----------------------------------------------------------------------------
# The layer: projections, short convolution, gates, the rule, output gate and norm
# ----------------------------------------------------------------------------

class GatedDeltaNetState:
    """What one layer carries between calls: the delta-rule state and the convolution's last inputs."""

    def __init__(self):
        self.S: torch.Tensor | None = None          # [B, H, V, K]
        self.conv: torch.Tensor | None = None       # [B, conv_size - 1, channels] last projected inputs


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet token mixer (Yang et al. 2024, section 3):

        q, k, v = SiLU(causal depthwise conv(W x)), with q and k L2-normalised per head
        beta    = sigmoid(W_beta x)                                   per head, in (0, 1)
        g       = -exp(A_log) * softplus(W_a x + dt_bias)             per head, so alpha = exp(g) in (0, 1)
        o       = gated_delta_rule(q, k, v, g, beta)
        y       = W_o (RMSNorm(o) * SiLU(W_gate x))                   per-head norm, output gate
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int | None = None, value_dim: int | None = None,
                 conv_size: int = 4, norm_eps: float = 1e-6):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"GatedDeltaNet: n_heads must be >= 1, got {n_heads}")
        head_dim = head_dim or dim // n_heads
        value_dim = value_dim or head_dim
        if head_dim < 1 or value_dim < 1 or conv_size < 1:
            raise ValueError(f"GatedDeltaNet: n_heads, head_dim, value_dim, conv_size must be >= 1, "
                             f"got {n_heads}, {head_dim}, {value_dim}, {conv_size}")
        self.n_heads, self.head_dim, self.value_dim, self.conv_size = n_heads, head_dim, value_dim, conv_size
        H, K, V = n_heads, head_dim, value_dim
        self.qkv_proj = nn.Linear(dim, H * (2 * K + V), bias=False)
        self.conv_weight = nn.Parameter(torch.randn(H * (2 * K + V), conv_size) / conv_size)  # depthwise, causal
        self.beta_proj = nn.Linear(dim, H, bias=False)
        self.a_proj = nn.Linear(dim, H, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))           # decay rates, as in Mamba-2
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))                  # softplus(dt_bias) = dt
        self.gate_proj = nn.Linear(dim, H * V, bias=False)
        self.out_norm = RMSNorm(V, norm_eps)
        self.out_proj = nn.Linear(H * V, dim, bias=False)

    def _short_conv(self, x: torch.Tensor, state: GatedDeltaNetState | None) -> torch.Tensor:
        """Causal depthwise convolution over time: [B, T, channels] -> [B, T, channels]."""
        B, T, channels = x.shape
        history = (state.conv if state is not None and state.conv is not None
                   else x.new_zeros(B, self.conv_size - 1, channels))
        padded = torch.cat([history, x], dim=1)                                   # [B, conv_size - 1 + T, ch]
        if state is not None:
            state.conv = padded[:, padded.shape[1] - (self.conv_size - 1):]
        windows = padded.unfold(1, self.conv_size, 1)                             # [B, T, ch, conv_size]
        return (windows * self.conv_weight).sum(-1)                               # [B, T, ch]

    def forward(self, x: torch.Tensor, state: GatedDeltaNetState | None = None) -> torch.Tensor:
        """x: [B, T, C] -> [B, T, C]. Pass a GatedDeltaNetState to carry memory across calls."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_dim, self.value_dim
        qkv = F.silu(self._short_conv(self.qkv_proj(x), state))                  # [B, T, H*(2K+V)]
        q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        q = F.normalize(q.view(B, T, H, K), dim=-1)                              # [B, T, H, K]
        k = F.normalize(k.view(B, T, H, K), dim=-1)                              # [B, T, H, K]
        v = v.view(B, T, H, V)                                                   # [B, T, H, V]
        beta = torch.sigmoid(self.beta_proj(x))                                  # [B, T, H]
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)        # [B, T, H], <= 0
        S0 = state.S if state is not None else None
        q, k, v, g, beta = one_dtype(q, k, v, g, beta)                                # bf16 autocast: float32
        o, S = ops.gated_delta_rule(q, k, v, g, beta, S0)                            # [B, T, H, V], [B, H, V, K]
        if state is not None:
            state.S = S
        o = self.out_norm(o) * F.silu(self.gate_proj(x)).view(B, T, H, V)       # [B, T, H, V]
        return self.out_proj(o.reshape(B, T, H * V))                             # [B, T, C]
