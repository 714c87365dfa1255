"""Adam with gradient clipping as one step on flat buffers.

Chapter 01's write-up (Sintellix, section 4.1) lists an "Adam update kernel" with "fused momentum
and adaptive learning rate computation, gradient clipping integrated"; its public code's Adam has
no clipping. This file is the plain-PyTorch ground truth for that kernel:

    adam_clip_step(param, grad, exp_avg, exp_avg_sq, step=t, ...) -> total_norm

on four 1-D tensors of one length N (the whole model's parameters, gradients and Adam moments,
each flattened into one buffer). One call is exactly

    torch.nn.utils.clip_grad_norm_(params, max_norm)      then      torch.optim.Adam(params, lr, (beta1, beta2),
                                                                                      eps, weight_decay).step()

(Kingma & Ba 2014, "Adam", arXiv:1412.6980, in the form torch.optim.Adam computes it), so that

    pass 1 (one number)   n = ||grad||_2,   coef = min(1, max_norm / (n + 1e-6))       (no clipping: coef = 1)
    pass 2 (every i)      g    = coef * grad[i] + weight_decay * param[i]               (L2 form, not AdamW)
                          m[i] = beta1 m[i] + (1 - beta1) g
                          v[i] = beta2 v[i] + (1 - beta2) g^2
                          param[i] -= (lr / (1 - beta1^t)) * m[i] / (sqrt(v[i]) / sqrt(1 - beta2^t) + eps)

param, exp_avg (m) and exp_avg_sq (v) are updated in place; grad is read only. The only thing
that couples the elements is the norm, so once it is known the update is element-wise: the
kernels (kernels/adam_clip_step.py) do one parallel reduction, then one element-wise pass.

The optimiser that calls it once per step for the whole model is `refimpl.optim.FlatAdam`.

Shapes: param, grad, exp_avg, exp_avg_sq [N] (one dtype, one device) -> total_norm, a 0-dim tensor.

Glossary: N elements in the flat buffers, t the step count (1 for the first step).

Does not include: AdamW's decoupled weight decay, AMSGrad, `maximize`, mixed-precision master
weights, or per-group hyperparameters (one group: every parameter gets the same lr and decay).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from refimpl.ops.contract import Contract, fail


#: what torch.nn.utils.clip_grad_norm_ adds to the norm before dividing (so a zero gradient is no 0/0)
CLIP_EPS = 1e-6


def _expect_real(name: str, value, *, positive: bool = False, below_one: bool = False) -> None:
    """A finite real number; > 0 if `positive`, else >= 0; < 1 if `below_one`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        fail(f"adam_clip_step: {name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        fail(f"adam_clip_step: {name} must be > 0, got {value!r}")
    if not positive and not value >= 0:
        fail(f"adam_clip_step: {name} must be >= 0, got {value!r}")
    if below_one and not value < 1:
        fail(f"adam_clip_step: {name} must be in [0, 1), got {value!r}")


ADAM_CLIP_STEP = Contract("adam_clip_step", param="N", grad="N", exp_avg="N", exp_avg_sq="N")


def check_adam_clip_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                         max_norm) -> int:
    """Validate `adam_clip_step`'s arguments; return the flat length N.

    The four tensors: 1-D, one length N >= 1, one floating-point dtype, one device, contiguous
    (the kernels write through raw pointers, so a strided view would be updated in the wrong places,
    and a silent contiguous copy would be updated and thrown away), and no two overlapping in memory.
    """
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    (N,) = ADAM_CLIP_STEP.check(tensors)
    for name, t in tensors.items():
        if not t.is_contiguous():
            fail(f"adam_clip_step: {name} must be contiguous (it is updated in place through its memory); "
                 f"got stride {t.stride()}")
    names = list(tensors)
    for i, a in enumerate(names):                      # an update written into grad or into the other moment
        for b in names[i + 1:]:                        # would be read back as input: refuse overlaps
            ta, tb = tensors[a], tensors[b]
            start_a, start_b = ta.data_ptr(), tb.data_ptr()
            if start_a < start_b + N * tb.element_size() and start_b < start_a + N * ta.element_size():
                fail(f"adam_clip_step: {a} and {b} share memory; the four buffers must be separate")
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 1:
        fail(f"adam_clip_step: step must be an int >= 1 (1 for the first step), got {step!r}")
    _expect_real("lr", lr, positive=True)
    _expect_real("beta1", beta1, below_one=True)
    _expect_real("beta2", beta2, below_one=True)
    _expect_real("eps", eps, positive=True)
    _expect_real("weight_decay", weight_decay)
    if max_norm is not None:
        _expect_real("max_norm", max_norm, positive=True)     # None means: no clipping
    return N


@torch.no_grad()
def adam_clip_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                   step: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, max_norm: float | None = None) -> torch.Tensor:
    """One Adam step with the gradient clipped to norm `max_norm` first (None: not clipped).

    param, grad, exp_avg, exp_avg_sq: [N], one float dtype and device. step: this step's number t >= 1.
    Updates param, exp_avg, exp_avg_sq in place (grad is not modified) and returns the gradient's
    L2 norm before clipping, a 0-dim tensor of grad's dtype (what clip_grad_norm_ returns).

    The arithmetic follows torch.optim.Adam (single-tensor path) and clip_grad_norm_ operation for
    operation, so that in float64 the two agree to rounding (~1e-15), step after step.
    """
    check_adam_clip_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm)

    # pass 1: the one number every element needs
    total_norm = torch.linalg.vector_norm(grad)                       # 0-dim, grad's dtype
    g = grad
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)  # scale down only, never up
        g = grad * coef
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)                          # L2 penalty folded into the gradient

    # pass 2: element-wise
    exp_avg.lerp_(g, 1 - beta1)                                       # m + (1 - b1)(g - m) = b1 m + (1 - b1) g
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)            # b2 v + (1 - b2) g^2
    bias_correction1 = 1 - beta1 ** step                              # the moments start at 0, so early
    bias_correction2 = 1 - beta2 ** step                              # averages are too small by these
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)  # sqrt(v_hat) + eps
    param.addcdiv_(exp_avg, denom, value=-step_size)                  # p -= step_size * m / denom
    return total_norm
