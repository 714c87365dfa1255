"""Selective scan (Mamba S6) kernels: the recurrent forward, state in and state out.

Reference: `refimpl.ops.selective_scan` (ground truth: `selective_scan_recurrent`).
    u, delta [B, T, Dm], A [Dm, N], Bm, Cm [B, T, N], D [Dm] or None, initial_state [B, Dm, N] or None
    -> y [B, T, Dm], final state h [B, Dm, N]

The observation every version here uses: channel (b, d) owns its N state values and
walks through time without looking at any other channel,

    h[n]   = exp(Delta_t A[d, n]) h[n] + Delta_t u_t B_t[n]      for every n    (Delta_t = delta[b, t, d])
    y_t    = sum_n C_t[n] h[n] + D[d] u_t                                        (u_t = u[b, t, d])

so B * Dm workers can each hold N floats and run the whole sequence with no communication
at all: N exponentials, N multiply-adds and one dot product of length N per token.
(The reference's chunked form does more arithmetic to use matrix multiplies; a step loop
is what a single worker wants.)

The ladder
    numba       a CPU thread per channel (b, d) (prange over B * Dm), its N state values
                updated in place in the output state [B, Dm, N].
    numba_cuda  v1 (registered): one GPU thread per channel; the N state values live in a
                thread-local array (registers / local memory). Neighbouring threads are
                neighbouring channels d, so reads of u and delta are coalesced, and every thread
                of a batch row reads the same B_t, C_t (a broadcast that hits in L1).
    cupy        selective_scan.cu, selective_scan_channel_per_thread: the same in CUDA C.
Faster rungs (B_t, C_t staged in shared memory; the time axis split into chunks scanned
in parallel and stitched with the decays; tensor-core chunked forms) are the GPU issue's work.
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

register("selective_scan", "reference")(ops.selective_scan)

MAX_STATE_DIM = 64  # length of the per-thread state array in the CUDA versions (Mamba uses N = 16)


def _prepare(u, delta, A, Bm, Cm, D, initial_state, backend, dtypes):
    Bsz, T, Dm, N = ops.check_selective_scan_args(u, delta, A, Bm, Cm, D, initial_state)
    if backend != "numba" and N > MAX_STATE_DIM:
        raise ValueError(f"selective_scan: {backend} kernels support state size N <= {MAX_STATE_DIM}, got {N}")
    tensors = {"u": u, "delta": delta, "A": A, "B": Bm, "C": Cm}
    if D is not None:
        tensors["D"] = D
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    expect_dtype("selective_scan", "u", u, dtypes)
    for name, t in tensors.items():            # one dtype for all: the kernels read every array as u's type
        expect_dtype("selective_scan", name, t, (u.dtype,))
    expect_device("selective_scan", backend, tensors)
    forward_only("selective_scan", *tensors.values())
    if D is None:
        # No skip connection = a skip weight of zero: D u adds an exact 0 to every finite output.
        D = torch.zeros(Dm, dtype=u.dtype, device=u.device)
    y = new_output((Bsz, T, Dm), u.dtype, u.device)
    state = new_output((Bsz, Dm, N), u.dtype, u.device)     # filled with the initial state, then updated in place
    if initial_state is None:
        state.zero_()
    else:
        state.copy_(initial_state)
    return (Bsz, T, Dm, N), D, y, state


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _selective_scan_cpu(u, delta, A, Bm, Cm, D, y, state):
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    zero = u.dtype.type(0.0)                               # accumulate in the inputs' precision
    for channel in numba.prange(Bsz * Dm):
        b, d = channel // Dm, channel % Dm
        h = state[b, d]                                    # [N], updated in place
        for t in range(T):
            step = delta[b, t, d]
            x = step * u[b, t, d]                          # Delta_t u_t, shared by the N state values
            read = zero
            for n in range(N):
                h[n] = u.dtype.type(math.exp(step * A[d, n])) * h[n] + x * Bm[b, t, n]
                read += Cm[b, t, n] * h[n]
            y[b, t, d] = read + D[d] * u[b, t, d]


@register("selective_scan", "numba")
def selective_scan_numba(u, delta, A, Bm, Cm, D=None, initial_state=None):
    """numba CPU selective scan, float32/float64 CPU tensors. Returns (y [B, T, Dm], state [B, Dm, N])."""
    _, D, y, state = _prepare(u, delta, A, Bm, Cm, D, initial_state, "numba", (torch.float32, torch.float64))
    _selective_scan_cpu(numpy_view(u), numpy_view(delta), numpy_view(A), numpy_view(Bm), numpy_view(Cm),
                        numpy_view(D), numpy_view(y), numpy_view(state))
    return y, state


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _selective_scan_v1_channel_per_thread(u, delta, A, Bm, Cm, D, y, state):
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    channel = cuda.grid(1)
    if channel >= Bsz * Dm:
        return
    b, d = channel // Dm, channel % Dm
    h = cuda.local.array(MAX_STATE_DIM, numba.float32)     # this thread's N state values
    for n in range(N):
        h[n] = state[b, d, n]
    skip = D[d]
    for t in range(T):
        step = delta[b, t, d]
        x = step * u[b, t, d]
        read = numba.float32(0.0)
        for n in range(N):
            h[n] = math.exp(step * A[d, n]) * h[n] + x * Bm[b, t, n]
            read += Cm[b, t, n] * h[n]
        y[b, t, d] = read + skip * u[b, t, d]
    for n in range(N):
        state[b, d, n] = h[n]


@register("selective_scan", "numba_cuda")
def selective_scan_numba_cuda(u, delta, A, Bm, Cm, D=None, initial_state=None):
    """numba CUDA selective scan (v1: a thread per channel), float32. Returns (y [B, T, Dm], state [B, Dm, N])."""
    (Bsz, T, Dm, N), D, y, state = _prepare(u, delta, A, Bm, Cm, D, initial_state, "numba_cuda", (torch.float32,))
    threads, channels = launch.block_size(), Bsz * Dm
    launch.numba_cuda(_selective_scan_v1_channel_per_thread, launch.grid_for(channels, threads), threads,
        numba_cuda_view(u), numba_cuda_view(delta), numba_cuda_view(A), numba_cuda_view(Bm), numba_cuda_view(Cm),
        numba_cuda_view(D), numba_cuda_view(y), numba_cuda_view(state))
    return y, state


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("selective_scan.cu")
CUPY_ENTRY_POINTS = ("selective_scan_channel_per_thread",)  # the kernels this file launches


@register("selective_scan", "cupy")
def selective_scan_cupy(u, delta, A, Bm, Cm, D=None, initial_state=None):
    """CuPy selective scan (a thread per channel), float32 CUDA. Returns (y [B, T, Dm], state [B, Dm, N])."""
    (Bsz, T, Dm, N), D, y, state = _prepare(u, delta, A, Bm, Cm, D, initial_state, "cupy", (torch.float32,))
    channels, threads = Bsz * Dm, launch.GPU_BLOCK                       # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "selective_scan_channel_per_thread", launch.grid_for(channels, threads), threads,
                (cupy_view(u), cupy_view(delta), cupy_view(A), cupy_view(Bm), cupy_view(Cm), cupy_view(D),
                 cupy_view(y), cupy_view(state), np.int32(Bsz), np.int32(T), np.int32(Dm), np.int32(N)))
    return y, state


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: Dm = 2 C channels (Mamba's expand 2),
    N = D // 2 state values; Delta = softplus(draw) > 0, A = -exp(draw) < 0, a non-zero initial state."""
    from kernels.check import random_tensor
    B, T, Dm, N = shapes["B"], shapes["T"], 2 * shapes["C"], max(shapes["D"] // 2, 1)
    u = random_tensor((B, T, Dm), generator=generator)
    # As a trained Mamba layer has them: Delta = softplus(.) mostly in 0.01 - 1, A = -(1 .. N) (S4D-real) with
    # some spread. (Far larger |Delta A| sums, ~ -3800 over a chunk of 32, make the chunked reference's
    # cumulative sums lose float32 precision before any kernel is involved.)
    delta = torch.nn.functional.softplus(random_tensor((B, T, Dm), generator=generator) - 1.5)  # > 0
    A = -torch.arange(1, N + 1, dtype=torch.float32) * torch.exp(0.3 * random_tensor((Dm, N), generator=generator))
    Bm = random_tensor((B, T, N), generator=generator)
    Cm = random_tensor((B, T, N), generator=generator)
    D = random_tensor((Dm,), generator=generator)
    state = random_tensor((B, Dm, N), generator=generator, scale=0.5)
    return {"selective_scan": ((u, delta, A, Bm, Cm), {"D": D, "initial_state": state}),
            "selective_scan (no D, no initial state)": ((u, delta, A, Bm, Cm), {})}
