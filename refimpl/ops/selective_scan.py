"""The selective state-space scan (S6) of Mamba, as a step loop and in chunks.

Paper: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752 (Algorithm 2). Shared by chapter 05 (the Thalamus router) and chapter 02
(a Mamba-3-style scan reduces to this one with rank 1, no rotation and an Euler step).

Per channel d and state index n, with the step size Delta_t > 0 and A < 0:

    h_t[d, n] = exp(Delta_t[d] A[d, n]) h_{t-1}[d, n] + Delta_t[d] B_t[n] u_t[d]      (zero-order hold on A,
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]                                    Euler on B, as in Mamba)

Shapes: u, delta [B, T, Dm], A [Dm, N], Bm, Cm [B, T, N], D [Dm] or None, initial_state [B, Dm, N] or None
        -> (y [B, T, Dm], final state [B, Dm, N]).

Glossary (the Mamba code's letters)
    B   batch              T   tokens             Dm  channels (d_inner)       N  state size (d_state)
    u      [B, T, Dm]      input                  delta [B, T, Dm]  step sizes, > 0
    A      [Dm, N]         (negative) rates       Bm, Cm [B, T, N]  input-dependent B and C
    D      [Dm]            skip                   h     [B, Dm, N]  the state (`initial_state` in, final out)

Does not include: the layer around it (projections, convolution, gate): see `refimpl.ssm.MambaLayer`.
"""

from __future__ import annotations

import torch

from refimpl.ops.contract import Contract


SELECTIVE_SCAN = Contract("selective_scan", u="B T Dm", delta="B T Dm", A="Dm N", Bm="B T N", Cm="B T N", D="Dm?",
                          initial_state="B Dm N?")


def check_selective_scan_args(u, delta, A, Bm, Cm, D, initial_state):
    """Validate the scan's arguments; return (B, T, Dm, N)."""
    return SELECTIVE_SCAN.check(u=u, delta=delta, A=A, Bm=Bm, Cm=Cm, D=D, initial_state=initial_state)


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
