"""The nearest codebook entry to each vector: the search at the heart of vector quantisation.

Paper: van den Oord et al. 2017, "Neural Discrete Representation Learning" (VQ-VAE), arXiv:1711.00937.

    k_n = argmin_k ||z_n - c_k||^2            ties go to the lowest k

Shapes: z [N, C], codebook [K, C] -> (indices [N] int64, distances [N] in z's dtype).

Glossary: N vectors to quantise, K codes (8192 in Sintellix's write-up), C the code width.

Does not include: the quantiser around it (straight-through gradient, losses, EMA codebook, dead-code
restarts: `refimpl.vq.VectorQuantizer`), or anything fast (kernels/vq_nearest.py).
"""

from __future__ import annotations

import torch

from refimpl.ops.contract import Contract, at_least_fp32


#: the expanded-form search scores at most this many (row, code) pairs at once: chunks of
#: SEARCH_CHUNK_ELEMENTS // K rows, a [rows, K] score matrix of <= 64 MB in float32
SEARCH_CHUNK_ELEMENTS = 2 ** 24


VQ_NEAREST = Contract("vq_nearest", z="N C", codebook="K C")


def check_vq_nearest_args(z, codebook) -> tuple[int, int, int]:
    """Validate `vq_nearest`'s arguments; return (N, K, C)."""
    N, C, K = VQ_NEAREST.check(z=z, codebook=codebook)
    return N, K, C


@torch.no_grad()
def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code to each row: z [N, C], codebook [K, C] ->
    (indices [N] int64, distances [N] z.dtype, ||z_n - codebook[indices_n]||^2).

    Nearest by squared Euclidean distance; exact ties go to the lowest index. No gradient: the
    choice is an argmin, and the distances are returned detached (the op runs under no_grad).

    The search scores every code with the expanded form, dropping ||z_n||^2, which is the same
    for every code of a row and so cannot change its argmin:

        ||z_n - c_k||^2 = ||z_n||^2 - 2 z_n . c_k + ||c_k||^2   ->   score_nk = ||c_k||^2 - 2 z_n . c_k

    one matrix multiply per chunk of rows (chunks bound the [rows, K] score matrix to
    SEARCH_CHUNK_ELEMENTS). The expanded form cancels: its rounding error is about the unit
    roundoff times ||z||^2 + ||c||^2, not times the distance, so two codes whose distances differ by
    less than that (a near-tie) may come out in either order. The returned distance is therefore
    recomputed from the difference z_n - c_k of the chosen code, which is exact up to the rounding
    of C squares and their sum. (The kernels compute every distance that way, so they agree with
    this op exactly on the index except at such near-ties.) Half-precision inputs are promoted to
    float32 for the arithmetic; the distances come back in z's dtype.
    """
    N, K, C = check_vq_nearest_args(z, codebook)
    zf, cf = at_least_fp32(z), at_least_fp32(codebook)
    code_sq = (cf * cf).sum(dim=1)                                       # [K]  ||c_k||^2
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    rows = max(1, SEARCH_CHUNK_ELEMENTS // K)
    for start in range(0, N, rows):
        scores = code_sq - 2.0 * (zf[start:start + rows] @ cf.T)         # [rows, K]
        indices[start:start + rows] = scores.argmin(dim=1)              # the first minimum: ties -> lowest k
    diff = zf - cf[indices]                                              # [N, C]
    distances = (diff * diff).sum(dim=1)                                 # [N], from the difference: exact
    return indices, distances.to(z.dtype)
