"""The nearest-code (vq_nearest) kernels against the reference, on every backend, at awkward shapes.

Checking by distance: the reference searches with the expanded form ||z||^2 - 2 z.c + ||c||^2 and
the kernels with the difference z - c, in other summation orders, so at a near-tie (two codes
whose distances differ by about the rounding) the two may pick different codes, both right. So
every check recomputes all N x K distances in float64 from the inputs and asserts that the chosen
code's distance is the minimum (to the kernel dtype's tolerance), that the returned distance is the
chosen code's, and that on rows with no near-tie the index equals the float64 argmin and the
reference's exactly. Exact ties are built from integer-valued data (every operation exact in any
order) and must give the lowest index, including across the CUDA versions' threads.

Outputs are poisoned (NaN distances, -1 indices) before a kernel writes them. numba_cuda runs
through numba's CUDA simulator when there is no GPU; cupy cases need a GPU and skip with a reason
elsewhere, while the CUDA C is compile-checked with nvcc and NVRTC wherever they exist. The last
part but one runs a `VectorQuantizer` with the numba kernel swapped in; the last tests the
reference op itself: against brute force (every distance from the difference, in float64), exact
ties, exact distances, its row chunking, and bad input.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernels import vq_nearest as vq_kernels
from kernels.check import assert_close, example_shapes, poisoned_outputs, random_tensor
from kernels.machine import device_for
from kernel_testing import BACKEND_DTYPES, skip_unless_runnable
from refimpl import ops, vq

# id -> (N, K, C)
SHAPES = {
    "N1-K70-C17": (1, 70, 17),       # one row; 70 codes: three turns of a 32-thread simulator block, the last partial
    "N7-K1-C3": (7, 1, 3),           # a single code: every row picks it, a block of one thread
    "N33-K5-C1": (33, 5, 1),         # scalar codes; 5 codes in a block of 8 threads, three of them idle
    "N33-K70-C17": (33, 70, 17),     # odd everything at once
    "N9-K511-C12": (9, 511, 12),     # the `tiny` example's rows and width, the `small` example's K
}


def _inputs(N, K, C, dtype, device, seed=0):
    """(z, codebook), drawn in float64 and then cast, so every dtype sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    z = random_tensor((N, C), dtype=torch.float64, generator=g)
    codebook = random_tensor((K, C), dtype=torch.float64, generator=g)
    return z.to(dtype=dtype, device=device), codebook.to(dtype=dtype, device=device)


def _check_nearest(z, codebook, indices, distances, name):
    """The checks by distance described in the module docstring; returns the rows with no near-tie."""
    N, K = z.shape[0], codebook.shape[0]
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (N,), \
        f"{name}: indices {indices.dtype} {list(indices.shape)}"
    assert distances.dtype == z.dtype and tuple(distances.shape) == (N,), \
        f"{name}: distances {distances.dtype} {list(distances.shape)}"
    indices, distances = indices.cpu(), distances.cpu()
    assert ((indices >= 0) & (indices < K)).all(), f"{name}: indices outside [0, {K}) (-1 = never written): {indices}"
    d = ((z.cpu().double()[:, None, :] - codebook.cpu().double()[None, :, :]) ** 2).sum(-1)   # [N, K], exact-ish
    chosen = d.gather(1, indices[:, None]).squeeze(1)
    assert_close(chosen.to(z.dtype), d.min(dim=1).values.to(z.dtype), f"{name}: chosen code's distance vs the minimum")
    assert_close(distances, chosen.to(z.dtype), f"{name}: returned distance vs the chosen code's")
    # No near-tie: the runner-up is further than many times any rounding of the search (float32
    # roundoff 6e-8 times ||z||^2 + ||c||^2, ~C for standard-normal draws).
    if K == 1:
        clear = torch.ones(N, dtype=torch.bool)
    else:
        top2 = d.topk(2, dim=1, largest=False).values
        scale = (z.cpu().double() ** 2).sum(1) + (codebook.cpu().double() ** 2).sum(1).max()
        clear = top2[:, 1] - top2[:, 0] > 1e-4 * scale
    assert torch.equal(indices[clear], d.argmin(dim=1)[clear]), f"{name}: wrong index on a row with no near-tie"
    return clear


# ---------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_vq_nearest_kernel_vs_reference(backend, dtype, case):
    N, K, C = case
    skip_unless_runnable(backend, work=N * K * C)
    z, codebook = _inputs(N, K, C, dtype, device_for(backend), seed=N + K + C)
    expected = ops.vq_nearest(z, codebook)
    with poisoned_outputs():
        indices, distances = kernels.get("vq_nearest", backend)(z, codebook)
    clear = _check_nearest(z, codebook, indices, distances, f"vq_nearest[{backend}] {case}")
    _check_nearest(z, codebook, *expected, f"vq_nearest[reference] {case}")       # the reference passes it too
    assert torch.equal(indices.cpu()[clear], expected[0].cpu()[clear])
    assert clear.float().mean() > 0.5                       # the check did look at indices


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_vq_nearest_exact_ties_go_to_the_lowest_index(backend, dtype):
    """Integer data (every operation exact, in any order): each row's nearest codes are z +- e_j
    (distance 1) and every other code is far from it.

    With 70 codes the simulator's 32-thread block gives code k to thread k % 32, so a tie between
    codes 31 and 32 puts the lower index on thread 31 and the higher on thread 0, and the tree
    reduction has to prefer the index, not the thread."""
    skip_unless_runnable(backend)
    N, K, C = 5, 70, 3
    g = torch.Generator().manual_seed(1)
    zs = 20 * torch.arange(N, dtype=torch.float64)[:, None] + torch.randint(-4, 5, (N, C), generator=g)  # >= 12 apart
    codebook = -100 + torch.randint(-3, 4, (K, C), generator=g).double()   # fillers: > 90 from every row
    tied = {0: [(31, 0, +1), (32, 1, -1)],              # row 0: codes 31 and 32 (threads 31 and 0)
            1: [(69, 2, +1), (40, 0, -1), (8, 1, +1)],  # row 1: codes 8, 40, 69 (threads 8, 8, 5)
            2: [(3, 0, +1), (35, 0, +1)],               # row 2: a duplicate code, same thread
            3: [(0, 1, -1), (64, 2, +1)],               # row 3: the first code
            4: [(50, 2, -1), (17, 0, +1)]}              # row 4: codes 17 and 50 (threads 17 and 18)
    for n, codes in tied.items():
        for k, j, sign in codes:
            codebook[k] = zs[n]
            codebook[k, j] += sign
    d = ((zs[:, None] - codebook[None]) ** 2).sum(-1)
    winners = [min(k for k, _, _ in tied[n]) for n in range(N)]
    for n in range(N):
        assert sorted((d[n] == d[n].min()).nonzero().flatten().tolist()) == sorted(k for k, _, _ in tied[n])
    zs, codebook = zs.to(dtype=dtype, device=device_for(backend)), codebook.to(dtype=dtype, device=device_for(backend))
    with poisoned_outputs():
        indices, distances = kernels.get("vq_nearest", backend)(zs, codebook)
    assert indices.cpu().tolist() == winners
    assert ops.vq_nearest(zs, codebook)[0].cpu().tolist() == winners
    assert distances.cpu().tolist() == [1.0] * N


def test_example_inputs_have_no_near_ties_at_either_size():
    """check_backend compares indices exactly: the examples must leave no room for a legitimate flip."""
    for size in ("tiny", "small"):
        shapes = example_shapes(size)
        cases = vq_kernels.example_inputs(shapes, torch.Generator().manual_seed(3))
        (z, codebook), _ = cases["vq_nearest"]
        assert tuple(z.shape) == (shapes["R"], shapes["C"])
        assert codebook.shape[0] == {"tiny": 143, "small": 511}[size]
        d = torch.cdist(z.double(), codebook.double()) ** 2     # float64: rounding far below the margin checked
        top2 = d.topk(2, dim=1, largest=False).values
        assert (top2[:, 1] > 100 * top2[:, 0]).all(), f"{size}: a row's runner-up is too close"
        (zi, ci), _ = cases["vq_nearest (exact ties, integer-valued)"]
        assert torch.equal(zi, zi.round()) and torch.equal(ci, ci.round())
        K = ci.shape[0]
        assert torch.equal(ci[K - K // 2:], ci[:K // 2].flip(0))


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_vq_nearest_at_gpu_size(backend):
    N, K, C = 4096, 1024, 64
    skip_unless_runnable(backend, work=N * K * C)
    z, codebook = _inputs(N, K, C, torch.float32, device_for(backend), seed=4)
    with poisoned_outputs():
        indices, distances = kernels.get("vq_nearest", backend)(z, codebook)
    _check_nearest(z, codebook, indices, distances, f"vq_nearest[{backend}] at GPU size")


def test_numba_takes_non_contiguous_inputs():
    z, codebook = _inputs(6, 9, 4, torch.float32, "cpu", seed=5)
    z_strided = z.t().contiguous().t()                        # [N, C] with N the fast axis
    assert not z_strided.is_contiguous()
    indices, distances = kernels.get("vq_nearest", "numba")(z_strided, codebook[::1])
    _check_nearest(z, codebook, indices, distances, "strided vq_nearest[numba]")


# ---------------------------------------------------------------- the quantiser, kernel swapped in

def test_vector_quantizer_with_numba_vq_nearest_equals_reference():
    quantizer = vq.VectorQuantizer(64, 12, generator=torch.Generator().manual_seed(6))
    z_e = random_tensor((3, 11, 12), generator=torch.Generator().manual_seed(7)).requires_grad_()
    expected = quantizer(z_e)
    with kernels.use("numba", ops=["vq_nearest"]) as swapped:
        assert swapped == ["vq_nearest"]
        assert ops.vq_nearest.__wrapped__ is vq_kernels.vq_nearest_numba   # behind a call counter
        got = quantizer(z_e)                                  # training mode, z_e requiring grad: still works
    assert ops.vq_nearest is kernels.get("vq_nearest", "reference")     # put back after the block
    _check_nearest(z_e.detach().reshape(-1, 12), quantizer.codebook.detach(), got.indices.flatten(),
                   ((got.z_q - z_e) ** 2).sum(-1).detach().flatten(), "VectorQuantizer with numba")
    assert torch.equal(got.indices, expected.indices)
    assert_close(got.loss.detach(), expected.loss.detach(), "loss with the numba search")
    got.loss.backward()                                       # the gradients do not depend on the search's backend
    assert z_e.grad is not None and quantizer.codebook.grad is not None


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vq_nearest_bad_shapes_are_value_errors(backend):
    search = kernels.get("vq_nearest", backend)
    z, codebook = _inputs(4, 6, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"z must be \[N, C\], got \[4, 3, 1\]"):
        search(z[..., None], codebook)
    with pytest.raises(ValueError, match=r"codebook must be \[K, C\] = \[K, 3\], got \[6, 2\]"):
        search(z, codebook[:, :2])
    with pytest.raises(ValueError, match=r"every size must be >= 1, got K = 0"):
        search(z, codebook[:0])
    with pytest.raises(ValueError, match=r"z must be a floating-point tensor \[N, C\], got torch.int32"):
        search(z.int(), codebook)
    with pytest.raises(ValueError, match="codebook must have z's dtype torch.float32, got torch.float64"):
        search(z, codebook.double())


def test_vq_nearest_kernels_refuse_wrong_dtypes_and_devices():
    z, codebook = _inputs(4, 6, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="z must be float32, float64, got bfloat16"):
        kernels.get("vq_nearest", "numba")(z.bfloat16(), codebook.bfloat16())
    with pytest.raises(ValueError, match="z must be float32, got float64"):
        kernels.get("vq_nearest", "numba_cuda")(z.double(), codebook.double())
    with pytest.raises(ValueError, match="cpu tensor but cupy kernels run on a CUDA GPU"):
        kernels.get("vq_nearest", "cupy")(z, codebook)
    # no gradient to drop (the op is an argmin): inputs that require grad are fine, as in the reference
    indices, distances = kernels.get("vq_nearest", "numba")(z.requires_grad_(), codebook)
    assert not distances.requires_grad


# The CUDA C compile checks (nvcc and NVRTC) are in tests/test_kernels.py, over kernels.OP_MODULES.

def test_cupy_block_matches_the_cuda_source():
    assert f"#define VQ_BLOCK {vq_kernels.CUPY_BLOCK} " in vq_kernels.CU_SOURCE.read_text()


# ---------------------------------------------------------------- the reference op: against brute force, exact ties

VQ_NEAREST_FILE = importlib.import_module("refimpl.ops.vq_nearest")  # the module: refimpl.ops.vq_nearest is the function


def _brute_force_distances(z, codebook):
    """[N, K] squared distances, every one from the difference, in float64."""
    return ((z.double()[:, None, :] - codebook.double()[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("N, K, C", [(1, 1, 1), (50, 40, 6), (33, 70, 17), (7, 5, 3)])
def test_vq_nearest_equals_cdist_argmin_in_float64(N, K, C):
    g = torch.Generator().manual_seed(N * 1000 + K)
    z = random_tensor((N, C), dtype=torch.float64, generator=g)
    codebook = random_tensor((K, C), dtype=torch.float64, generator=g)
    indices, distances = ops.vq_nearest(z, codebook)
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (N,)
    assert distances.dtype == torch.float64 and tuple(distances.shape) == (N,)
    # cdist without its matrix-multiply shortcut: every distance from the difference
    expected = torch.cdist(z, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    d = _brute_force_distances(z, codebook)
    if K > 1:       # the draw has no near-tie (else an index could differ legitimately: see the op's docstring)
        gap = d.sort(dim=1).values
        assert (gap[:, 1] - gap[:, 0]).min() > 1e-6
    assert torch.equal(indices, expected)
    assert_close(distances, d.gather(1, indices[:, None]).squeeze(1), "distances")


def test_vq_nearest_in_float32_picks_a_nearest_code_by_distance():
    """float32: the chosen code's distance (recomputed in float64) is the minimum, to float32 tolerance."""
    g = torch.Generator().manual_seed(1)
    z = random_tensor((200, 24), generator=g)
    codebook = random_tensor((300, 24), generator=g)
    indices, distances = ops.vq_nearest(z, codebook)
    d = _brute_force_distances(z, codebook)
    chosen = d.gather(1, indices[:, None]).squeeze(1)
    assert_close(chosen.float(), d.min(dim=1).values.float(), "chosen code's distance vs the minimum")
    assert_close(distances, chosen.float(), "returned distances")


def test_vq_nearest_reference_exact_ties_go_to_the_lowest_index():
    # Integer values: every product and sum is exact in float32, in the expanded form as well.
    codebook = torch.tensor([[5., 5.],     # 0: far from both rows
                             [3., 3.],     # 1
                             [2., 3.],     # 2: distance 2 from row 0 (tied with 4)
                             [9., 0.],     # 3
                             [0., 1.],     # 4: distance 2 from row 0; distance 1 from row 1 (tied with 5, 6)
                             [1., 0.],     # 5
                             [-1., 0.]])   # 6
    z = torch.tensor([[1., 2.], [0., 0.]])
    d = _brute_force_distances(z, codebook)
    assert d[0, 2] == d[0, 4] == d[0].min() and d[1, 4] == d[1, 5] == d[1, 6] == d[1].min()
    indices, distances = ops.vq_nearest(z, codebook)
    assert indices.tolist() == [2, 4]
    assert distances.tolist() == [2.0, 1.0]
    # duplicate codes: the first copy wins wherever it is
    dup = torch.cat([codebook, codebook.flip(0)])
    assert ops.vq_nearest(z, dup)[0].tolist() == [2, 4]
    assert ops.vq_nearest(z, codebook.flip(0))[0].tolist() == [2, 0]       # [-1, 0] is now code 0


def test_vq_nearest_distances_are_exact_where_the_expanded_form_cancels():
    """Far from the origin, ||z||^2 - 2 z.c + ||c||^2 loses everything; the difference does not."""
    codebook = torch.tensor([[1000.0, -1000.0], [1000.5, -1000.0]])
    z = torch.tensor([[1000.001, -1000.002]])
    indices, distances = ops.vq_nearest(z, codebook)
    exact = float(((z.double() - codebook[0].double()) ** 2).sum())        # from the float32 inputs, in float64
    expanded = float((z * z).sum() - 2 * (z @ codebook[0]) + (codebook[0] * codebook[0]).sum())
    assert indices.item() == 0
    assert abs(distances.item() - exact) <= 1e-6 * exact                    # to float32 roundoff
    assert abs(expanded - exact) >= 0.5 * exact                             # the expanded form: wrong by half or more


def test_vq_nearest_chunking_does_not_change_the_answer(monkeypatch):
    g = torch.Generator().manual_seed(2)
    z = random_tensor((29, 5), generator=g)
    codebook = random_tensor((11, 5), generator=g)
    whole = ops.vq_nearest(z, codebook)
    monkeypatch.setattr(VQ_NEAREST_FILE, "SEARCH_CHUNK_ELEMENTS", 3 * 11 + 2)           # chunks of 3 rows: 10 chunks
    chunked = ops.vq_nearest(z, codebook)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    monkeypatch.setattr(VQ_NEAREST_FILE, "SEARCH_CHUNK_ELEMENTS", 1)                    # fewer elements than K: one row at a time
    assert torch.equal(ops.vq_nearest(z, codebook)[0], whole[0])


def test_vq_nearest_has_no_gradient_and_keeps_half_precision_dtype():
    z = torch.randn(4, 3, requires_grad=True)
    codebook = torch.randn(6, 3, requires_grad=True)
    indices, distances = ops.vq_nearest(z, codebook)
    assert not distances.requires_grad
    _, d16 = ops.vq_nearest(z.detach().bfloat16(), codebook.detach().bfloat16())
    assert d16.dtype == torch.bfloat16


def test_vq_nearest_bad_inputs_are_value_errors():
    z, codebook = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"z must be a floating-point tensor \[N, C\], got list"):
        ops.vq_nearest([[0.0] * 3], codebook)
    with pytest.raises(ValueError, match=r"z must be a floating-point tensor \[N, C\], got torch.int64"):
        ops.vq_nearest(z.long(), codebook)
    with pytest.raises(ValueError, match=r"codebook must be a floating-point tensor \[K, C\]"):
        ops.vq_nearest(z, codebook.int())
    with pytest.raises(ValueError, match=r"z must be \[N, C\], got \[2, 2, 3\]"):
        ops.vq_nearest(z.view(2, 2, 3), codebook)
    with pytest.raises(ValueError, match=r"every size must be >= 1, got N = 0"):
        ops.vq_nearest(z[:0], codebook)
    with pytest.raises(ValueError, match=r"codebook must be \[K, C\] = \[K, 3\], got \[6, 4\]"):
        ops.vq_nearest(z, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"every size must be >= 1, got K = 0"):
        ops.vq_nearest(z, codebook[:0])
    with pytest.raises(ValueError, match=r"codebook must be \[K, C\] = \[K, 3\], got \[18\]"):
        ops.vq_nearest(z, codebook.flatten())
    with pytest.raises(ValueError, match="codebook must have z's dtype torch.float32, got torch.float64"):
        ops.vq_nearest(z, codebook.double())
    with pytest.raises(ValueError, match="one device"):
        ops.vq_nearest(z, codebook.to("meta"))
