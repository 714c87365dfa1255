"""Neighbourhood attention on a 3D grid of neurons: plain PyTorch, written to be read.

Paper: the pattern is Hassani et al. 2023, "Neighborhood Attention Transformer", arXiv:2204.07143
(each query attends to the window around it), here on a 3D grid as Sintellix's write-up describes.

Chapter 01 (Sintellix) arranges neurons in a 3D grid (32 x 32 x 32 in the write-up, a
d-dimensional state each, 8 heads of d / 8). Every neuron runs multi-head attention over
its neighbours: softmax(q k^T / sqrt(D)) v, with the keys and values of the neurons around it.

"Around it" here means the cube of side 2r + 1 centred on the neuron (Chebyshev distance):

    neuron (x, y, z) sees (x', y', z')  iff  max(|x - x'|, |y - y'|, |z - z'|) <= r

itself included, and only neurons that exist: the grid does NOT wrap around. With r = 1
an interior neuron sees 27, one on a face 18, on an edge 12, at a corner 8.

Glossary (shape letters used in comments below)
    B  batch size             X, Y, Z  the grid's sides (N = X * Y * Z neurons)
    H  heads                  D        head dimension (the write-up: d / 8)
    r  radius                 M        neighbourhood size, (2r + 1)^3 (before the boundary cuts it)

Three forms of the same function:
    neighbourhood_attention        the op models call (and kernels replace): pad k and v by r on
                                   the three grid axes, take the M shifted views, mask the padding.
                                   Differentiable by autograd. Memory: the stacked keys and values
                                   are M = (2r + 1)^3 times the size of k and v (27x at r = 1).
    neighbourhood_attention_dense  the obviously-right form: flatten the grid to N tokens and run
                                   full softmax attention with an [N, N] neighbourhood mask. Memory
                                   N^2 per (batch, head): for tests and small pictures only.
    kernels/neighbourhood_attention.py  one worker per (batch, neuron, head) query, online softmax,
                                   bounds checks instead of padding: no M-fold copy at all.

Helpers: `neighbourhood_mask` (the [N, N] mask) and `neighbour_count` (how many neurons each
neuron sees, [X, Y, Z]), for tests and the chapter's picture.

Shapes: q, k, v [B, X, Y, Z, H, D] -> out [B, X, Y, Z, H, D].

Each function checks its arguments first and raises `ValueError` naming the shape it expected.
Does not include: the projections W_q, W_k, W_v, W_o around the op (the model's job), or
anything fast (the kernels' job).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from refimpl.ops.contract import Contract, at_least_fp32, fail



def _check_radius(op: str, radius) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        fail(f"{op}: radius must be an int >= 0, got {radius!r}")


def _check_grid(op: str, X, Y, Z, radius) -> None:
    for name, side in (("X", X), ("Y", Y), ("Z", Z)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            fail(f"{op}: grid side {name} must be an int >= 1, got {side!r}")
    _check_radius(op, radius)


NEIGHBOURHOOD_ATTENTION = Contract("neighbourhood_attention", q="B X Y Z H D", k="B X Y Z H D", v="B X Y Z H D")


def check_neighbourhood_attention_args(q, k, v, radius) -> tuple[int, int, int, int, int, int]:
    """Validate neighbourhood-attention arguments; return (B, X, Y, Z, H, D)."""
    sizes = NEIGHBOURHOOD_ATTENTION.check(q=q, k=k, v=v)
    _check_radius("neighbourhood_attention", radius)
    return sizes


# ----------------------------------------------------------------------------
# The op: pad, shift, mask
# ----------------------------------------------------------------------------

def _shifted_views(t: torch.Tensor, X: int, Y: int, Z: int, radius: int) -> torch.Tensor:
    """t padded by `radius` on its grid axes, [..., X + 2r, Y + 2r, Z + 2r, *rest] with the grid axes
    at dims 1, 2, 3 -> every neighbour offset stacked: [t.shape[0], X, Y, Z, M, *rest].

    Entry [.., x, y, z, m, ..] is the padded tensor at (x + i, y + j, z + l) for the m-th offset
    (i, j, l) in {0, .., 2r}^3, i.e. the unpadded neuron (x + i - r, y + j - r, z + l - r).
    """
    side = range(2 * radius + 1)
    views = [t[:, i:i + X, j:j + Y, l:l + Z] for i, j, l in itertools.product(side, side, side)]
    return torch.stack(views, dim=4)


def neighbourhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Multi-head attention of every neuron over its (2r + 1)^3 grid neighbourhood, no wrap-around.

    q, k, v: [B, X, Y, Z, H, D] -> out: [B, X, Y, Z, H, D].
    scores = q . k / sqrt(D) over the neighbours that exist; softmax; out = sum softmax * v.
    Memory: the stacked neighbour keys and values are (2r + 1)^3 times the size of k and v.
    """
    B, X, Y, Z, H, D = check_neighbourhood_attention_args(q, k, v, radius)
    r = radius
    # F.pad lists (before, after) pairs from the last dim backwards: D, H, then Z, Y, X get r each side.
    grid_pad = (0, 0, 0, 0, r, r, r, r, r, r)
    k_nb = _shifted_views(F.pad(k, grid_pad), X, Y, Z, r)                # [B, X, Y, Z, M, H, D]
    v_nb = _shifted_views(F.pad(v, grid_pad), X, Y, Z, r)                # [B, X, Y, Z, M, H, D]
    # Which of the M neighbours exist: the same shifts applied to a grid of ones padded with zeros,
    # so a neighbour is real exactly where its key is not padding.
    inside = F.pad(torch.ones(1, X, Y, Z, device=q.device), (r, r, r, r, r, r))  # [1, X+2r, Y+2r, Z+2r]
    valid = _shifted_views(inside, X, Y, Z, r)[0] > 0                    # [X, Y, Z, M] bool

    scores = torch.einsum("bxyzhd,bxyzmhd->bxyzhm", q, k_nb) / math.sqrt(D)   # [B, X, Y, Z, H, M]
    scores = scores.masked_fill(~valid[None, :, :, :, None, :], float("-inf"))  # out-of-grid: weight 0
    probs = torch.softmax(at_least_fp32(scores), dim=-1).to(q.dtype)         # every row has itself: no NaN
    return torch.einsum("bxyzhm,bxyzmhd->bxyzhd", probs, v_nb)               # [B, X, Y, Z, H, D]


# ----------------------------------------------------------------------------
# The obviously-right form: dense attention with a neighbourhood mask
# ----------------------------------------------------------------------------

def _grid_coordinates(X: int, Y: int, Z: int, device=None) -> torch.Tensor:
    """[N, 3] integer coordinates (x, y, z) of every neuron, row-major: n = (x * Y + y) * Z + z."""
    axes = torch.meshgrid(torch.arange(X, device=device), torch.arange(Y, device=device),
                          torch.arange(Z, device=device), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(X * Y * Z, 3)


def neighbourhood_mask(X: int, Y: int, Z: int, radius: int, device=None) -> torch.Tensor:
    """[N, N] bool, N = X * Y * Z (row-major over x, y, z): True where neuron n may attend to neuron m,
    i.e. their Chebyshev distance max(|dx|, |dy|, |dz|) is at most `radius`. No wrap-around."""
    _check_grid("neighbourhood_mask", X, Y, Z, radius)
    coords = _grid_coordinates(X, Y, Z, device)                               # [N, 3]
    distance = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)   # [N, N] Chebyshev
    return distance <= radius


def neighbourhood_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """The same op as full softmax attention over all N = X * Y * Z neurons with `neighbourhood_mask`.

    q, k, v: [B, X, Y, Z, H, D] -> out: [B, X, Y, Z, H, D]. Memory N^2 per (batch, head).
    """
    B, X, Y, Z, H, D = check_neighbourhood_attention_args(q, k, v, radius)
    N = X * Y * Z
    qf, kf, vf = (t.reshape(B, N, H, D) for t in (q, k, v))                 # grid flattened to tokens
    scores = torch.einsum("bnhd,bmhd->bhnm", qf, kf) / math.sqrt(D)          # [B, H, N, N]
    allowed = neighbourhood_mask(X, Y, Z, radius, device=q.device)           # [N, N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(at_least_fp32(scores), dim=-1).to(q.dtype)
    out = torch.einsum("bhnm,bmhd->bnhd", probs, vf)                         # [B, N, H, D]
    return out.reshape(B, X, Y, Z, H, D)


def neighbour_count(X: int, Y: int, Z: int, radius: int) -> torch.Tensor:
    """[X, Y, Z] int64: how many neurons each neuron attends over (itself included).

    The cube factorises by axis: along an axis of length L, position p sees
    min(p, r) + 1 + min(L - 1 - p, r) positions, and the count is the product of the three.
    """
    _check_grid("neighbour_count", X, Y, Z, radius)

    def along(L: int) -> torch.Tensor:
        p = torch.arange(L)
        return p.clamp(max=radius) + 1 + (L - 1 - p).clamp(max=radius)       # [L]

    cx, cy, cz = along(X), along(Y), along(Z)
    return cx[:, None, None] * cy[None, :, None] * cz[None, None, :]
