"""3D neighbourhood attention (chapter 01): the padded-and-shifted op equals dense attention with a
neighbourhood mask, values and gradients; the neighbourhood is the (2r + 1)^3 cube with no
wrap-around (8 / 12 / 18 / 27 neighbours at r = 1); a neuron reads exactly its neighbours; bad
arguments are ValueErrors naming what was expected."""

from __future__ import annotations

import pytest
import torch

from refimpl.ops import check_neighbourhood_attention_args, neighbour_count, neighbourhood_attention, neighbourhood_attention_dense, neighbourhood_mask

FP64 = dict(atol=1e-12, rtol=1e-10)


def _qkv(B, X, Y, Z, H, D, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, X, Y, Z, H, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
                 for _ in range(3))


GRIDS = {"1x1x1": (1, 1, 1), "3x1x5": (3, 1, 5), "4x4x4": (4, 4, 4), "2x3x4": (2, 3, 4), "1x6x1": (1, 6, 1)}


# ---------------------------------------------------------------- the op equals dense masked attention

@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_neighbourhood_attention_equals_dense_masked_attention(grid, radius):
    q, k, v = _qkv(2, *grid, H=3, D=5)
    torch.testing.assert_close(neighbourhood_attention(q, k, v, radius), neighbourhood_attention_dense(q, k, v, radius),
                               **FP64)


def test_a_radius_past_the_grid_is_full_attention():
    q, k, v = _qkv(1, 2, 3, 2, H=2, D=4, seed=1)
    out = neighbourhood_attention(q, k, v, radius=5)
    B, X, Y, Z, H, D = q.shape
    flat = [t.reshape(B, -1, H, D).transpose(1, 2) for t in (q, k, v)]        # [B, H, N, D]
    full = torch.nn.functional.scaled_dot_product_attention(*flat)          # no mask: every neuron
    torch.testing.assert_close(out, full.transpose(1, 2).reshape(q.shape), **FP64)


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 1, 5), (4, 4, 4)], ids=["1x1x1", "3x1x5", "4x4x4"])
def test_radius_zero_attends_only_to_itself(grid):
    q, k, v = _qkv(2, *grid, H=2, D=3, seed=2)
    assert torch.equal(neighbourhood_attention(q, k, v, radius=0), v)       # softmax over one key is 1
    assert torch.equal(neighbourhood_attention_dense(q, k, v, radius=0), v)


def test_default_radius_is_one():
    q, k, v = _qkv(1, 3, 3, 3, H=1, D=2, seed=3)
    torch.testing.assert_close(neighbourhood_attention(q, k, v), neighbourhood_attention_dense(q, k, v, 1), **FP64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_keeps_the_dtype_and_is_close(dtype):
    q, k, v = _qkv(1, 3, 2, 4, H=2, D=8, seed=4)
    out = neighbourhood_attention(*(t.to(dtype) for t in (q, k, v)), radius=1)
    assert out.dtype == dtype
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]
    torch.testing.assert_close(out.double(), neighbourhood_attention(q, k, v, radius=1), **tol)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("grid, radius", [((3, 1, 5), 1), ((2, 3, 4), 2), ((1, 1, 1), 1), ((4, 4, 4), 1)],
                         ids=["3x1x5-r1", "2x3x4-r2", "1x1x1-r1", "4x4x4-r1"])
def test_gradients_equal_dense_masked_attention(grid, radius):
    q, k, v = _qkv(2, *grid, H=2, D=3, seed=5, requires_grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad((neighbourhood_attention(q, k, v, radius) * weight).sum(), (q, k, v))
    dense_grads = torch.autograd.grad((neighbourhood_attention_dense(q, k, v, radius) * weight).sum(), (q, k, v))
    for name, got, expected in zip("qkv", grads, dense_grads):
        assert got.isfinite().all(), f"d/d{name} has inf or NaN (masked positions leaking into the backward?)"
        torch.testing.assert_close(got, expected, **FP64, msg=lambda m: f"d/d{name}: {m}")


def test_gradcheck_on_a_tiny_grid():
    q, k, v = _qkv(1, 2, 1, 3, H=1, D=2, seed=7, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: neighbourhood_attention(q, k, v, 1), (q, k, v))


# ---------------------------------------------------------------- the neighbourhood

def test_neighbour_counts_at_radius_one():
    counts = neighbour_count(5, 4, 6, radius=1)
    assert counts.shape == (5, 4, 6) and counts.dtype == torch.int64
    assert counts[0, 0, 0] == 8 and counts[4, 3, 5] == 8                    # corners
    assert counts[2, 0, 0] == 12 and counts[0, 1, 5] == 12                  # edges
    assert counts[2, 1, 0] == 18 and counts[0, 2, 3] == 18                  # face centres
    assert counts[2, 2, 3] == 27                                            # interior
    c3 = neighbour_count(3, 3, 3, radius=1)
    assert sorted(c3.flatten().tolist()) == [8] * 8 + [12] * 12 + [18] * 6 + [27]


@pytest.mark.parametrize("grid, radius", [((3, 3, 3), 1), ((5, 4, 6), 1), ((5, 4, 6), 2), ((1, 7, 2), 3),
                                          ((3, 1, 5), 0)])
def test_neighbour_count_equals_the_mask_row_sums(grid, radius):
    counts = neighbour_count(*grid, radius)
    assert torch.equal(counts.flatten(), neighbourhood_mask(*grid, radius).sum(dim=1))


def test_the_mask_is_symmetric_row_major_and_does_not_wrap():
    X, Y, Z = 4, 3, 5
    mask = neighbourhood_mask(X, Y, Z, 1)
    assert mask.shape == (60, 60) and mask.dtype == torch.bool
    assert torch.equal(mask, mask.T) and mask.diagonal().all()

    def n(x, y, z):
        return (x * Y + y) * Z + z

    assert mask[n(0, 0, 0), n(1, 1, 1)]                    # diagonal neighbour
    assert not mask[n(0, 0, 0), n(2, 0, 0)]                # two steps away
    assert not mask[n(0, 1, 2), n(X - 1, 1, 2)]            # the far face: no wrap-around in x
    assert not mask[n(1, 1, 0), n(1, 1, Z - 1)]            # nor in z


def _neighbours_changed(radius, where, changed_at, seed=8):
    """Output at neuron `where` before and after changing k and v at neuron `changed_at`."""
    q, k, v = _qkv(2, 4, 3, 5, H=2, D=3, seed=seed)
    before = neighbourhood_attention(q, k, v, radius)
    k2, v2 = k.clone(), v.clone()
    k2[:, changed_at[0], changed_at[1], changed_at[2]] += 1.0
    v2[:, changed_at[0], changed_at[1], changed_at[2]] -= 2.0
    after = neighbourhood_attention(q, k2, v2, radius)
    x, y, z = where
    return before[:, x, y, z], after[:, x, y, z]


@pytest.mark.parametrize("where, outside, radius", [
    ((0, 0, 0), (2, 0, 0), 1),          # two steps along x from a corner
    ((0, 1, 2), (3, 1, 2), 1),          # the opposite face: what a wrap-around would see
    ((1, 1, 0), (1, 1, 4), 1),          # likewise along z
    ((2, 1, 2), (2, 1, 4), 1),          # interior, two steps along z
    ((0, 0, 0), (3, 2, 3), 2),          # outside the r = 2 cube in x and z
])
def test_a_neuron_outside_the_neighbourhood_does_not_change_the_output(where, outside, radius):
    before, after = _neighbours_changed(radius, where, outside)
    assert torch.equal(before, after)


@pytest.mark.parametrize("where, inside, radius", [
    ((0, 0, 0), (1, 1, 1), 1),          # the diagonal corner of the corner's cube
    ((2, 1, 2), (3, 2, 3), 1),
    ((0, 1, 2), (0, 1, 2), 1),          # itself
    ((0, 0, 0), (2, 2, 2), 2),
])
def test_a_neuron_inside_the_neighbourhood_changes_the_output(where, inside, radius):
    before, after = _neighbours_changed(radius, where, inside)
    assert ((before - after).abs().amax(dim=-1) > 1e-6).all()   # every batch row and head moved


# ---------------------------------------------------------------- bad input

def test_check_returns_the_sizes():
    q, k, v = _qkv(2, 3, 1, 5, H=4, D=6)
    assert check_neighbourhood_attention_args(q, k, v, 1) == (2, 3, 1, 5, 4, 6)


@pytest.mark.parametrize("op", [neighbourhood_attention, neighbourhood_attention_dense])
def test_bad_inputs_are_value_errors(op):
    q, k, v = _qkv(1, 2, 3, 2, H=2, D=4)
    shape = r"\[B, X, Y, Z, H, D\]"
    with pytest.raises(ValueError, match=f"k must be a floating-point tensor {shape}, got list"):
        op(q, k.tolist(), v)
    with pytest.raises(ValueError, match=f"q must be a floating-point tensor {shape}, got torch.int64"):
        op(q.long(), k, v)
    with pytest.raises(ValueError, match=rf"v must be {shape} = \[1, 2, 3, 2, 2, 4\], got \[1, 2, 3, 2, 8\]"):
        op(q, k, v.reshape(1, 2, 3, 2, 8))
    with pytest.raises(ValueError, match=rf"k must be {shape} = \[1, 2, 3, 2, 2, 4\], got \[1, 1, 3, 2, 2, 4\]"):
        op(q, k[:, :1], v)
    with pytest.raises(ValueError, match="every size must be >= 1, got X = 0"):
        op(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="k must have q's dtype torch.float64, got torch.float32"):
        op(q, k.float(), v)
    with pytest.raises(ValueError, match="v must be on q's device cpu \\(one device for all\\), got meta"):
        op(q, k, v.to("meta"))
    for radius in (-1, True, 1.0, None, "1"):
        with pytest.raises(ValueError, match=f"radius must be an int >= 0, got {radius!r}"):
            op(q, k, v, radius)


def test_bad_grids_for_the_helpers_are_value_errors():
    with pytest.raises(ValueError, match="neighbourhood_mask: grid side Y must be an int >= 1, got 0"):
        neighbourhood_mask(2, 0, 3, 1)
    with pytest.raises(ValueError, match="neighbour_count: radius must be an int >= 0, got -2"):
        neighbour_count(2, 2, 2, -2)
    with pytest.raises(ValueError, match="neighbour_count: grid side X must be an int >= 1, got 2.0"):
        neighbour_count(2.0, 2, 2, 1)
