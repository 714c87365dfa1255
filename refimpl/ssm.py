"""The selective state-space scan (S6) of Mamba, as a step loop and in chunks.

Paper: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752 (Algorithm 2). Shared by chapter 05 (the Thalamus router) and chapter 02
(a Mamba-3-style scan reduces to this one with rank 1, no rotation and an Euler step).

Per channel d and state index n, with the step size Delta_t > 0 and A < 0:

    h_t[d, n] = exp(Delta_t[d] A[d, n]) h_{t-1}[d, n] + Delta_t[d] B_t[n] u_t[d]      (zero-order hold on A,
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]                                    Euler on B, as in Mamba)

Glossary (the Mamba code's letters)
    B   batch              T   tokens             Dm  channels (d_inner)       N  state size (d_state)
    u      [B, T, Dm]      input                  delta [B, T, Dm]  step sizes, > 0
    A      [Dm, N]         (negative) rates       Bm, Cm [B, T, N]  input-dependent B and C
    D      [Dm]            skip                   h     [B, Dm, N]  the state (`initial_state` in, final out)

Does not include: the layer around it (projections, convolution, gate): see `MambaLayer` below.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_selective_scan_args(u, delta, A, Bm, Cm, D, initial_state):
    """Validate the scan's arguments; return (B, T, Dm, N)."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", Bm), ("C", Cm)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be [B, T, Dm], got {list(u.shape)} and {list(delta.shape)}")
    Bsz, T, Dm = u.shape
    if A.dim() != 2 or A.shape[0] != Dm:
        raise ValueError(f"selective_scan: A must be [Dm, N] with Dm = {Dm}, got {list(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", Bm), ("C", Cm)):
        if tuple(t.shape) != (Bsz, T, N):
            raise ValueError(f"selective_scan: {name} must be [B, T, N] = [{Bsz}, {T}, {N}], got {list(t.shape)}")
    if D is not None and tuple(D.shape) != (Dm,):
        raise ValueError(f"selective_scan: D must be [Dm] = [{Dm}], got {list(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bsz, Dm, N):
        raise ValueError(f"selective_scan: initial_state must be [B, Dm, N] = [{Bsz}, {Dm}, {N}], "
                         f"got {list(initial_state.shape)}")
    if min(Bsz, T, Dm, N) < 1:
        raise ValueError("selective_scan: every size must be >= 1")
    return Bsz, T, Dm, N


def selective_scan_recurrent(u, delta, A, Bm, Cm, D=None, initial_state=None):
    """The step loop: the ground truth. Returns (y [B, T, Dm], final state [B, Dm, N])."""
    Bsz, T, Dm, N = check_selective_scan_args(u, delta, A, Bm, Cm, D, initial_state)
    h = initial_state if initial_state is not None else u.new_zeros(Bsz, Dm, N)  # [B, Dm, N]
    ys = []
    for t in range(T):
        decay = torch.exp(delta[:, t, :, None] * A)                                  # [B, Dm, N]
        h = decay * h + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]       # [B, Dm, N]
        ys.append((h * Cm[:, t, None, :]).sum(-1))                                    # [B, Dm]
    y = torch.stack(ys, dim=1)                                                       # [B, T, Dm]
    if D is not None:
        y = y + D * u
    return y, h


def selective_scan_chunked(u, delta, A, Bm, Cm, D=None, initial_state=None, chunk_size: int = 32):
    """The same scan, C tokens at a time. Returns (y [B, T, Dm], final state [B, Dm, N]).

    Inside a chunk, with a_t = cumulative sum of Delta A from the chunk's start,
        h_t = exp(a_t) h_0 + sum_{s <= t} exp(a_t - a_s) Delta_s B_s u_s
    so every output of the chunk is one masked, decay-weighted sum (memory O(C^2 Dm N) per chunk).
    """
    Bsz, T, Dm, N = check_selective_scan_args(u, delta, A, Bm, Cm, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"selective_scan_chunked: chunk_size must be >= 1, got {chunk_size}")
    h = initial_state if initial_state is not None else u.new_zeros(Bsz, Dm, N)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=u.device).tril()     # s <= t
    strictly_after = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=u.device).tril(-1)  # r > s
    ys = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        C = sl.stop - sl.start
        dA = delta[:, sl, :, None] * A                                               # [B, C, Dm, N]
        a = dA.cumsum(dim=1)                                                          # [B, C, Dm, N]
        # a_t - a_s = sum of dA_r over s < r <= t, summed directly ("segment sums") rather than subtracted:
        # a difference of two long cumulative sums loses float32 precision when |Delta A| is large.
        after_s = dA[:, :, None].masked_fill(~strictly_after[:C, :C, None, None], 0.0)  # [B, C(r), C(s), Dm, N]
        gap = after_s.cumsum(dim=1)                                                   # [B, C(t), C(s), Dm, N]
        weight = gap.masked_fill(~causal[:C, :C, None, None], float("-inf")).exp()    # exp(a_t - a_s), s <= t
        x = (delta[:, sl] * u[:, sl])[..., None] * Bm[:, sl, None, :]                  # [B, C, Dm, N] Delta_s B_s u_s
        states = a.exp() * h[:, None] + torch.einsum("btsdn,bsdn->btdn", weight, x)   # [B, C, Dm, N] every h_t
        ys.append(torch.einsum("btdn,btn->btd", states, Cm[:, sl]))                   # [B, C, Dm]
        h = states[:, -1]
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + D * u
    return y, h


def selective_scan(u, delta, A, Bm, Cm, D=None, initial_state=None):
    """The op models call: the step loop. Returns (y [B, T, Dm], final state [B, Dm, N]).

    Not the chunked form: its [B, C, C, Dm, N] decay tensor makes it slower on a CPU, forward and
    backward, at every chunk size tried (measured at B 8, T 128, Dm 192, N 8: step loop 0.07 s,
    chunks of 4 0.13 s, of 32 1.8 s). Its value is as a second, independent derivation to test against."""
    return selective_scan_recurrent(u, delta, A, Bm, Cm, D, initial_state)


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
        y, h = selective_scan(xs, delta, A, Bm, Cm, self.D, h0)                      # [B, T, Dm]
        if state is not None:
            state.h = h
        return self.out_proj(y * F.silu(z))                                          # [B, T, C]
