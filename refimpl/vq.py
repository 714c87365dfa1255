"""Vector quantisation: the VQ-VAE / VQ-GAN quantiser built on the nearest-code op.

Chapter 01 (seed 000, Sintellix, section 3.5) describes a VQ-GAN-style semantic codec: encoders map
each modality into one shared space, a vector quantiser with an 8192-entry codebook snaps every
encoder output to its nearest code, and a decoder reconstructs from the codes. The quantiser is
the piece here (van den Oord et al. 2017, "Neural Discrete Representation Learning",
arXiv:1711.00937):

    k_n   = argmin_k ||z_e,n - c_k||^2                  the nearest code (ties: the lowest k)
    z_q,n = c_{k_n}                                      the quantised vector
    z_q'  = z_e + sg[z_q - z_e]                          straight-through: the value of z_q, the gradient of z_e
    L     = beta ||z_e - sg[z_q]||^2  +  ||sg[z_e] - z_q||^2
            commitment (trains the encoder)  codebook (trains the codes)

(sg = stop-gradient, `.detach()`.) The argmin has no gradient, so the decoder's gradient is copied
straight through to the encoder, the commitment term keeps the encoder's outputs near the codes
it picks, and the codebook term pulls each chosen code toward the vectors assigned to it. Both
squared norms are taken as means over elements (as most implementations do), so the losses do
not grow with the batch or the width.

Two options from the literature, both here:
    EMA codebook   (van den Oord et al., appendix A.1) the codebook loss is dropped and each code
                   becomes a running mean of the vectors assigned to it instead:
                       N_k <- gamma N_k + (1 - gamma) n_k           n_k = vectors assigned to k this batch
                       m_k <- gamma m_k + (1 - gamma) sum_{n: k_n = k} z_e,n
                       c_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)
    dead codes     codes nothing was assigned to for a while are restarted on random encoder
                   outputs (as in Dhariwal et al. 2020, "Jukebox", arXiv:2005.00341), so a large
                   codebook does not collapse to the few codes the first batches happened to hit.
                   `usage()` and `perplexity()` measure how much of the codebook is in use.

The nearest-code search is the op `refimpl.ops.vq_nearest` (a kernel may replace it:
kernels/vq_nearest.py); `VectorQuantizer` calls it through `refimpl.ops`, so `with kernels.use("numba"):`
swaps it in.

Glossary
    N  vectors to quantise (every position of every batch row, flattened)
    K  codes in the codebook (8192 in the paper)
    C  the code width: the shared semantic space's dimension (1024 in the paper)

Does not include: the encoders and the decoder (the chapter's codec wires them around this), the
VQ-GAN's perceptual and adversarial losses (Esser et al. 2021), product / residual quantisation,
or codebook factorisation (low-dimensional, l2-normalised lookups as in ViT-VQGAN).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from refimpl import ops
from refimpl.ops.contract import fail


# ----------------------------------------------------------------------------
# The quantiser
# ----------------------------------------------------------------------------

class VQOutput(NamedTuple):
    """What `VectorQuantizer.forward` returns; the losses are 0-dim tensors."""
    z_q: torch.Tensor               # [..., C] the codes' values, z_e's gradient (straight-through)
    indices: torch.Tensor           # [...] int64, the chosen code of every vector
    commitment_loss: torch.Tensor   # beta * mean (z_e - sg[z_q])^2: gradient to the encoder only
    codebook_loss: torch.Tensor     # mean (sg[z_e] - z_q)^2: gradient to the codebook only (0 under EMA)
    loss: torch.Tensor              # commitment_loss + codebook_loss


class VectorQuantizer(nn.Module):
    """Snap each vector z_e [..., C] to the nearest of `num_codes` learned codes of width `dim`.

    ema=False: the codebook is an nn.Parameter trained by the codebook loss.
    ema=True:  the codebook is a buffer; in training mode every forward moves each used code toward
               the running mean of the vectors assigned to it (decay gamma = `decay`, Laplace
               smoothing `eps`), and the codebook loss is a zero tensor.

    The codes start as standard-normal draws (from `generator` when given, else torch's global
    generator). Usage is counted in training mode (`code_counts`, since the last reset): see
    `usage`, `perplexity`, `restart_dead_codes` and `reset_usage`.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, generator: torch.Generator | None = None):
        super().__init__()
        if num_codes < 1 or dim < 1:
            fail(f"VectorQuantizer: num_codes and dim must be >= 1, got {num_codes} and {dim}")
        if not beta >= 0:
            fail(f"VectorQuantizer: beta must be >= 0, got {beta}")
        if ema and not 0 < decay < 1:
            fail(f"VectorQuantizer: decay must be in (0, 1), got {decay}")
        if ema and not eps > 0:
            fail(f"VectorQuantizer: eps must be > 0, got {eps}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        init = torch.randn(num_codes, dim, generator=generator)          # [K, C]
        if ema:
            self.register_buffer("codebook", init)
            # As if every code had already been assigned one vector, itself: m_k / N_k = c_k from the
            # start. (Starting N at 0 and m at c, a code unused in the first batch would become
            # gamma c_k / N~_k with N~_k ~ eps: a code thrown 10^5 times further out.)
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))     # N_k   [K]
            self.register_buffer("ema_sum", init.clone())                        # m_k   [K, C]
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("code_counts", torch.zeros(num_codes, dtype=torch.int64))  # [K] since the last reset

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}"

    def _check(self, z_e) -> None:
        if not isinstance(z_e, torch.Tensor) or not z_e.is_floating_point():
            fail(f"VectorQuantizer: z_e must be a floating-point tensor [..., {self.dim}], got "
                  f"{getattr(z_e, 'dtype', type(z_e).__name__)}")
        if z_e.dim() < 1 or z_e.shape[-1] != self.dim:
            fail(f"VectorQuantizer: z_e must be [..., C] with C = {self.dim}, got shape {list(z_e.shape)}")
        if z_e.dtype != self.codebook.dtype:
            fail(f"VectorQuantizer: z_e must have the codebook's dtype {self.codebook.dtype}, got {z_e.dtype} "
                  "(convert one of them, e.g. with .to(dtype))")

    def forward(self, z_e: torch.Tensor) -> VQOutput:
        """z_e [..., C] -> VQOutput (z_q [..., C] straight-through, indices [...], the losses)."""
        self._check(z_e)
        flat = z_e.reshape(-1, self.dim)                                 # [N, C]
        with torch.no_grad():
            # `ops.vq_nearest` is looked up in refimpl.ops at each call: a kernel swapped in
            # with kernels.use runs here. Detached inputs: the op has no gradient to give.
            indices, _ = ops.vq_nearest(flat.detach(), self.codebook.detach())   # [N]
        z_q = F.embedding(indices, self.codebook).view_as(z_e)         # the codes before any EMA update
        if self.training:
            with torch.no_grad():
                self.code_counts += torch.bincount(indices, minlength=self.num_codes)
                if self.ema:
                    self._ema_update(flat.detach(), indices)
        commitment = self.beta * F.mse_loss(z_e, z_q.detach())
        if self.ema:
            codebook_loss = z_e.new_zeros(())
        else:
            codebook_loss = F.mse_loss(z_e.detach(), z_q)
        z_q_st = z_e + (z_q - z_e).detach()                             # value z_q, gradient ones to z_e
        return VQOutput(z_q_st, indices.view(z_e.shape[:-1]), commitment, codebook_loss, commitment + codebook_loss)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step of the cluster sizes N_k and sums m_k, then c_k = m_k / N~_k (see the module docstring)."""
        K, gamma = self.num_codes, self.decay
        counts = torch.bincount(indices, minlength=K).to(flat.dtype)                 # n_k   [K]
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)          # [K, C]
        self.ema_cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)
        self.ema_sum.mul_(gamma).add_(sums, alpha=1 - gamma)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + K * self.eps) * total   # N~_k > 0
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode: indices [...] (integers in [0, K)) -> the codes' vectors [..., C]."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            fail(f"VectorQuantizer.lookup: indices must be an integer tensor, got "
                  f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            fail(f"VectorQuantizer.lookup: indices must lie in [0, {self.num_codes}), got "
                  f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.codebook)

    # ------------------------------------------------------------ codebook usage

    def reset_usage(self) -> None:
        self.code_counts.zero_()

    def usage(self) -> float:
        """The fraction of codes used at least once since the last reset (0.0 before anything is counted)."""
        return float((self.code_counts > 0).sum()) / self.num_codes

    def perplexity(self) -> float:
        """exp(entropy of the code frequencies since the last reset): K when every code is used equally
        often, 1 when one code takes everything (0.0 before anything is counted)."""
        total = int(self.code_counts.sum())
        if total == 0:
            return 0.0
        p = self.code_counts.double() / total
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()          # 0 log 0 = 0
        return float(torch.exp(entropy))

    @torch.no_grad()
    def restart_dead_codes(self, z_e: torch.Tensor, min_count: int = 1, generator: torch.Generator | None = None,
                           noise: float = 1e-3) -> int:
        """Replace every code used fewer than `min_count` times since the last reset by a random row of
        z_e [..., C] (rows drawn without replacement while there are enough), plus Gaussian noise of
        `noise` times z_e's standard deviation so that two restarts on one row do not coincide; then
        reset the counts. Returns how many codes were restarted.

        Under EMA, the restarted codes' running statistics restart with them (N_k = 1, m_k = c_k).
        Without EMA, an optimiser's moments for those rows are left as they were.
        """
        self._check(z_e)
        dead = (self.code_counts < min_count).nonzero().flatten()       # [n_dead]
        n_dead = dead.numel()
        if n_dead:
            rows = z_e.detach().reshape(-1, self.dim)                    # [N, C]
            if rows.shape[0] >= n_dead:
                pick = torch.randperm(rows.shape[0], generator=generator)[:n_dead]
            else:
                pick = torch.randint(rows.shape[0], (n_dead,), generator=generator)
            scale = noise * float(rows.float().std()) if rows.numel() > 1 else 0.0
            jitter = torch.randn(n_dead, self.dim, generator=generator) * scale
            fresh = rows[pick.to(rows.device)] + jitter.to(device=rows.device, dtype=rows.dtype)
            self.codebook[dead] = fresh
            if self.ema:
                self.ema_cluster_size[dead] = 1.0
                self.ema_sum[dead] = fresh
        self.reset_usage()
        return n_dead
