"""The modulated linear map of Geometric Intelligence (seed 003): weights that depend on a coordinate.

Source: the write-up (mghbot/geometric-intellgence-10m-model); no paper describes it. Each term is a
rank-r update like LoRA's (Hu et al. 2021, arXiv:2106.09685), scaled by a coefficient of the coordinate.

The write-up replaces a fixed weight W by

    W_eff(theta) = W_base + sum_i [ cos(theta . c_i) U_i V_i^T + sin(theta . c_i) P_i Q_i^T ]

with theta a 1,024-dimensional coordinate, c_i one of M = 64 fixed "wavelet" directions and each
U_i V_i^T, P_i Q_i^T of rank r = 12. Different theta, different weights, from one set of parameters.

The op every modulated projection calls is `modulated_linear`. It never builds W_eff: with the
coefficients a_i = cos(theta . c_i) and b_i = sin(theta . c_i) of each row's coordinate,

    y = x W_eff^T = x W_base^T + sum_i a_i (x V_i) U_i^T + sum_i b_i (x Q_i) P_i^T

costs O(in out + M r (in + out)) per row instead of O(M r in out) to materialise W_eff, and each
row (token) may have its own theta. `modulated_linear_materialised` builds W_eff per row (the
obviously right, slow form the tests compare with); kernels replace `modulated_linear`.

Shapes: x [N, I], weight [O, I], U, P [M, O, r], V, Q [M, I, r], cos, sin [N, M] -> y [N, O].

Glossary
    N rows (tokens)   I in features   O out features   M wavelet pairs   r rank
    x       [N, I]        inputs
    weight  [O, I]        W_base (nn.Linear's layout)
    U, P    [M, O, r]     left factors of the cos and sin terms
    V, Q    [M, I, r]     right factors
    cos, sin [N, M]       each row's coefficients cos(theta . c_i), sin(theta . c_i)
    y       [N, O]

Does not include: the modulated layer and the model (`refimpl.geometric`), or anything fast
(kernels/modulated_linear.py).
"""

from __future__ import annotations

import torch

from refimpl.ops.contract import Contract


MODULATED_LINEAR = Contract("modulated_linear", x="N I", weight="O I", U="M O r", V="M I r", P="M O r", Q="M I r",
                            cos="N M", sin="N M")


def check_modulated_linear_args(x, weight, U, V, P, Q, cos, sin):
    """Validate `modulated_linear`'s arguments; return (N, I, O, M, r)."""
    return MODULATED_LINEAR.check(x=x, weight=weight, U=U, V=V, P=P, Q=Q, cos=cos, sin=sin)


def modulated_linear(x, weight, U, V, P, Q, cos, sin):
    """y [N, O] = x W_eff^T, factored: x W_base^T + sum_i cos_i (x V_i) U_i^T + sin_i (x Q_i) P_i^T."""
    check_modulated_linear_args(x, weight, U, V, P, Q, cos, sin)
    xv = torch.einsum("ni,mir->nmr", x, V) * cos[:, :, None]                   # [N, M, r] a_i (x V_i)
    xq = torch.einsum("ni,mir->nmr", x, Q) * sin[:, :, None]                   # [N, M, r] b_i (x Q_i)
    return x @ weight.T + torch.einsum("nmr,mor->no", xv, U) + torch.einsum("nmr,mor->no", xq, P)


def modulated_linear_materialised(x, weight, U, V, P, Q, cos, sin):
    """The same product with W_eff built for every row: [N, O, I] in memory. For tests and the chapter's timing."""
    check_modulated_linear_args(x, weight, U, V, P, Q, cos, sin)
    UV = torch.einsum("mor,mir->moi", U, V)                                    # [M, O, I] U_i V_i^T
    PQ = torch.einsum("mor,mir->moi", P, Q)                                    # [M, O, I] P_i Q_i^T
    W_eff = weight + torch.einsum("nm,moi->noi", cos, UV) + torch.einsum("nm,moi->noi", sin, PQ)  # [N, O, I]
    return torch.einsum("noi,ni->no", W_eff, x)
