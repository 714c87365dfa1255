"""The TIES-merging kernels against `refimpl.ops.ties_merge`, on every backend, every option.

Which entries survive the trim must match the reference exactly, so the per-row thresholds
(stage (a), `kernels.ties_merge.TRIM_THRESHOLDS`) are checked for equality with torch.topk's, on rows
built to be hard: repeated magnitudes, neighbouring floats one ulp apart, subnormals, zeros.
The merged values (stage (b)) are sums, checked to the dtype's tolerance. Outputs are poisoned
with NaN before a kernel writes them. numba_cuda runs through numba's CUDA simulator when there
is no GPU; cupy cases need a GPU and skip with a reason elsewhere, while the CUDA C is
compile-checked with nvcc and NVRTC wherever they exist.

The last part tests the reference ops themselves (refimpl/ops/ties_merge.py) on hand-made task
vectors, against results worked out by hand: trim, elect_sign, ties_merge, ties_merge_as_written,
average, task_arithmetic, and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import ties_merge as ties_kernels
from kernels.check import assert_close, example_shapes, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops
from refimpl.ops import average, elect_sign, task_arithmetic, ties_merge, ties_merge_as_written, trim


def _tau(K, P, dtype, device, seed=0):
    """K random task vectors of P parameters, drawn in float64 and then cast."""
    return random_tensor((K, P), torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype,
                                                                                                  device=device)


def _tied_tau(K, P, dtype, device, seed=0):
    """Small integers -3..3: every magnitude repeats many times (ties at any threshold), signs clash, zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (K, P), generator=g).to(dtype=dtype, device=device)


def _check_against_reference(backend, tau, name, **options):
    expected = ops.ties_merge(tau, **options)
    with poisoned_outputs():
        got = kernels.get("ties_merge", backend)(tau, **options)
    assert_close(got, expected, f"ties_merge[{backend}] {name} {options}")


# ---------------------------------------------------------------- kernel vs reference

# id -> density; with P = 1001: keep 201, 801, 1001 and 1 (ceil(1e-4 * 1001) = 1: only each row's largest)
DENSITIES = {"density0.2": 0.2, "density0.8": 0.8, "density1.0": 1.0, "keep1": 1e-4}


@pytest.mark.parametrize("density", DENSITIES.values(), ids=DENSITIES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_ties_kernel_vs_reference_at_each_density(backend, dtype, density):
    K, P = 3, 1001
    assert math.ceil(DENSITIES["keep1"] * P) == 1
    skip_unless_runnable(backend, work=K * P * 31)
    tau = _tau(K, P, dtype, device_for(backend))
    _check_against_reference(backend, tau, "K3-P1001", density=density)


@pytest.mark.parametrize("sign_rule, divide_by", [("mass", "agreeing"), ("mass", "all"), ("count", "agreeing"),
                                                  ("count", "all")], ids=lambda option: option)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_ties_kernel_vs_reference_for_each_rule(backend, dtype, sign_rule, divide_by):
    K, P = 3, 1001
    skip_unless_runnable(backend, work=K * P * 31)
    tau = _tau(K, P, dtype, device_for(backend), seed=1)
    _check_against_reference(backend, tau, "K3-P1001", density=0.5, lam=0.7, sign_rule=sign_rule,
                             divide_by=divide_by)


# id -> (how tau is made, options)
EDGE_CASES = {
    "ties-at-threshold-mass": (lambda d, dev: _tied_tau(3, 101, d, dev, seed=2), dict(density=0.3)),
    "ties-at-threshold-count-all": (lambda d, dev: _tied_tau(4, 37, d, dev, seed=3),
                                    dict(density=0.6, sign_rule="count", divide_by="all")),
    "one-zero-row": (lambda d, dev: _tau(3, 57, d, dev, seed=4) * torch.tensor([[1.0], [0.0], [1.0]]).to(d).to(dev),
                     dict(density=0.25)),
    "all-zero": (lambda d, dev: torch.zeros(2, 9, dtype=d, device=dev), dict(density=0.5, sign_rule="count")),
    "P1": (lambda d, dev: _tau(3, 1, d, dev, seed=5), dict(density=0.2)),
    "K1": (lambda d, dev: _tau(1, 17, d, dev, seed=6), dict(density=0.3, lam=2.0)),
    "K1-P1": (lambda d, dev: _tau(1, 1, d, dev, seed=7), dict(density=1.0, divide_by="all")),
}


@pytest.mark.parametrize("case", EDGE_CASES.values(), ids=EDGE_CASES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_ties_kernel_vs_reference_at_edge_cases(backend, dtype, case):
    skip_unless_runnable(backend)
    make, options = case
    tau = make(dtype, device_for(backend))
    _check_against_reference(backend, tau, "", **options)


# The hand-made example of the reference op's tests below (TAU_BY_HAND): three task vectors over five parameters.
TAU = [[4.0, -1.0, 0.5, -3.0, 0.0],
       [2.0, 3.0, -0.5, -1.0, 0.2],
       [-1.0, 2.0, 0.1, 5.0, -0.3]]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_ties_kernel_on_the_hand_made_example(backend, dtype):
    """Worked out by hand in the reference op's tests below; the write-up's variant too."""
    skip_unless_runnable(backend)
    tau = torch.tensor(TAU, dtype=dtype, device=device_for(backend))
    merge = kernels.get("ties_merge", backend)
    with poisoned_outputs():
        got = [merge(tau, density=0.4, lam=1.0), merge(tau, density=0.4, lam=0.5),
               merge(tau, density=0.8, lam=1.0, sign_rule="count", divide_by="all")]
    expected = [[3.0, 2.5, 0.0, 5.0, 0.0], [1.5, 1.25, 0.0, 2.5, 0.0], [2.0, 5.0 / 3, 0.0, -4.0 / 3, -0.1]]
    for g, e, name in zip(got, expected, ("paper", "lam 0.5", "as written")):
        assert_close(g, torch.tensor(e, dtype=dtype, device=tau.device), f"ties_merge[{backend}] by hand, {name}")
    assert_close(got[2], ops.ties_merge_as_written(tau), f"ties_merge[{backend}] = ties_merge_as_written")


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_ties_at_gpu_size(backend):
    shapes = example_shapes("small")
    K, P = 3, shapes["B"] * shapes["T"] * shapes["C"]           # 262,144 parameters, as in the `small` example
    skip_unless_runnable(backend, work=K * P * 31)
    tau = _tau(K, P, torch.float32, device_for(backend), seed=9)
    for density in (0.2, 0.8):
        _check_against_reference(backend, tau, "small", density=density, sign_rule="mass")


# ---------------------------------------------------------------- the trim thresholds, exactly

def _hard_rows(dtype, device):
    """Three rows of 40 that make a selection slip show: neighbouring floats one ulp apart around 1.0,
    tiny and subnormal magnitudes with signed zeros, and a row of zeros. Shuffled, random signs."""
    g = torch.Generator().manual_seed(10)
    ulps = [torch.tensor(1.0, dtype=dtype)]
    for _ in range(19):                                         # 1.0 and the 19 floats just above it ...
        ulps.append(torch.nextafter(ulps[-1], torch.tensor(2.0, dtype=dtype)))
    ulps += [ulps[i] for i in range(0, 20, 2)] + [torch.nextafter(ulps[0], torch.tensor(0.0, dtype=dtype))] * 10
    tiny = torch.finfo(dtype).tiny                              # smallest normal; below it, subnormals
    small = [tiny / 2, tiny / 4, tiny / 4, tiny, tiny * 3, 0.0, -0.0, 1e-30, 1e-30, 2e-30] * 4
    rows = torch.stack([torch.stack(ulps), torch.tensor(small, dtype=dtype), torch.zeros(40, dtype=dtype)])
    signs = torch.where(torch.rand(rows.shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    shuffle = torch.stack([torch.randperm(40, generator=g) for _ in range(3)])
    return (rows * signs).gather(1, shuffle).to(device)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_trim_thresholds_equal_topks_exactly(backend, dtype):
    skip_unless_runnable(backend)
    device = device_for(backend)
    select = ties_kernels.TRIM_THRESHOLDS[backend]
    for name, tau in (("hard rows", _hard_rows(dtype, device)), ("tied integers", _tied_tau(3, 40, dtype, device))):
        for keep in (1, 2, 23, 40):
            expected = tau.abs().topk(keep, dim=1).values[:, -1]           # what `trim` compares against
            with poisoned_outputs():
                got = select(tau, keep)
            assert torch.equal(got, expected), f"{backend} {name}, keep={keep}: got {got.tolist()}, " \
                                               f"expected {expected.tolist()}"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba", "numba_cuda", "cupy"])
def test_ties_bad_options_are_value_errors(backend):
    """The option checks come before the device check, so every backend runs this on any machine."""
    merge, tau = kernels.get("ties_merge", backend), _tau(3, 11, torch.float32, "cpu")
    for density in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            merge(tau, density=density)
    with pytest.raises(ValueError, match="sign rule must be 'mass' or 'count'"):
        merge(tau, sign_rule="median")
    with pytest.raises(ValueError, match="divide_by must be 'agreeing' or 'all'"):
        merge(tau, divide_by="some")
    with pytest.raises(ValueError, match=r"tau must be \[K, P\], got \[11\]"):
        merge(tau[0])
    with pytest.raises(ValueError, match=r"every size must be >= 1, got P = 0"):
        merge(tau[:, :0])


def test_ties_kernels_refuse_wrong_dtypes_devices_and_gradients():
    tau = _tau(3, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="tau must be float32, float64, got bfloat16"):
        kernels.get("ties_merge", "numba")(tau.bfloat16())
    with pytest.raises(ValueError, match="tau must be float32, got float64"):
        kernels.get("ties_merge", "numba_cuda")(tau.double())
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("ties_merge", "cupy")(tau)
    trained = tau.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        kernels.get("ties_merge", "numba")(trained)
    with torch.no_grad():
        kernels.get("ties_merge", "numba")(trained)              # fine without a graph


# ---------------------------------------------------------------- the reference op: trim, elect, merge by hand

# Three task vectors over five parameters.
TAU_BY_HAND = torch.tensor([[ 4.0, -1.0,  0.5, -3.0,  0.0],
                            [ 2.0,  3.0, -0.5, -1.0,  0.2],
                            [-1.0,  2.0,  0.1,  5.0, -0.3]])


def test_trim_keeps_the_top_fraction_by_magnitude():
    kept = trim(TAU_BY_HAND, 0.4)                                 # ceil(0.4 * 5) = 2 per row
    assert kept.tolist() == [[4.0, 0.0, 0.0, -3.0, 0.0],
                             [2.0, 3.0, 0.0, 0.0, 0.0],
                             [0.0, 2.0, 0.0, 5.0, 0.0]]


def test_ties_by_hand():
    # trimmed (above): column sums 6, 5, 0, 2, 0 -> elected signs +, +, 0, +, 0
    # agreeing entries: col0 {4, 2} -> 3; col1 {3, 2} -> 2.5; col3 {5} (the -3 disagrees) -> 5
    merged = ties_merge(TAU_BY_HAND, density=0.4, lam=1.0)
    assert merged.tolist() == [3.0, 2.5, 0.0, 5.0, 0.0]
    assert ties_merge(TAU_BY_HAND, density=0.4, lam=0.5).tolist() == [1.5, 1.25, 0.0, 2.5, 0.0]


def test_mass_and_count_elect_differently():
    tau = torch.tensor([[-10.0], [1.0], [1.0]])                  # two small positives against one large negative
    assert elect_sign(tau, "mass").item() == -1.0
    assert elect_sign(tau, "count").item() == 1.0


def test_the_write_ups_variant_by_hand():
    # keep ceil(0.8 * 5) = 4 per row: row0 drops 0.0, row1 drops 0.2, row2 drops 0.1
    # vote signs per column: (+,+,-) +; (-,+,+) +; (+,-,0) 0; (-,-,+) -; (0,0,-) -
    # keep agreeing, divide by K = 3: col0 (4+2)/3 = 2; col1 (3+2)/3; col2 0; col3 (-3-1)/3; col4 -0.3/3
    merged = ties_merge_as_written(TAU_BY_HAND)
    expected = torch.tensor([2.0, 5.0 / 3, 0.0, -4.0 / 3, -0.1])
    assert torch.allclose(merged, expected)


def test_average_and_task_arithmetic():
    assert torch.allclose(average(TAU_BY_HAND), TAU_BY_HAND.mean(0))
    assert torch.allclose(task_arithmetic(TAU_BY_HAND, 0.3), 0.3 * TAU_BY_HAND.sum(0))


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        ties_merge(torch.ones(5))
    with pytest.raises(ValueError, match="density must be in"):
        trim(TAU_BY_HAND, 0.0)
    with pytest.raises(ValueError, match="sign rule"):
        elect_sign(TAU_BY_HAND, "median")
