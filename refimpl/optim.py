"""Adam with gradient clipping as one fused step on flat buffers, and an optimiser built on it.

Chapter 01's write-up (Sintellix, section 4.1) lists an "Adam update kernel" with "fused momentum
and adaptive learning rate computation, gradient clipping integrated"; its public code's Adam has
no clipping. This module is the plain-PyTorch ground truth for that kernel:

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

`FlatAdam` is an optimiser that calls this op once per step for the whole model. At construction
it copies every parameter into one contiguous buffer and re-points each `p.data` (and `p.grad`)
to its slice, so the model trains as before while the optimiser sees four flat vectors: one
kernel launch (per pass) for the whole model instead of a few per parameter tensor. DeepSpeed's
ZeRO optimisers keep parameters in flat contiguous buffers for the same reason; apex's fused
optimisers get a similar effect by handing lists of tensors to one "multi-tensor apply" launch.
Its caveats are in the class docstring.

Glossary: N elements in the flat buffers, t the step count (1 for the first step).

Does not include: AdamW's decoupled weight decay, AMSGrad, `maximize`, mixed-precision master
weights, or per-group hyperparameters (one group: every parameter gets the same lr and decay).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

#: what torch.nn.utils.clip_grad_norm_ adds to the norm before dividing (so a zero gradient is no 0/0)
CLIP_EPS = 1e-6


def _fail(message: str) -> None:
    raise ValueError(message)


def _expect_real(name: str, value, *, positive: bool = False, below_one: bool = False) -> None:
    """A finite real number; > 0 if `positive`, else >= 0; < 1 if `below_one`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        _fail(f"adam_clip_step: {name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        _fail(f"adam_clip_step: {name} must be > 0, got {value!r}")
    if not positive and not value >= 0:
        _fail(f"adam_clip_step: {name} must be >= 0, got {value!r}")
    if below_one and not value < 1:
        _fail(f"adam_clip_step: {name} must be in [0, 1), got {value!r}")


def check_adam_clip_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                         max_norm) -> int:
    """Validate `adam_clip_step`'s arguments; return the flat length N.

    The four tensors: 1-D, one length N >= 1, one floating-point dtype, one device, contiguous
    (the kernels write through raw pointers, so a strided view would be updated in the wrong places,
    and a silent contiguous copy would be updated and thrown away), and no two overlapping in memory.
    """
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"adam_clip_step: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            _fail(f"adam_clip_step: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1:
            _fail(f"adam_clip_step: {name} must be a flat 1-D buffer [N], got shape {list(t.shape)}")
    N = param.shape[0]
    if N < 1:
        _fail("adam_clip_step: the buffers are empty; N must be >= 1")
    for name, t in tensors.items():
        if t.shape[0] != N:
            _fail(f"adam_clip_step: {name} must have shape [N] = [{N}] like param, got {list(t.shape)}")
        if t.dtype != param.dtype:
            _fail(f"adam_clip_step: {name} must have param's dtype {param.dtype}, got {t.dtype}")
        if t.device != param.device:
            _fail(f"adam_clip_step: {name} must be on param's device {param.device}, got {t.device}")
        if not t.is_contiguous():
            _fail(f"adam_clip_step: {name} must be contiguous (it is updated in place through its memory); "
                  f"got stride {t.stride()}")
    names = list(tensors)
    for i, a in enumerate(names):                      # an update written into grad or into the other moment
        for b in names[i + 1:]:                        # would be read back as input: refuse overlaps
            ta, tb = tensors[a], tensors[b]
            start_a, start_b = ta.data_ptr(), tb.data_ptr()
            if start_a < start_b + N * tb.element_size() and start_b < start_a + N * ta.element_size():
                _fail(f"adam_clip_step: {a} and {b} share memory; the four buffers must be separate")
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 1:
        _fail(f"adam_clip_step: step must be an int >= 1 (1 for the first step), got {step!r}")
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


class FlatAdam(torch.optim.Optimizer):
    """Adam (+ optional gradient clipping) over all parameters as ONE flat buffer: one `adam_clip_step` per step.

        opt = FlatAdam(model.parameters(), lr=1e-3, max_norm=1.0)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()                 # = clip_grad_norm_(params, 1.0); Adam(params, lr=1e-3).step()
            opt.last_norm              # the gradient norm before clipping (0-dim tensor)

    How. At construction the parameters' values are copied into one contiguous buffer `flat_param`
    [N] and each `p.data` is re-pointed to its slice of it (`p.data = flat_param[a:b].view(p.shape)`);
    likewise each `p.grad` is set to its slice of one buffer `flat_grad`. Autograd accumulates into
    an existing `.grad` in place, so after `backward()` the whole model's gradient sits in
    `flat_grad`, and one call on four flat vectors updates every parameter. On a GPU that is one
    reduction launch and one update launch for the whole model instead of a few per tensor (as
    DeepSpeed's flat parameter buffers; apex reaches the same with multi-tensor-apply launches).

    `step()` calls `adam_clip_step` through this module's globals at call time, so
    `with kernels.use("numba"):` (which rebinds `refimpl.optim.adam_clip_step`) runs a kernel.

    Caveats (checked where they can be, with a ValueError saying what to do):
      * every parameter must have one dtype and one device, and require a gradient (a frozen
        parameter would still be moved by its momentum and weight decay: leave it out instead);
      * `zero_grad()` zeroes `flat_grad` in place and never sets grads to None (`set_to_none` is
        accepted for loops written for torch optimisers, and ignored). Anything that replaces a
        `.grad` with a tensor of its own, e.g. `model.zero_grad()` (which sets them to None, so the
        next backward makes fresh ones), or that moves a parameter (`model.to(...)`), cuts it off
        from the flat buffers; `step()` notices and refuses rather than skip that parameter;
      * every parameter always has a gradient (zeros if nothing flowed into it), so a parameter
        unused in a step is still moved by its momentum and weight decay: torch's Adam does the
        same with `zero_grad(set_to_none=False)`, but skips it under the default set_to_none=True;
      * one parameter group (one lr, betas, ...); the LR can be changed through
        `param_groups[0]["lr"]`, as schedulers and book.train do.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_norm: float | None = None):
        params = list(params)
        if not params or isinstance(params[0], dict):
            _fail("FlatAdam: pass a non-empty iterable of parameter tensors "
                  "(one group; dicts of groups are not supported)")
        if len({id(p) for p in params}) != len(params):
            _fail("FlatAdam: a parameter appears twice (tied weights: pass it once)")
        first = params[0]
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                _fail(f"FlatAdam: parameter {i} must be a floating-point tensor, got {getattr(p, 'dtype', type(p))}")
            if p.dtype != first.dtype or p.device != first.device:
                _fail(f"FlatAdam: all parameters must share one dtype and device (one flat buffer); parameter {i} "
                      f"is {p.dtype} on {p.device}, parameter 0 is {first.dtype} on {first.device}")
            if not p.requires_grad:
                _fail(f"FlatAdam: parameter {i} does not require a gradient; leave frozen parameters out")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_norm=max_norm)
        super().__init__(params, defaults)                          # one param group (via add_param_group)
        self._check_hyperparameters()

        # one buffer each for parameters, gradients and the two moments
        N = sum(p.numel() for p in params)
        self.flat_param = torch.empty(N, dtype=first.dtype, device=first.device)
        self.flat_grad = torch.zeros_like(self.flat_param)
        self.exp_avg = torch.zeros_like(self.flat_param)
        self.exp_avg_sq = torch.zeros_like(self.flat_param)
        self.step_count = 0
        self.last_norm: torch.Tensor | None = None
        self._slices: list[tuple[torch.Tensor, int, int]] = []       # (parameter, start, end) in the flat buffers
        start = 0
        with torch.no_grad():
            for p in params:
                end = start + p.numel()
                self.flat_param[start:end].copy_(p.reshape(-1))             # row-major, whatever p's strides were
                if p.grad is not None:
                    self.flat_grad[start:end].copy_(p.grad.reshape(-1))     # keep a gradient already accumulated
                p.data = self.flat_param[start:end].view(p.shape)
                p.grad = self.flat_grad[start:end].view(p.shape)
                self._slices.append((p, start, end))
                start = end

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:                                       # the one group exists already
            _fail("FlatAdam: parameters are fixed at construction (they live in one flat buffer); "
                  "make a new FlatAdam to add some")
        super().add_param_group(param_group)

    def _check_hyperparameters(self) -> dict:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        # the op's own check, on a one-element dummy, so the messages are the same as a step's would be
        dummies = [torch.zeros(1) for _ in range(4)]
        check_adam_clip_args(*dummies, 1, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                             group["max_norm"])
        return group

    def _check_views(self) -> None:
        """Every parameter and gradient must still be its slice of the flat buffers."""
        param_base, grad_base = self.flat_param.data_ptr(), self.flat_grad.data_ptr()
        size = self.flat_param.element_size()
        for i, (p, start, end) in enumerate(self._slices):
            if p.data_ptr() != param_base + start * size or p.numel() != end - start or not p.is_contiguous():
                _fail(f"FlatAdam: parameter {i} {list(p.shape)} no longer lives in the flat buffer (was it moved, "
                      "e.g. with model.to(...), or its .data replaced?); make the FlatAdam after moving the model")
            g = p.grad
            if g is None or g.data_ptr() != grad_base + start * size or g.shape != p.shape or not g.is_contiguous():
                what = "is None" if g is None else "was replaced by a tensor that is not its view of the flat buffer"
                _fail(f"FlatAdam: the gradient of parameter {i} {list(p.shape)} {what}; clear gradients with "
                      "this optimiser's zero_grad() (model.zero_grad() sets them to None) and do not assign .grad")

    @torch.no_grad()
    def step(self, closure=None):
        """One clipped Adam step on the flat buffers; returns closure() if given (as torch optimisers do)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_views()
        group = self.param_groups[0]                      # (adam_clip_step checks the values)
        self.step_count += 1
        beta1, beta2 = group["betas"]
        # `adam_clip_step` is looked up in this module's globals now, not bound at import:
        # kernels.use(...) swaps a kernel in by rebinding refimpl.optim.adam_clip_step.
        self.last_norm = adam_clip_step(self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq,
                                        step=self.step_count, lr=group["lr"], beta1=beta1, beta2=beta2,
                                        eps=group["eps"], weight_decay=group["weight_decay"],
                                        max_norm=group["max_norm"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient at once (the flat buffer, in place; `set_to_none` is ignored: see the class notes)."""
        self.flat_grad.zero_()

    def state_dict(self) -> dict:
        """{"step": int, "exp_avg": [N], "exp_avg_sq": [N], "hyperparameters": {...}}: the flat moments as
        tensors (references, as torch optimisers return), no per-parameter entries. The parameters
        themselves are saved with the model."""
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "hyperparameters": hyper}

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a `state_dict()` back in (into the existing buffers, so the flat layout is kept)."""
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key not in state_dict:
                _fail(f"FlatAdam.load_state_dict: missing {key!r}; expected what FlatAdam.state_dict() returns")
        N = self.flat_param.shape[0]
        for key in ("exp_avg", "exp_avg_sq"):
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N,):
                _fail(f"FlatAdam.load_state_dict: {key} must be a tensor [N] = [{N}], "
                      f"got {list(getattr(t, 'shape', [])) or type(t).__name__}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            _fail(f"FlatAdam.load_state_dict: step must be an int >= 0, got {step!r}")
        with torch.no_grad():
            self.exp_avg.copy_(state_dict["exp_avg"])
            self.exp_avg_sq.copy_(state_dict["exp_avg_sq"])
        self.step_count = int(step)
        hyper = dict(state_dict.get("hyperparameters", {}))
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        self.param_groups[0].update({k: v for k, v in hyper.items() if k in self.defaults})
        self._check_hyperparameters()
