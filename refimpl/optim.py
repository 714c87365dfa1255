"""FlatAdam: an optimiser that takes one fused Adam-with-clipping step for the whole model.

`FlatAdam` calls the op `refimpl.ops.adam_clip_step` (clip the gradient norm, then Adam, on four flat
buffers; its equations are in its file) once per step for the whole model. At construction
it copies every parameter into one contiguous buffer and re-points each `p.data` (and `p.grad`)
to its slice, so the model trains as before while the optimiser sees four flat vectors: one
kernel launch (per pass) for the whole model instead of a few per parameter tensor. DeepSpeed's
ZeRO optimisers keep parameters in flat contiguous buffers for the same reason; apex's fused
optimisers get a similar effect by handing lists of tensors to one "multi-tensor apply" launch.
Its caveats are in the class docstring.

Does not include: AdamW's decoupled weight decay, AMSGrad, `maximize`, mixed-precision master
weights, or per-group hyperparameters (one group: every parameter gets the same lr and decay).
"""

from __future__ import annotations

from numbers import Integral

import torch

from refimpl import ops
from refimpl.ops.contract import fail


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
    `with kernels.use("numba"):` (which rebinds `refimpl.ops.adam_clip_step`) runs a kernel.

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
            fail("FlatAdam: pass a non-empty iterable of parameter tensors "
                  "(one group; dicts of groups are not supported)")
        if len({id(p) for p in params}) != len(params):
            fail("FlatAdam: a parameter appears twice (tied weights: pass it once)")
        first = params[0]
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                fail(f"FlatAdam: parameter {i} must be a floating-point tensor, got {getattr(p, 'dtype', type(p))}")
            if p.dtype != first.dtype or p.device != first.device:
                fail(f"FlatAdam: all parameters must share one dtype and device (one flat buffer); parameter {i} "
                      f"is {p.dtype} on {p.device}, parameter 0 is {first.dtype} on {first.device}")
            if not p.requires_grad:
                fail(f"FlatAdam: parameter {i} does not require a gradient; leave frozen parameters out")
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
            fail("FlatAdam: parameters are fixed at construction (they live in one flat buffer); "
                  "make a new FlatAdam to add some")
        super().add_param_group(param_group)

    def _check_hyperparameters(self) -> dict:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        # the op's own check, on a one-element dummy, so the messages are the same as a step's would be
        dummies = [torch.zeros(1) for _ in range(4)]
        ops.check_adam_clip_args(*dummies, 1, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                             group["max_norm"])
        return group

    def _check_views(self) -> None:
        """Every parameter and gradient must still be its slice of the flat buffers."""
        param_base, grad_base = self.flat_param.data_ptr(), self.flat_grad.data_ptr()
        size = self.flat_param.element_size()
        for i, (p, start, end) in enumerate(self._slices):
            if p.data_ptr() != param_base + start * size or p.numel() != end - start or not p.is_contiguous():
                fail(f"FlatAdam: parameter {i} {list(p.shape)} no longer lives in the flat buffer (was it moved, "
                      "e.g. with model.to(...), or its .data replaced?); make the FlatAdam after moving the model")
            g = p.grad
            if g is None or g.data_ptr() != grad_base + start * size or g.shape != p.shape or not g.is_contiguous():
                what = "is None" if g is None else "was replaced by a tensor that is not its view of the flat buffer"
                fail(f"FlatAdam: the gradient of parameter {i} {list(p.shape)} {what}; clear gradients with "
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
        # `ops.adam_clip_step` is looked up in refimpl.ops now, not bound at import:
        # kernels.use(...) swaps a kernel in by rebinding refimpl.ops.adam_clip_step.
        self.last_norm = ops.adam_clip_step(self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq,
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
                fail(f"FlatAdam.load_state_dict: missing {key!r}; expected what FlatAdam.state_dict() returns")
        N = self.flat_param.shape[0]
        for key in ("exp_avg", "exp_avg_sq"):
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N,):
                fail(f"FlatAdam.load_state_dict: {key} must be a tensor [N] = [{N}], "
                      f"got {list(getattr(t, 'shape', [])) or type(t).__name__}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            fail(f"FlatAdam.load_state_dict: step must be an int >= 0, got {step!r}")
        with torch.no_grad():
            self.exp_avg.copy_(state_dict["exp_avg"])
            self.exp_avg_sq.copy_(state_dict["exp_avg_sq"])
        self.step_count = int(step)
        hyper = dict(state_dict.get("hyperparameters", {}))
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        self.param_groups[0].update({k: v for k, v in hyper.items() if k in self.defaults})
        self._check_hyperparameters()
