"""TIES-merging kernels: trim, elect, disjoint merge of K task vectors.

Reference: `refimpl.ops.ties_merge`.
    tau [K, P] (K task vectors of P parameters), density, lam, sign_rule ("mass" | "count"),
    divide_by ("agreeing" | "all") -> merged change [P]

Two stages, each parallel in its own direction:

    (a) per row k: the trim threshold, the keep-th largest |tau_k| with keep = max(1, ceil(density * P)).
        Entries with |tau[k, p]| >= threshold survive (ties at the threshold all survive, as in `trim`).
        Only the threshold is needed, never a sorted row: a selection, not a sort.
    (b) per parameter p: with the K thresholds known, the K trimmed values of column p are
        tau[k, p] where |tau[k, p]| >= threshold_k and 0 elsewhere; elect the sign (mass: sign of
        their sum; count: sign of the sum of their signs), then
        merged[p] = lam * (sum of the values agreeing with it) / (their number, at least 1; or K).

Stage (a) parallelises over rows (and, on a GPU, within a row); stage (b) over the P parameters,
which never talk to each other. Which entries are kept is decided exactly (the threshold is
one of the |tau| values themselves, found without rounding), so the kernels keep the same
entries as the reference; only the final sums are subject to rounding.

The selection on a GPU: for non-negative floats the IEEE-754 bit pattern, read as an unsigned
integer, orders exactly like the value. So the threshold's bits can be decided one at a time,
from the highest: keep a prefix, try setting the next bit, and keep it if at least `keep`
entries of |tau_k| are >= the candidate (a count over the row: one block reduction). After
the last bit the prefix is the largest value with >= keep entries at or above it, which is
the keep-th largest |tau_k|. The sign bit of |x| is always 0, so bits 30..0 take 31 rounds.
(A NaN's bits are above +inf's, so a NaN counts as the largest magnitude, as in torch.topk;
the book's task vectors are finite.)

The ladder
    numba       stage (a): np.partition on |tau_k| per row (prange over rows), an O(P) selection;
                stage (b): prange over parameters, a loop over K.
    numba_cuda  v1 (registered): stage (a) one block per row, the 31-round bitwise select with
                a shared-memory tree count each round; stage (b) one thread per parameter
                (neighbouring threads read neighbouring parameters: coalesced).
    cupy        ties_merge.cu: ties_threshold_radix_select (the same select, counts summed with warp
                shuffles) and ties_merge_parameter_per_thread.
Faster rungs: stage (a) uses only K blocks (K is small: a few SMs of a GPU); spreading each row
over many blocks (a histogram of 8-bit digits, 4 rounds, global counts) is the GPU issue's work.
"""

from __future__ import annotations

import math
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

register("ties_merge", "reference")(ops.ties_merge)

MAX_THREADS = 128        # block size of the numba CUDA select (a power of two)
CUPY_SELECT_THREADS = 1024  # block size of the CuPy select: one block per row, so make it a big one
MAX_PARAMETERS = 2**30    # the CUDA versions index and count with 32-bit ints (with room for p + blockDim)


def _prepare(tau, density, sign_rule, divide_by, backend, dtypes):
    ops.check_ties_merge_args(tau)                                    # the reference's own check: float [K, P], K, P >= 1
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if sign_rule not in ("mass", "count"):
        raise ValueError(f"sign rule must be 'mass' or 'count', got {sign_rule!r}")
    if divide_by not in ("agreeing", "all"):
        raise ValueError(f"divide_by must be 'agreeing' or 'all', got {divide_by!r}")
    expect_dtype("ties_merge", "tau", tau, dtypes)
    K, P = tau.shape
    if backend != "numba" and P > MAX_PARAMETERS:
        raise ValueError(f"ties_merge: {backend} kernels support P <= {MAX_PARAMETERS} parameters, got {P}")
    expect_device("ties_merge", backend, {"tau": tau})
    forward_only("ties_merge", tau)
    keep = max(1, math.ceil(density * P))                  # exactly as `trim` computes it
    return (K, P), keep, new_output((P,), tau.dtype, tau.device)


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _ties_thresholds_cpu(tau, keep, thresholds):
    K, P = tau.shape
    for k in numba.prange(K):
        # The keep-th largest of P values is the (P - keep)-th smallest (from 0): np.partition puts
        # exactly that value at that index, smaller ones before it, in O(P) on average.
        thresholds[k] = np.partition(np.abs(tau[k]), P - keep)[P - keep]


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _ties_merge_cpu(tau, thresholds, lam, by_count, divide_by_all, out):
    K, P = tau.shape
    zero = tau.dtype.type(0.0)                             # sums in the input's precision
    lam = tau.dtype.type(lam)
    for p in numba.prange(P):
        mass, votes = zero, 0                              # elect: over the trimmed values of column p
        for k in range(K):
            x = tau[k, p]
            if abs(x) >= thresholds[k]:                    # survives the trim (a dropped entry adds 0)
                mass += x
                votes += 1 if x > 0 else (-1 if x < 0 else 0)
        score = votes if by_count else mass
        elected = 1 if score > 0 else (-1 if score < 0 else 0)    # 0: undecided, nothing agrees
        total, agreeing = zero, 0                          # merge: the surviving values with the elected sign
        for k in range(K):
            x = tau[k, p]
            if abs(x) >= thresholds[k] and ((x > 0 and elected > 0) or (x < 0 and elected < 0)):
                total += x
                agreeing += 1
        count = K if divide_by_all else max(agreeing, 1)
        out[p] = lam * total / tau.dtype.type(count)


def trim_thresholds_numba(tau, keep):
    """Stage (a) on the CPU: [K] thresholds, the keep-th largest |tau_k| of each row."""
    thresholds = new_output((tau.shape[0],), tau.dtype, tau.device)
    _ties_thresholds_cpu(numpy_view(tau), keep, numpy_view(thresholds))
    return thresholds


@register("ties_merge", "numba")
def ties_merge_numba(tau, density=0.2, lam=1.0, sign_rule="mass", divide_by="agreeing"):
    """numba CPU TIES merge, float32/float64 CPU tensor tau [K, P] -> [P]."""
    _, keep, out = _prepare(tau, density, sign_rule, divide_by, "numba", (torch.float32, torch.float64))
    thresholds = trim_thresholds_numba(tau, keep)
    _ties_merge_cpu(numpy_view(tau), numpy_view(thresholds), float(lam), sign_rule == "count", divide_by == "all",
                    numpy_view(out))
    return out


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _ties_v1_threshold_radix_select(bits, keep, threshold_bits):
    """One block per row. bits: tau's float32 bit patterns as int32 [K, P]; threshold_bits [K] int32 out."""
    counts = cuda.shared.array(MAX_THREADS, numba.int32)
    row, tid = cuda.blockIdx.x, cuda.threadIdx.x
    P = bits.shape[1]
    prefix = 0                                             # the threshold's bits decided so far
    for bit in range(30, -1, -1):                          # bit 31, the sign, is 0 in every |x|
        candidate = prefix | (1 << bit)
        n = 0
        for p in range(tid, P, cuda.blockDim.x):           # coalesced: thread tid reads p = tid, tid + threads, ...
            if (bits[row, p] & 0x7FFFFFFF) >= candidate:   # clearing the sign bit is |x|
                n += 1
        counts[tid] = n
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:                                  # tree: threads < stride add their partner's count
            if tid < stride:
                counts[tid] += counts[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if counts[0] >= keep:                              # every thread reads the same total: same decision
            prefix = candidate
        cuda.syncthreads()                                 # all have read counts[0] before the next round writes
    if tid == 0:
        threshold_bits[row] = prefix


@cuda.jit
def _ties_v1_merge_parameter_per_thread(tau, thresholds, lam, by_count, divide_by_all, out):
    K, P = tau.shape
    p = cuda.grid(1)
    if p >= P:
        return
    mass, votes = numba.float32(0.0), 0
    for k in range(K):
        x = tau[k, p]
        if abs(x) >= thresholds[k]:
            mass += x
            votes += 1 if x > 0 else (-1 if x < 0 else 0)
    score = votes if by_count else mass
    elected = 1 if score > 0 else (-1 if score < 0 else 0)
    total, agreeing = numba.float32(0.0), 0
    for k in range(K):
        x = tau[k, p]
        if abs(x) >= thresholds[k] and ((x > 0 and elected > 0) or (x < 0 and elected < 0)):
            total += x
            agreeing += 1
    count = K if divide_by_all else max(agreeing, 1)
    out[p] = lam * total / numba.float32(count)


def trim_thresholds_numba_cuda(tau, keep):
    """Stage (a), numba CUDA v1: a block per row, the bitwise select. [K] float32 thresholds."""
    tau = tau.contiguous()
    thresholds = new_output((tau.shape[0],), tau.dtype, tau.device)
    # The same memory read as int32 bit patterns: the select works on bits, stage (b) on values.
    launch.numba_cuda(_ties_v1_threshold_radix_select, tau.shape[0], launch.block_size(MAX_THREADS),
        numba_cuda_view(tau.view(torch.int32)), keep, numba_cuda_view(thresholds.view(torch.int32)))
    return thresholds


@register("ties_merge", "numba_cuda")
def ties_merge_numba_cuda(tau, density=0.2, lam=1.0, sign_rule="mass", divide_by="agreeing"):
    """numba CUDA TIES merge (v1: a block per row selects, a thread per parameter merges), float32 tau [K, P] -> [P]."""
    (K, P), keep, out = _prepare(tau, density, sign_rule, divide_by, "numba_cuda", (torch.float32,))
    thresholds = trim_thresholds_numba_cuda(tau, keep)
    threads = launch.block_size()
    launch.numba_cuda(_ties_v1_merge_parameter_per_thread, launch.grid_for(P, threads), threads,
        numba_cuda_view(tau), numba_cuda_view(thresholds), np.float32(lam), sign_rule == "count",
        divide_by == "all", numba_cuda_view(out))
    return out


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("ties_merge.cu")
CUPY_ENTRY_POINTS = ("ties_threshold_radix_select", "ties_merge_parameter_per_thread")  # the kernels launched


def trim_thresholds_cupy(tau, keep):
    """Stage (a), CuPy: a block per row, the bitwise select. [K] float32 thresholds."""
    thresholds = new_output((tau.shape[0],), tau.dtype, tau.device)
    launch.cupy(CU_SOURCE, "ties_threshold_radix_select", tau.shape[0], CUPY_SELECT_THREADS,
                (cupy_view(tau), cupy_view(thresholds), np.int32(tau.shape[1]), np.int32(keep)))
    return thresholds


@register("ties_merge", "cupy")
def ties_merge_cupy(tau, density=0.2, lam=1.0, sign_rule="mass", divide_by="agreeing"):
    """CuPy TIES merge (a block per row selects, a thread per parameter merges), float32 CUDA tau [K, P] -> [P]."""
    (K, P), keep, out = _prepare(tau, density, sign_rule, divide_by, "cupy", (torch.float32,))
    thresholds, threads = trim_thresholds_cupy(tau, keep), 128
    launch.cupy(CU_SOURCE, "ties_merge_parameter_per_thread", launch.grid_for(P, threads), threads,
                (cupy_view(tau), cupy_view(thresholds), cupy_view(out), np.int32(K), np.int32(P), np.float32(lam),
                 np.int32(sign_rule == "count"), np.int32(divide_by == "all")))
    return out


#: Stage (a) alone, per backend: (tau [K, P], keep) -> [K] thresholds; the tests check them exactly.
TRIM_THRESHOLDS = {"numba": trim_thresholds_numba, "numba_cuda": trim_thresholds_numba_cuda,
                   "cupy": trim_thresholds_cupy}


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: K = 3 task vectors of P = R*C parameters
    (240 at `tiny`, 260,096 at `small`), every option away from its default (density 0.3, lam 0.7, the count sign rule, divide
    by all). The second case draws small integers, -3 .. 3, so many magnitudes tie at each row's threshold
    (a kernel that keeps only `keep` of them, or uses > for >=, fails there), with the other option pair."""
    from kernels.check import random_tensor
    P = shapes["R"] * shapes["C"]
    tau = random_tensor((3, P), generator=generator)
    tied = torch.randint(-3, 4, (3, P), generator=generator).float()
    return {"ties_merge": ((tau,), {"density": 0.3, "lam": 0.7, "sign_rule": "count", "divide_by": "all"}),
            "ties_merge (ties at the threshold)": ((tied,), {"density": 0.4, "lam": 1.3, "sign_rule": "mass",
                                                             "divide_by": "agreeing"})}
