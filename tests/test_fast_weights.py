"""Fast-weight memory: step loop = parallel form, carried state, trainable, no leaks between batch elements."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.check import assert_close, parameters_without_gradient, random_tensor
from refimpl.synapse import FastWeightMemory
from refimpl.ops import fast_weight_memory_parallel, fast_weight_memory_recurrent


def _inputs(B=2, T=23, H=3, Dk=5, Dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(random_tensor(shape, torch.float64, generator=g)
                 for shape in ((B, T, H, Dk), (B, T, H, Dk), (B, T, H, Dv), (B, T, H)))


@pytest.mark.parametrize("decay", [0.0, 0.95, 1.0], ids=["decay0", "decay0.95", "decay1"])
def test_parallel_form_equals_step_loop(decay):
    q, k, v, gate = _inputs()
    W0 = random_tensor((2, 3, 5, 4), torch.float64, generator=torch.Generator().manual_seed(9))
    r_ref, W_ref = fast_weight_memory_recurrent(q, k, v, gate, decay, 0.1, W0)
    r, W = fast_weight_memory_parallel(q, k, v, gate, decay, 0.1, W0)
    assert_close(r, r_ref, "reads")
    assert_close(W, W_ref, "final memory")


def test_carried_state_equals_one_shot():
    q, k, v, gate = _inputs()
    r, W = fast_weight_memory_recurrent(q, k, v, gate)
    r1, W1 = fast_weight_memory_recurrent(q[:, :9], k[:, :9], v[:, :9], gate[:, :9])
    r2, W2 = fast_weight_memory_recurrent(q[:, 9:], k[:, 9:], v[:, 9:], gate[:, 9:], initial_state=W1)
    assert_close(torch.cat([r1, r2], dim=1), r, "reads, split at 9")
    assert_close(W2, W, "memory, split at 9")


def test_a_stored_pair_fades_as_decay_to_the_delta():
    """Write (k, v) once, read with q = k after `gap` tokens of nothing: r = decay^(gap-1) * 0.1 * sigmoid(g) |k|^2 v."""
    k = torch.zeros(1, 30, 1, 4, dtype=torch.float64)
    k[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    v = torch.zeros(1, 30, 1, 2, dtype=torch.float64)
    v[0, 0, 0] = torch.tensor([2.0, -1.0])
    gate = torch.full((1, 30, 1), -1e9, dtype=torch.float64)     # no writes ...
    gate[0, 0, 0] = 0.0                                           # ... except the first, with sigmoid(0) = 1/2
    q = k[:, :1].expand(1, 30, 1, 4)
    reads, _ = fast_weight_memory_recurrent(q, k, v, gate)
    for gap in (1, 20):
        assert math.isclose(reads[0, gap, 0, 0].item(), 0.95 ** (gap - 1) * 0.1 * 0.5 * 2.0, rel_tol=1e-12)


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
