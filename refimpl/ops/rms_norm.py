"""RMSNorm: rescale each vector to unit root-mean-square, then by a learned gain.

Paper: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.

    y = x / sqrt(mean_c(x_c^2) + eps) * weight

Shapes: x [..., C], weight [C] -> y [..., C] (x's dtype; the mean is taken in float32 or better).

Glossary: C the normalised width (the last dimension), eps the floor under the mean square.

Does not include: LayerNorm's mean subtraction or bias (RMSNorm has neither).
"""

from __future__ import annotations

import math

import torch

from refimpl.ops.contract import Contract, at_least_fp32, fail


RMS_NORM = Contract("rms_norm", x="... C", weight="C")


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> int:
    """Validate RMSNorm arguments; return the normalised width C."""
    (C,) = RMS_NORM.check(x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        fail(f"rms_norm: eps must be a positive finite number, got {eps!r}")
    return C


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    x: [..., C], weight: [C] -> y: [..., C] (x's dtype; the mean is taken in fp32 or better).
    """
    check_rms_norm_args(x, weight, eps)
    xf = at_least_fp32(x)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
    return (xf * inv_rms * weight).to(x.dtype)
