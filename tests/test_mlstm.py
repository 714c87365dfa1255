"""The mLSTM layer: carried state, causality, gradients, the parallel path = the step-loop path, the forget gate.
(The mLSTM op's own tests, stabilised = unstabilised = parallel: tests/ops/test_mlstm.py.)"""

from __future__ import annotations

import pytest
import torch

from kernels.check import assert_close, parameters_without_gradient
from refimpl.synapse import MLSTMLayer


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
