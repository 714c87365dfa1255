"""refimpl.optim: FlatAdam, against torch's own optimiser.

FlatAdam trains a small network exactly as `torch.nn.utils.clip_grad_norm_` followed by
`torch.optim.Adam(...).step()` do: in float64 the two agree to ~1e-15 step after step, so the
comparisons use atol = rtol = 1e-12 (tighter than the book's float64 tolerance). It keeps every
`.grad` a view of its flat buffer, and refuses what would silently break that. (The fused Adam +
clipping op it calls, `adam_clip_step`, against torch: tests/ops/test_adam_clip_step.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from kernels.check import assert_close, random_tensor
from kernel_testing import one_torch_thread  # noqa: F401 (an autouse fixture: one torch thread)
from refimpl import optim

TIGHT = dict(atol=1e-12, rtol=1e-12)


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
