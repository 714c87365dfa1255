"""The fast-weight memory layer: trainable, no leaks between batch elements, memory only when carried, the parallel
path = the step-loop path. (The op's own tests, step loop = parallel form: tests/ops/test_fast_weight_memory.py.)"""

from __future__ import annotations

import torch

from kernels.check import assert_close, parameters_without_gradient
from refimpl.synapse import FastWeightMemory


def test_projections_get_gradients_and_batch_elements_do_not_leak():
    torch.manual_seed(0)
    memory = FastWeightMemory(12, n_heads=2, head_dim=4).double()
    x = torch.randn(3, 10, 12, dtype=torch.float64)
    y = memory(x)
    y.sum().backward()
    assert not parameters_without_gradient(memory)
    x2 = x.clone()
    x2[0] += 1.0                                                  # change batch element 0 only
    with torch.no_grad():
        assert_close(memory(x2)[1:], y[1:].detach(), "elements 1 and 2 are untouched")
    assert memory.last_introspection["head_utilisation"].shape == (3, 2)


def test_state_is_empty_unless_carried():
    torch.manual_seed(1)
    memory = FastWeightMemory(8, n_heads=2, head_dim=4).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        first, again = memory(x), memory(x)                       # no state passed: each call starts empty
        assert_close(again, first, "independent sequences do not share memory")
        state = []
        memory(x, state)
        assert not torch.allclose(memory(x, state), first)        # carried memory changes the reads


def test_layer_parallel_path_equals_the_step_loop_path():
    torch.manual_seed(0)
    layer = FastWeightMemory(dim=10, n_heads=2, head_dim=4).double()
    x = torch.randn(2, 13, 10, dtype=torch.float64)
    fresh, zeros = [], [torch.zeros(2, 2, 4, 4, dtype=torch.float64)]
    y_parallel, y_loop = layer(x, fresh), layer(x, zeros)
    torch.testing.assert_close(y_parallel, y_loop)
    torch.testing.assert_close(fresh[0], zeros[0])
