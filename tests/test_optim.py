"""refimpl.optim: the fused Adam + clipping step and FlatAdam, against torch's own optimiser.

`adam_clip_step` on one flat buffer must do exactly what `torch.nn.utils.clip_grad_norm_` followed by
`torch.optim.Adam(...).step()` do on the same numbers split over several tensors: in float64 the two
agree to ~1e-15 step after step, so the comparisons use atol = rtol = 1e-12 (tighter than the book's
float64 tolerance). The runs clip on some steps and not on others, with and without weight decay,
and with no clipping at all. FlatAdam trains a small network exactly as torch does, keeps every
`.grad` a view of its flat buffer, and refuses what would silently break that.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kernels.check import assert_close, random_tensor
from kernel_testing import one_torch_thread  # noqa: F401 (an autouse fixture: one torch thread)
from refimpl import ops, optim

TIGHT = dict(atol=1e-12, rtol=1e-12)
SHAPES = [(3, 4), (5,), (2, 1, 3), (1,)]                  # a few parameter tensors, 24 numbers in all


def _numbers(steps, seed=0):
    """Initial parameter values [24] and `steps` gradients [24], each step's with its own size (e^-1.5 .. e^1.5)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(torch.Size(s).numel() for s in SHAPES)
    start = random_tensor((N,), torch.float64, generator=g)
    sizes = torch.exp(3 * torch.rand(steps, generator=g, dtype=torch.float64) - 1.5)
    return start, [random_tensor((N,), torch.float64, generator=g) * s for s in sizes]


def _split(flat):
    """A flat [24] vector as tensors of SHAPES (copies)."""
    out, start = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        out.append(flat[start:start + n].reshape(shape).clone())
        start += n
    return out


def _flatten(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------- the op against torch.optim.Adam

@pytest.mark.parametrize("foreach", [False, None], ids=["foreach=False", "foreach=default"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd0.05"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_adam_clip_step_equals_clip_grad_norm_then_torch_adam(clip, weight_decay, foreach):
    steps, lr, betas, eps = 100, 1e-2, (0.9, 0.999), 1e-8
    start, grads = _numbers(steps)
    norms = torch.stack([g.norm() for g in grads])
    max_norm = float(norms.median()) if clip else None
    if clip:
        assert 0 < int((norms > max_norm).sum()) < steps          # clips on some steps, not on others

    # torch: several tensors, clip_grad_norm_ then Adam
    params = [torch.nn.Parameter(t) for t in _split(start)]
    torch_adam = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    # the op: one flat buffer each
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)

    for t, grad in enumerate(grads, start=1):
        for p, g in zip(params, _split(grad)):
            p.grad = g
        if clip:
            expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            expected_norm = torch.linalg.vector_norm(_flatten([p.grad for p in params]))
        torch_adam.step()

        grad_before = grad.clone()
        norm = ops.adam_clip_step(param, grad, exp_avg, exp_avg_sq, step=t, lr=lr, beta1=betas[0],
                                    beta2=betas[1], eps=eps, weight_decay=weight_decay, max_norm=max_norm)
        assert torch.equal(grad, grad_before), "grad must not be modified"
        assert norm.dim() == 0 and norm.dtype == torch.float64
        assert_close(norm, expected_norm, f"step {t}: norm", **TIGHT)
        assert_close(param, _flatten([p.detach() for p in params]), f"step {t}: params", **TIGHT)
    states = [torch_adam.state[p] for p in params]
    assert_close(exp_avg, _flatten([s["exp_avg"] for s in states]), "exp_avg after 100 steps", **TIGHT)
    assert_close(exp_avg_sq, _flatten([s["exp_avg_sq"] for s in states]), "exp_avg_sq after 100 steps", **TIGHT)


def test_adam_clip_step_zero_gradient_is_not_a_division_by_zero():
    param, zero = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    norm = ops.adam_clip_step(param, zero, zero.clone(), zero.clone(), step=1, max_norm=1.0)
    assert float(norm) == 0.0 and torch.equal(param, torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------- FlatAdam training against torch

def _network(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 3)).double()


@pytest.mark.parametrize("weight_decay, max_norm", [(0.0, 0.15), (0.01, 0.15), (0.01, None)],
                         ids=["clip", "clip-wd", "noclip-wd"])
def test_flat_adam_trains_exactly_like_clip_grad_norm_and_torch_adam(weight_decay, max_norm):
    model, twin = _network(), _network()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = random_tensor((64, 7), torch.float64, generator=g)
    y = random_tensor((64, 3), torch.float64, generator=g)

    flat = optim.FlatAdam(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=weight_decay,
                          max_norm=max_norm)
    reference = torch.optim.Adam(twin.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=weight_decay)
    assert isinstance(flat, torch.optim.Optimizer)
    # an LR schedule, through param_groups as torch's schedulers (and book.train) set it
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 if s < 50 else 0.3) for o in (flat, reference)]
    clipped = 0
    for step in range(100):
        flat.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        flat.step()
        reference.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in twin.parameters()]))
        reference.step()
        for s in schedules:
            s.step()
        assert_close(flat.last_norm, norm, f"step {step}: the gradient norm", **TIGHT)
        clipped += max_norm is not None and float(norm) > max_norm
    if max_norm is not None:
        assert 0 < clipped < 100, f"clipping should be active on some steps only, was on {clipped}"
    assert flat.param_groups[0]["lr"] == pytest.approx(0.9e-3)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q, f"{name} after 100 steps", **TIGHT)


def test_flat_adam_lays_parameters_and_gradients_out_in_one_buffer():
    model = _network()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optim.FlatAdam(model.parameters())
    N = sum(p.numel() for p in model.parameters())
    assert opt.flat_param.shape == (N,) and opt.flat_grad.shape == (N,)
    start = 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)                                              # values kept
        assert p.data_ptr() == opt.flat_param[start:].data_ptr()              # the views, in order
        assert p.grad.data_ptr() == opt.flat_grad[start:].data_ptr()
        start += p.numel()


def test_flat_adam_zero_grad_keeps_the_views_and_backward_accumulates_into_them():
    model = _network()
    opt = optim.FlatAdam(model.parameters(), lr=1e-3)
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    x = random_tensor((5, 7), torch.float64, generator=torch.Generator().manual_seed(2))
    model(x).sum().backward()
    once = opt.flat_grad.clone()
    assert once.abs().sum() > 0
    model(x).sum().backward()                                                 # accumulates, in place
    assert_close(opt.flat_grad, 2 * once, "two backward passes")
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)                                # never None, always the views
        assert [p.grad.data_ptr() for p in model.parameters()] == pointers
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model(x).sum().backward()
    assert_close(opt.flat_grad, once, "after zero_grad")
    opt.step()                                                                # the views are still intact


def test_flat_adam_state_dict_round_trip_continues_the_same_run():
    model, x = _network(), random_tensor((9, 7), torch.float64, generator=torch.Generator().manual_seed(3))
    opt = optim.FlatAdam(model.parameters(), lr=1e-2, max_norm=1.0)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    train(model, opt, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert all(isinstance(saved_opt[k], torch.Tensor) for k in ("exp_avg", "exp_avg_sq"))
    assert saved_opt["step"] == 5
    train(model, opt, 5)

    resumed = _network(seed=9)
    resumed.load_state_dict(saved_model)
    resumed_opt = optim.FlatAdam(resumed.parameters(), lr=0.5)              # hyperparameters come from the dict
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2 and resumed_opt.param_groups[0]["max_norm"] == 1.0
    train(resumed, resumed_opt, 5)
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert_close(p, q, "resumed run", **TIGHT)


# ---------------------------------------------------------------- bad input

def test_adam_clip_step_bad_arguments_are_value_errors():
    p = torch.zeros(6)
    ok = dict(step=1)
    with pytest.raises(ValueError, match=r"grad must be \[N\] = \[6\], got \[5\]"):
        ops.adam_clip_step(p, p[:5], p.clone(), p.clone(), **ok)
    with pytest.raises(ValueError, match=r"param must be \[N\], got \[2, 3\]"):
        ops.adam_clip_step(p.view(2, 3), p, p, p, **ok)
    with pytest.raises(ValueError, match=r"grad must be a floating-point tensor \[N\], got torch.int64"):
        ops.adam_clip_step(p, torch.zeros(6, dtype=torch.long), p, p, **ok)
    with pytest.raises(ValueError, match="exp_avg must have param's dtype torch.float32, got torch.float64"):
        ops.adam_clip_step(p, p, p.double(), p, **ok)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        ops.adam_clip_step(p, p, p, torch.zeros(12)[::2], **ok)
    with pytest.raises(ValueError, match="every size must be >= 1, got N = 0"):
        ops.adam_clip_step(p[:0], p[:0], p[:0], p[:0], **ok)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        ops.adam_clip_step(p.clone(), p.clone(), p, p, **ok)
    buffer = torch.zeros(20)
    with pytest.raises(ValueError, match="param and grad share memory"):
        ops.adam_clip_step(buffer[:6], buffer[5:11], p.clone(), torch.zeros(6), **ok)   # overlapping by one
    ops.adam_clip_step(buffer[:6], buffer[6:12], buffer[12:18], torch.zeros(6), **ok)   # adjacent is fine
    for kwargs, message in [(dict(step=0), "step must be an int >= 1"), (dict(step=2.0), "step must be an int >= 1"),
                            (dict(step=True), "step must be an int >= 1"), (dict(step=1, lr=0), "lr must be > 0"),
                            (dict(step=1, lr=float("nan")), "lr must be a finite number"),
                            (dict(step=1, beta1=1.0), r"beta1 must be in \[0, 1\)"),
                            (dict(step=1, beta2=-0.1), "beta2 must be >= 0"),
                            (dict(step=1, eps=0.0), "eps must be > 0"),
                            (dict(step=1, weight_decay=-1e-3), "weight_decay must be >= 0"),
                            (dict(step=1, max_norm=0.0), "max_norm must be > 0")]:
        with pytest.raises(ValueError, match=message):
            ops.adam_clip_step(p, p.clone(), p.clone(), p.clone(), **kwargs)


def test_flat_adam_refuses_what_one_flat_buffer_cannot_hold():
    with pytest.raises(ValueError, match="non-empty iterable of parameter tensors"):
        optim.FlatAdam([])
    with pytest.raises(ValueError, match="dicts of groups are not supported"):
        optim.FlatAdam([{"params": _network().parameters()}])
    mixed = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    with pytest.raises(ValueError, match="one dtype and device.*parameter 1 is torch.float64"):
        optim.FlatAdam(mixed)
    frozen = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    with pytest.raises(ValueError, match="parameter 1 does not require a gradient"):
        optim.FlatAdam(frozen)
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="appears twice"):
        optim.FlatAdam([p, p])
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        optim.FlatAdam([p], max_norm=-1.0)
    opt = optim.FlatAdam(_network().parameters())
    with pytest.raises(ValueError, match="parameters are fixed at construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match=r"exp_avg must be a tensor \[N\]"):
        opt.load_state_dict({"step": 1, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)})


def test_flat_adam_step_refuses_gradients_cut_off_from_the_flat_buffer():
    model = _network()
    opt = optim.FlatAdam(model.parameters())
    x = torch.ones(2, 7, dtype=torch.float64)

    model.zero_grad()                                          # torch's default: every .grad set to None
    with pytest.raises(ValueError, match="gradient of parameter 0 .* is None.*model.zero_grad"):
        opt.step()
    opt = optim.FlatAdam(model.parameters())                   # re-flattened: views again
    model(x).sum().backward()
    model[2].bias.grad = model[2].bias.grad.clone()            # replaced by a tensor of its own
    with pytest.raises(ValueError, match="gradient of parameter 3 .* was replaced"):
        opt.step()
    opt = optim.FlatAdam(model.parameters())
    model[0].weight.data = model[0].weight.data.clone()        # the parameter itself moved out
    with pytest.raises(ValueError, match="parameter 0 .* no longer lives in the flat buffer"):
        opt.step()
