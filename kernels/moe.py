"""Mixture-of-experts dispatch and combine kernels.

Reference: `refimpl.ops.moe_dispatch` and `refimpl.ops.moe_combine`.
    dispatch  x: [N, C], expert_index: [N, k], E ->
              x_sorted: [N*k, C], offsets: [E+1] (int64), slot: [N, k] (int64)
    combine   expert_out: [N*k, C], slot: [N, k], weight: [N, k] -> y: [N, C]

Dispatch is a *stable counting sort* of the N*k token copies by expert:
count the copies per expert, take the exclusive prefix sum as each expert's
first row, then place copies in order of (token, choice), so the rows of one
expert keep token order and the result is deterministic. Then gather the rows.
Combine is a weighted gather-sum, one output row per token.

The ladder
    numba       counting sort in one sequential pass (it is O(N*k), cheap), rows
                gathered and combined in parallel (prange).
    numba_cuda  v1 (registered): count with atomics (a thread per copy); prefix sum
                by one thread (E is small); placement by one thread per expert, each
                scanning all copies in order (stable, deterministic, O(E*N*k) work);
                gather and combine with a block per row, threads along C (coalesced).
    cupy        moe.cu: the same five kernels in CUDA C.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import torch
from numba import cuda

from kernels import launch
from kernels.registry import register
from kernels.tensors import (NUMBA_FASTMATH, cupy_view, expect_device, expect_dtype, forward_only, new_output,
                             numba_cuda_view, numpy_view)
from refimpl import ops

register("moe_dispatch", "reference")(ops.moe_dispatch)
register("moe_combine", "reference")(ops.moe_combine)


def _prepare_dispatch(x, expert_index, n_experts, backend, dtypes):
    N, C, k = ops.check_moe_dispatch_args(x, expert_index, n_experts)
    expect_dtype("moe_dispatch", "x", x, dtypes)
    expect_device("moe_dispatch", backend, {"x": x, "expert_index": expert_index})
    forward_only("moe_dispatch", x)
    flat = expert_index.reshape(-1).to(torch.int64)                   # [N*k]
    x_sorted = new_output((N * k, C), x.dtype, x.device)
    offsets = new_output((n_experts + 1,), torch.int64, x.device)
    slot = new_output((N * k,), torch.int64, x.device)
    source = new_output((N * k,), torch.int64, x.device)              # token feeding each sorted row
    return (N, C, k), flat, x_sorted, offsets, slot, source


def _prepare_combine(expert_out, slot, weight, backend, dtypes):
    N, C, k = ops.check_moe_combine_args(expert_out, slot, weight)
    expect_dtype("moe_combine", "expert_out", expert_out, dtypes)
    if weight.dtype != expert_out.dtype:
        raise ValueError(f"moe_combine: weight must have expert_out's dtype {expert_out.dtype}, got {weight.dtype}")
    expect_device("moe_combine", backend, {"expert_out": expert_out, "slot": slot, "weight": weight})
    forward_only("moe_combine", expert_out, weight)
    return (N, C, k), slot.to(torch.int64), new_output((N, C), expert_out.dtype, expert_out.device)


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(cache=True)
def _counting_sort_cpu(flat, k, n_experts, offsets, slot, source):
    counts = np.zeros(n_experts, np.int64)
    for i in range(flat.shape[0]):
        counts[flat[i]] += 1
    offsets[0] = 0
    for e in range(n_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    cursor = offsets[:-1].copy()                    # next free row of each expert
    for i in range(flat.shape[0]):                  # in (token, choice) order: stable
        e = flat[i]
        slot[i] = cursor[e]
        source[cursor[e]] = i // k
        cursor[e] += 1


@numba.njit(parallel=True, cache=True)
def _gather_rows_cpu(x, source, out):
    for r in numba.prange(out.shape[0]):
        out[r, :] = x[source[r], :]


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _combine_rows_cpu(expert_out, slot, weight, out):
    N, k = slot.shape
    for n in numba.prange(N):
        row = out[n]
        row[:] = 0.0
        for j in range(k):                          # add whole expert rows: contiguous, vectorised
            w, source = weight[n, j], slot[n, j]
            for c in range(row.shape[0]):
                row[c] += w * expert_out[source, c]


@register("moe_dispatch", "numba")
def moe_dispatch_numba(x, expert_index, n_experts):
    """numba CPU dispatch. x: [N, C] float32/float64 CPU, expert_index: [N, k] -> x_sorted [N*k, C], offsets [E+1], slot [N, k]."""
    (N, C, k), flat, x_sorted, offsets, slot, source = _prepare_dispatch(
        x, expert_index, n_experts, "numba", (torch.float32, torch.float64))
    _counting_sort_cpu(numpy_view(flat), k, n_experts, numpy_view(offsets), numpy_view(slot), numpy_view(source))
    _gather_rows_cpu(numpy_view(x), numpy_view(source), numpy_view(x_sorted))
    return x_sorted, offsets, slot.view(N, k)


@register("moe_combine", "numba")
def moe_combine_numba(expert_out, slot, weight):
    """numba CPU combine. expert_out: [N*k, C], slot: [N, k], weight: [N, k], float32/float64 CPU -> y [N, C]."""
    _, slot64, out = _prepare_combine(expert_out, slot, weight, "numba", (torch.float32, torch.float64))
    _combine_rows_cpu(numpy_view(expert_out), numpy_view(slot64), numpy_view(weight), numpy_view(out))
    return out


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _count_copies(flat, counts):
    i = cuda.grid(1)
    if i < flat.shape[0]:
        cuda.atomic.add(counts, flat[i], 1)


@cuda.jit
def _exclusive_scan_one_thread(counts, offsets):
    if cuda.grid(1) == 0:
        offsets[0] = 0
        for e in range(counts.shape[0]):
            offsets[e + 1] = offsets[e] + counts[e]


@cuda.jit
def _place_copies_per_expert(flat, k, offsets, slot, source):
    e = cuda.grid(1)
    if e < offsets.shape[0] - 1:
        row = offsets[e]
        for i in range(flat.shape[0]):   # every thread scans all copies, keeping only its expert's
            if flat[i] == e:
                slot[i] = row
                source[row] = i // k
                row += 1


@cuda.jit
def _gather_rows(x, source, out):
    r = cuda.blockIdx.x
    for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[r, c] = x[source[r], c]


@cuda.jit
def _combine_rows(expert_out, slot, weight, out):
    n = cuda.blockIdx.x
    for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        acc = numba.float32(0.0)
        for j in range(slot.shape[1]):
            acc += weight[n, j] * expert_out[slot[n, j], c]
        out[n, c] = acc


@register("moe_dispatch", "numba_cuda")
def moe_dispatch_numba_cuda(x, expert_index, n_experts):
    """numba CUDA dispatch (v1). x: [N, C] float32, expert_index: [N, k] -> x_sorted [N*k, C], offsets [E+1], slot [N, k]."""
    (N, C, k), flat, x_sorted, offsets, slot, source = _prepare_dispatch(
        x, expert_index, n_experts, "numba_cuda", (torch.float32,))
    counts = torch.zeros(n_experts, dtype=torch.int64, device=x.device)
    threads = launch.block_size()
    flat_d, offsets_d = numba_cuda_view(flat), numba_cuda_view(offsets)
    slot_d, source_d = numba_cuda_view(slot), numba_cuda_view(source)
    launch.numba_cuda(_count_copies, launch.grid_for(N * k, threads), threads, flat_d, numba_cuda_view(counts))
    launch.numba_cuda(_exclusive_scan_one_thread, 1, 1, numba_cuda_view(counts), offsets_d)
    launch.numba_cuda(_place_copies_per_expert, launch.grid_for(n_experts, threads), threads, flat_d, k, offsets_d, slot_d, source_d)
    launch.numba_cuda(_gather_rows, N * k, threads, numba_cuda_view(x), source_d, numba_cuda_view(x_sorted))
    return x_sorted, offsets, slot.view(N, k)


@register("moe_combine", "numba_cuda")
def moe_combine_numba_cuda(expert_out, slot, weight):
    """numba CUDA combine (v1), a block per token. expert_out: [N*k, C], slot, weight: [N, k] float32 -> y [N, C]."""
    (N, C, k), slot64, out = _prepare_combine(expert_out, slot, weight, "numba_cuda", (torch.float32,))
    launch.numba_cuda(_combine_rows, N, launch.block_size(),
        numba_cuda_view(expert_out), numba_cuda_view(slot64), numba_cuda_view(weight), numba_cuda_view(out))
    return out


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("moe.cu")
CUPY_ENTRY_POINTS = ("count_copies", "exclusive_scan_one_thread", "place_copies_per_expert", "gather_rows",
                     "combine_rows")  # the kernels this file launches


@register("moe_dispatch", "cupy")
def moe_dispatch_cupy(x, expert_index, n_experts):
    """CuPy dispatch (moe.cu). x: [N, C] float32 CUDA, expert_index: [N, k] -> x_sorted [N*k, C], offsets [E+1], slot [N, k]."""
    (N, C, k), flat, x_sorted, offsets, slot, source = _prepare_dispatch(
        x, expert_index, n_experts, "cupy", (torch.float32,))
    counts = torch.zeros(n_experts, dtype=torch.int64, device=x.device)
    threads, Nk = launch.GPU_BLOCK, N * k
    flat_c, offsets_c, slot_c, source_c = cupy_view(flat), cupy_view(offsets), cupy_view(slot), cupy_view(source)
    launch.cupy(CU_SOURCE, "count_copies", launch.grid_for(Nk, threads), threads, (flat_c, cupy_view(counts), np.int64(Nk)))
    launch.cupy(CU_SOURCE, "exclusive_scan_one_thread", 1, 1, (cupy_view(counts), offsets_c, np.int32(n_experts)))
    launch.cupy(CU_SOURCE, "place_copies_per_expert", launch.grid_for(n_experts, threads), threads,
                (flat_c, np.int64(Nk), np.int32(k), offsets_c, slot_c, source_c, np.int32(n_experts)))
    launch.cupy(CU_SOURCE, "gather_rows", Nk, threads, (cupy_view(x), source_c, cupy_view(x_sorted), np.int32(C)))
    return x_sorted, offsets, slot.view(N, k)


@register("moe_combine", "cupy")
def moe_combine_cupy(expert_out, slot, weight):
    """CuPy combine (moe.cu), a block per token. expert_out: [N*k, C], slot, weight: [N, k] float32 CUDA -> y [N, C]."""
    (N, C, k), slot64, out = _prepare_combine(expert_out, slot, weight, "cupy", (torch.float32,))
    launch.cupy(CU_SOURCE, "combine_rows", N, launch.GPU_BLOCK,
                (cupy_view(expert_out), cupy_view(slot64), cupy_view(weight), cupy_view(out), np.int32(C), np.int32(k)))
    return out


MANY_EXPERTS = launch.GPU_BLOCK + 5  # the check's second case: the per-expert launch needs two blocks


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: N = B*T tokens of width C, top-k of E
    experts; and the same tokens routed to 2k of MANY_EXPERTS (most of them empty), so that every launch of
    the dispatch, the per-expert one included, spans more than one block (tiny: N 2k = 152 copies)."""
    from kernels.check import random_tensor
    N, C, E, k = shapes["B"] * shapes["T"], shapes["C"], shapes["E"], shapes["k"]
    x = random_tensor((N, C), generator=generator)
    cases = {}
    for experts, k, label in ((E, k, ""), (MANY_EXPERTS, 2 * k, f" ({MANY_EXPERTS} experts, top-{2 * k})")):
        index = random_tensor((N, experts), generator=generator).topk(k, dim=-1).indices  # [N, k] distinct experts
        _, _, slot = ops.moe_dispatch(x, index, experts)
        expert_out = random_tensor((N * k, C), generator=generator)
        weight = torch.softmax(random_tensor((N, k), generator=generator), dim=-1)
        cases[f"moe_dispatch{label}"] = ((x, index, experts), {})
        cases[f"moe_combine{label}"] = ((expert_out, slot, weight), {})
    return cases
