"""The mLSTM: stabilised = unstabilised = parallel where all are finite; the write-up's form overflows."""

from __future__ import annotations

import pytest
import torch

from kernels.check import assert_close, compare, parameters_without_gradient, random_tensor
from refimpl.synapse import MLSTMLayer
from refimpl.ops import mlstm_parallel, mlstm_recurrent


def _inputs(B=2, T=29, H=3, Dk=6, Dv=5, gate_scale=3.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = random_tensor((B, T, H, Dk), dtype, generator=g), random_tensor((B, T, H, Dk), dtype, generator=g)
    v = random_tensor((B, T, H, Dv), dtype, generator=g)
    i_pre = random_tensor((B, T, H), dtype, generator=g, scale=gate_scale)
    f_pre = random_tensor((B, T, H), dtype, generator=g, scale=gate_scale)
    return q, k, v, i_pre, f_pre


@pytest.mark.parametrize("gate_scale", [1.0, 3.0], ids=["gates~N(0,1)", "gates~N(0,9)"])
def test_stabilised_unstabilised_and_parallel_agree(gate_scale):
    args = _inputs(gate_scale=gate_scale)
    h_stable, _ = mlstm_recurrent(*args)
    h_raw, _ = mlstm_recurrent(*args, stabilised=False)
    assert_close(h_raw, h_stable, "unstabilised vs stabilised (fp64, no overflow yet)")
    assert_close(mlstm_parallel(*args), h_stable, "parallel vs step loop")


def test_input_gates_at_plus_minus_20():
    q, k, v, _, f_pre = _inputs(T=17)
    i_pre = 20.0 * torch.sign(torch.randn(2, 17, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    h_stable, _ = mlstm_recurrent(q, k, v, i_pre, f_pre)
    assert torch.isfinite(h_stable).all()
    assert_close(mlstm_parallel(q, k, v, i_pre, f_pre), h_stable, "parallel vs step loop, i~ = +-20")


def test_carried_state_equals_one_shot():
    q, k, v, i_pre, f_pre = _inputs()
    h, state = mlstm_recurrent(q, k, v, i_pre, f_pre)
    h1, s1 = mlstm_recurrent(q[:, :11], k[:, :11], v[:, :11], i_pre[:, :11], f_pre[:, :11])
    h2, s2 = mlstm_recurrent(q[:, 11:], k[:, 11:], v[:, 11:], i_pre[:, 11:], f_pre[:, 11:], s1)
    assert_close(torch.cat([h1, h2], dim=1), h, "outputs, split at 11")
    for name, got, want in zip("Cnm", s2, state):
        assert_close(got, want, f"state {name}")


def test_the_write_ups_cell_overflows_where_the_stabilised_one_does_not():
    """fp32, forget-gate pre-activation 1 (the write-up's bias), input gate 0: C grows like e^t."""
    T = 120
    q, k, v = (random_tensor((1, T, 1, 4), generator=torch.Generator().manual_seed(s)) for s in range(3))
    i_pre, f_pre = torch.zeros(1, T, 1), torch.ones(1, T, 1)
    h_stable, _ = mlstm_recurrent(q, k, v, i_pre, f_pre)
    h_raw, _ = mlstm_recurrent(q, k, v, i_pre, f_pre, stabilised=False, gate_clamp=20.0)
    broken = (~torch.isfinite(h_raw)).flatten(2).any(-1)[0].nonzero()
    assert len(broken) > 0, "the unstabilised cell should overflow within 120 steps"
    first = int(broken[0])
    assert 80 <= first <= 95                                   # e^t passes float32's 3.4e38 near t = 88
    assert torch.isfinite(h_stable).all()
    early = first - 30                                         # well before overflow, the two agree in fp32
    assert compare(h_raw[:, :early], h_stable[:, :early]).passed


def test_layer_state_causality_and_gradients():
    torch.manual_seed(0)
    layer = MLSTMLayer(16, hidden=24, n_heads=4).double()
    x = torch.randn(2, 15, 16, dtype=torch.float64, requires_grad=True)
    full = layer(x)
    state = []
    pieces = [layer(x[:, a:b], state) for a, b in [(0, 6), (6, 7), (7, 15)]]
    assert_close(torch.cat(pieces, dim=1), full, "in pieces vs one call")
    x2 = x.detach().clone()
    x2[:, 8] += 1.0
    assert_close(layer(x2)[:, :8], full[:, :8], "outputs before the change")
    full.sum().backward()
    assert not parameters_without_gradient(layer)
    assert layer.last_introspection["cell_norm"].shape == (2, 4)


def test_bad_arguments_are_value_errors():
    q, k, v, i_pre, f_pre = _inputs()
    with pytest.raises(ValueError, match=r"i_pre must be \[B, T, H\]"):
        mlstm_recurrent(q, k, v, i_pre[:, :3], f_pre)
    with pytest.raises(ValueError, match="initial_state [Cnm] must be"):
        mlstm_recurrent(q, k, v, i_pre, f_pre, (torch.zeros(1), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MLSTMLayer(16, hidden=10, n_heads=4)


def test_parallel_form_returns_the_step_loops_final_state():
    args = _inputs(gate_scale=3.0)
    _, (C, n, m) = mlstm_recurrent(*args)
    h_par, (C_par, n_par, m_par) = mlstm_parallel(*args, return_state=True)
    for got, want, name in ((C_par, C, "C"), (n_par, n, "n"), (m_par, m, "m")):
        assert_close(got, want, f"final {name}, parallel vs step loop")


def test_layer_parallel_path_equals_the_step_loop_path():
    """No state held: the parallel form. A held state (zeros): the step loop. Same outputs, same state."""
    torch.manual_seed(0)
    layer = MLSTMLayer(dim=12, hidden=12, n_heads=3).double()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    fresh = []
    y_parallel = layer(x, fresh)                                            # empty list: parallel, state stored
    zeros = [(torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64),
              torch.zeros(2, 3, dtype=torch.float64))]
    y_loop = layer(x, zeros)
    assert_close(y_parallel, y_loop, "layer: parallel vs step loop")
    for got, want in zip(fresh[0], zeros[0]):
        assert_close(got, want, "layer state")


def test_forget_gate_choice():
    """"exp" (as written) keeps exp(f~) > 1 at its bias of 1; "sigmoid" keeps sigmoid(f~) < 1, fed in as log f."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    as_written = MLSTMLayer(12, 12, 3).double()
    assert torch.allclose(as_written.gates.bias[3:], torch.ones(3, dtype=torch.float64))
    forgetting = MLSTMLayer(12, 12, 3, forget_gate="sigmoid").double()
    forgetting(x)
    log_f = forgetting.last_introspection["log_forget_gate"]
    assert (log_f < 0).all()                                               # the memory shrinks every token
    i_pre, f_pre = forgetting.gates(x).chunk(2, dim=-1)
    assert torch.allclose(log_f, torch.nn.functional.logsigmoid(f_pre))
    with pytest.raises(ValueError, match="forget_gate must be one of"):
        MLSTMLayer(12, 12, 3, forget_gate="tanh")
