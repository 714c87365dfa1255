"""Mamba-3 scan kernels: the recurrent forward (trapezoidal step, rotating state, MIMO), state in and out.

Reference: `refimpl.ops.mamba3_scan` (ground truth: `mamba3_scan_recurrent`).
    x [B, T, H, R, P], dt, A [B, T, H], Bm, Cm [B, T, H, R, N], theta [B, T, H, K] or None,
    trap [B, T, H] or None, D [H] or None, initial_state Mamba3ScanState or None
    -> y [B, T, H, R, P], Mamba3ScanState(h [B, H, P, N], angle [B, H, K] (theta None: the initial
       angle passed through, or None), B_prev [B, H, R, N], x_prev [B, H, R, P])
Per (b, h) pair and token, with alpha = exp(dt A), beta = (1 - lambda) dt alpha, gamma = lambda dt:

    phi     = (phi + dt theta) mod 2 pi                     K angles
    B~_r    = Rot(phi) B_r,   C~_r = Rot(phi) C_r           pairs (2k, 2k+1) turned by phi[k]
    h[p, n] = alpha h[p, n] + beta sum_r x_prev[r, p] B~_prev[r, n] + gamma sum_r x[r, p] B~[r, n]
    y[r, p] = sum_n h[p, n] C~_r[n] + D x[r, p]
    B~_prev, x_prev = B~, x                                 (what the next token's trapezoid needs)

The observation every version here uses: given the scalars dt, A, lambda and the rotated B~, C~
of the pair, row p of the state (its N values h[p, :]) evolves on its own; it needs only its own
inputs x[r, p] (now and one token back). The rotation (phi, B~, C~) depends on no row, so a worker
that owns a row can recompute it itself. So B * H * P workers walk through time with no
communication at all, each doing per token about 3 R N multiply-adds (the two rank-R sums and
the read) plus the rotation of R rows of B and C (4 R K multiply-adds, and K cos/sin).

The ladder
    numba       a CPU thread per (b, h) pair (prange over B * H), the angles, B~ and C~ once per token
                into per-thread arrays, then the P rows of the state one after another, in place in
                the output h [P, N]. (A CPU has few threads, so sharing the rotation across the P rows
                is worth more than more parallelism.) Three things make it 10x its step loop and
                faster than the chunked matrix form, where its first version (the formula above as
                written, libm's cos and sin) was 1.2x and 0.46x:
                1. one inflow per token, not two. With u_t = sum_r x_r B~_r^T the state is
                   h_t = alpha_t h_{t-1} + beta_t u_{t-1} + gamma_t u_t. The kernel keeps instead
                   g_t = h_t - c_t u_t with c_t = -beta_{t+1} / alpha_{t+1} = -(1 - lambda_{t+1}) dt_{t+1}
                   (the next token's scalars, read one token ahead), and then
                       g_t = alpha_t g_{t-1} + (gamma_t - c_t) u_t,
                       y_t = g_t C~_t + c_t sum_r x_r (B~_r . C~_t) + D x_t:
                   the previous token's u is never needed, and u_t's part of the read costs R x R dot
                   products per token, not a pass over the state. c of the last token is 0, so g ends
                   as h (what the next call starts from); g_{-1} = h_{-1} - c_{-1} u_{-1} is made from
                   the carried B_prev and x_prev.
                2. every loop over the N state values is contiguous and branch-free, so LLVM turns it
                   into SIMD; at the layer's rank R = 2 the row is updated and both reads are summed in
                   one pass (other ranks take R + R passes), and the row stays in L1.
                3. cos and sin of the K angles are polynomials (_sin_cos) in one loop that vectorises,
                   where libm's are a call each; the fmod of the angle is called only when it wraps.
    numba_cuda  v1 (registered): one GPU thread per state row (b, h, p). Each thread keeps, in
                thread-local arrays (local memory), its N state values, its own running angles
                phi (K), the previous token's rotated B~ (R x N) and its own x_prev[r, p] (R);
                it rotates B and C on the fly, so the rotation is recomputed by every thread of
                the pair (P times redundant). Neighbouring threads are neighbouring p, so reads
                of x and writes of y coalesce. The p == 0 thread writes the final angle and
                B_prev of its pair; the starting ones are separate read-only inputs (a thread
                of the pair in a later block may not have read them yet).
    cupy        mamba3_scan.cu, mamba3_scan_row_per_thread: the same in CUDA C.
Faster rungs (one block per (b, h) pair computing phi, cos/sin, B~_t and C~_t once per token into
shared memory for its P threads; rank-R updates on tensor cores; the chunked matrix form) are the
GPU issue's work. The CUDA versions need compile-time array bounds: N <= MAX_STATE_DIM and
R <= MAX_RANK (so R N <= 256 values of B~_prev per thread); bigger sizes are refused with a
ValueError. The numba CPU version has no bound.

The angle is kept in [0, 2 pi) as the reference keeps it, with torch.remainder's rule:
r = fmod(a, 2 pi), plus 2 pi when r < 0 (fmod is exact, so this matches bit for bit given the
same sum a; an r within rounding below 0 becomes exactly 2 pi in float, as in the reference).
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

register("mamba3_scan", "reference")(ops.mamba3_scan)

MAX_STATE_DIM = 64                          # N: length of the per-thread state row in the CUDA versions
MAX_RANK = 4                                # R: MIMO rank; each CUDA thread holds R * N <= 256 values of B~_prev
MAX_ANGLES = MAX_STATE_DIM // 2             # K <= N / 2
MAX_PREVIOUS_B = MAX_RANK * MAX_STATE_DIM   # R * N (a named constant: numba needs a literal array size)
#: Taylor coefficients of sin r = sum_j (-1)^j r^(2j+1) / (2j+1)! and cos r = sum_j (-1)^j r^(2j) / (2j)!, j <= 10
SIN_TERMS = np.array([(-1) ** j / math.factorial(2 * j + 1) for j in range(11)])
COS_TERMS = np.array([(-1) ** j / math.factorial(2 * j) for j in range(11)])


@numba.njit(fastmath=NUMBA_FASTMATH, inline="always", cache=True)
def _sin_cos(a):
    """(sin a, cos a) for a in [0, 2 pi], in float64 arithmetic that LLVM vectorises (libm's sin and cos, a
    call per angle, do not). With r = a - pi in [-pi, pi], sin a = -sin r and cos a = -cos r; both series to
    r^21, whose first dropped term is under pi^22 / 22! < 1e-10. Float32 angles get float32-exact results."""
    r = np.float64(a) - math.pi
    r2 = r * r
    s, c = SIN_TERMS[10], COS_TERMS[10]
    for j in range(9, -1, -1):                          # Horner's rule in r^2
        s = s * r2 + SIN_TERMS[j]
        c = c * r2 + COS_TERMS[j]
    return -s * r, -c


def _prepare(x, dt, A, Bm, Cm, theta, trap, D, initial_state, backend, dtypes):
    """Check the arguments; fill in what is None; allocate the outputs. Returns
    (sizes, kernel inputs, outputs) where the kernel inputs are
        theta [B, T, H, max(K, 1)] (zeros when None: K = 0 turns nothing), trap (ones when None),
        D (zeros when None), angle0 [B, H, max(K, 1)], B_prev0 [B, H, R, N], x_prev0 [B, H, R, P]
        (the starting values, read only; zeros when None)
    and the outputs are y, h [B, H, P, N] (filled with the starting h, updated in place),
    angle [B, H, max(K, 1)], B_prev, x_prev (written by the kernel)."""
    Bsz, T, H, R, P, N, K = ops.check_mamba3_args(x, dt, A, Bm, Cm, theta, trap, D, initial_state)
    if backend != "numba" and N > MAX_STATE_DIM:
        raise ValueError(f"mamba3_scan: {backend} kernels support state size N <= {MAX_STATE_DIM}, got {N}")
    if backend != "numba" and R > MAX_RANK:
        raise ValueError(f"mamba3_scan: {backend} kernels support MIMO rank R <= {MAX_RANK}, got {R}")
    start = initial_state if initial_state is not None else ops.Mamba3ScanState(None)
    tensors = {"x": x, "dt": dt, "A": A, "B": Bm, "C": Cm, "theta": theta, "trap": trap, "D": D,
               "initial_state.h": start.h, "initial_state.B_prev": start.B_prev,
               "initial_state.x_prev": start.x_prev}
    if theta is not None:                      # without rotation the angle is passed through untouched
        tensors["initial_state.angle"] = start.angle
    tensors = {name: t for name, t in tensors.items() if t is not None}
    expect_dtype("mamba3_scan", "x", x, dtypes)
    for name, t in tensors.items():            # one dtype for all: the kernels read every array as x's type
        expect_dtype("mamba3_scan", name, t, (x.dtype,))
    expect_device("mamba3_scan", backend, tensors)
    forward_only("mamba3_scan", *tensors.values())

    zeros = lambda *shape: torch.zeros(shape, dtype=x.dtype, device=x.device)  # noqa: E731
    K1 = max(K, 1)                             # K = 0 still gets a one-wide (unread) array: no empty arrays
    inputs = {
        "theta": theta if theta is not None else zeros(Bsz, T, H, 1),
        "trap": trap if trap is not None else torch.ones(Bsz, T, H, dtype=x.dtype, device=x.device),
        "D": D if D is not None else zeros(H),   # no skip = a skip weight of 0 (adds an exact 0)
        "angle0": start.angle if theta is not None and start.angle is not None else zeros(Bsz, H, K1),
        "B_prev0": start.B_prev if start.B_prev is not None else zeros(Bsz, H, R, N),
        "x_prev0": start.x_prev if start.x_prev is not None else zeros(Bsz, H, R, P),
    }
    h = new_output((Bsz, H, P, N), x.dtype, x.device)   # each row has one owner: updated in place
    if start.h is None:
        h.zero_()
    else:
        h.copy_(start.h)
    outputs = {"y": new_output((Bsz, T, H, R, P), x.dtype, x.device), "h": h,
               "angle": new_output((Bsz, H, K1), x.dtype, x.device),
               "B_prev": new_output((Bsz, H, R, N), x.dtype, x.device),
               "x_prev": new_output((Bsz, H, R, P), x.dtype, x.device)}
    return (Bsz, T, H, R, P, N, K), inputs, outputs


def _result(outputs, K, initial_state):
    """(y, Mamba3ScanState) as the reference returns it: without rotation (K = 0) the angle is the
    initial state's angle, passed through (or None)."""
    if K > 0:
        angle = outputs["angle"]
    else:
        angle = initial_state.angle if initial_state is not None else None
    return outputs["y"], ops.Mamba3ScanState(outputs["h"], angle, outputs["B_prev"], outputs["x_prev"])


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _mamba3_scan_cpu(x, dt, A, Bm, Cm, theta, trap, D, angle0, B_prev0, x_prev0, K, y, h, angle, B_prev, x_prev):
    Bsz, T, H, R, P = x.shape
    N = Bm.shape[4]
    zero = x.dtype.type(0.0)                                # accumulate in the inputs' precision
    one = x.dtype.type(1.0)
    two_pi = x.dtype.type(2.0 * math.pi)                    # as the reference's 2 pi, rounded to the dtype
    for pair in numba.prange(Bsz * H):
        b, hd = pair // H, pair % H
        g = h[b, hd]                                        # [P, N]: the shifted state g, then h at the end
        phi = angle[b, hd]                                  # [K], the output, started from the initial angle
        phi[:] = angle0[b, hd]
        B_now = np.empty((R, N), dtype=x.dtype)             # B~_t and C~_t of this token
        C_now = np.empty((R, N), dtype=x.dtype)
        BC = np.empty((R, R), dtype=x.dtype)                # BC[r, q] = B~_t[r] . C~_t[q]
        sin_phi = np.empty(K, dtype=x.dtype)
        cos_phi = np.empty(K, dtype=x.dtype)
        if T > 0:                                           # g_{-1} = h_{-1} - c_{-1} u_{-1}
            c_before = -(one - trap[b, 0, hd]) * dt[b, 0, hd]
            for p in range(P):
                for r in range(R):
                    xr = -c_before * x_prev0[b, hd, r, p]
                    for n in range(N):
                        g[p, n] += xr * B_prev0[b, hd, r, n]
        skip = D[hd]
        for t in range(T):
            step = dt[b, t, hd]
            alpha = x.dtype.type(math.exp(step * A[b, t, hd]))
            gamma = trap[b, t, hd] * step                   # weight of this token's input
            # c_t = -beta_{t+1} / alpha_{t+1}: the next token's trapezoid weight, looked up one token ahead
            c_now = -(one - trap[b, t + 1, hd]) * dt[b, t + 1, hd] if t + 1 < T else zero
            for r in range(R):
                for n in range(N):
                    B_now[r, n] = Bm[b, t, hd, r, n]
                    C_now[r, n] = Cm[b, t, hd, r, n]
            for k in range(K):                              # the running angles phi, kept in [0, 2 pi)
                a = phi[k] + step * theta[b, t, hd, k]
                if a < zero or a >= two_pi:                 # torch.remainder: fmod, then into [0, 2 pi)
                    a = x.dtype.type(np.fmod(a, two_pi))    # (a call, so only when the angle wraps)
                    if a < zero:
                        a += two_pi
                phi[k] = a
            for k in range(K):                              # one loop of polynomials: SIMD
                sin_k, cos_k = _sin_cos(phi[k])
                sin_phi[k], cos_phi[k] = x.dtype.type(sin_k), x.dtype.type(cos_k)
            for k in range(K):                              # turn pair k by phi[k]
                c, s = cos_phi[k], sin_phi[k]
                for r in range(R):
                    re, im = B_now[r, 2 * k], B_now[r, 2 * k + 1]
                    B_now[r, 2 * k], B_now[r, 2 * k + 1] = re * c - im * s, re * s + im * c
                    re, im = C_now[r, 2 * k], C_now[r, 2 * k + 1]
                    C_now[r, 2 * k], C_now[r, 2 * k + 1] = re * c - im * s, re * s + im * c
            for r in range(R):                              # u_t C~ for every row, from R x R numbers
                for q in range(R):
                    acc = zero
                    for n in range(N):
                        acc += B_now[r, n] * C_now[q, n]
                    BC[r, q] = acc
            for p in range(P):                              # the P rows, one after another; every loop over n
                row = g[p]                                  # is contiguous (SIMD) and the row stays in L1
                if R == 2:                                  # the layer's rank: one fused pass over the row
                    x0, x1 = (gamma - c_now) * x[b, t, hd, 0, p], (gamma - c_now) * x[b, t, hd, 1, p]
                    read0, read1 = zero, zero
                    for n in range(N):
                        v = alpha * row[n] + x0 * B_now[0, n] + x1 * B_now[1, n]
                        row[n] = v
                        read0 += v * C_now[0, n]
                        read1 += v * C_now[1, n]
                    for q in range(2):
                        read = read0 if q == 0 else read1
                        for r in range(R):
                            read += c_now * x[b, t, hd, r, p] * BC[r, q]
                        y[b, t, hd, q, p] = read + skip * x[b, t, hd, q, p]
                    continue
                for n in range(N):
                    row[n] *= alpha
                for r in range(R):                          # g_t = alpha g_{t-1} + (gamma - c_t) u_t
                    xr = (gamma - c_now) * x[b, t, hd, r, p]
                    for n in range(N):
                        row[n] += xr * B_now[r, n]
                for q in range(R):                          # y = h_t C~ + D x, with h_t = g_t + c_t u_t
                    read = zero
                    for n in range(N):
                        read += row[n] * C_now[q, n]
                    for r in range(R):
                        read += c_now * x[b, t, hd, r, p] * BC[r, q]
                    y[b, t, hd, q, p] = read + skip * x[b, t, hd, q, p]
        if T == 0:                                          # nothing read: the starting B~ and x pass through
            B_prev[b, hd] = B_prev0[b, hd]
            x_prev[b, hd] = x_prev0[b, hd]
        else:                                               # c_{T-1} = 0, so g is h again; the last token is the
            B_prev[b, hd] = B_now                           # next call's previous one
            x_prev[b, hd] = x[b, T - 1, hd]


@register("mamba3_scan", "numba")
def mamba3_scan_numba(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None):
    """numba CPU Mamba-3 scan, float32/float64 CPU tensors. Returns (y [B, T, H, R, P], Mamba3ScanState)."""
    (_, _, _, _, _, _, K), inputs, outputs = _prepare(x, dt, A, Bm, Cm, theta, trap, D, initial_state, "numba",
                                                      (torch.float32, torch.float64))
    i, o = inputs, outputs
    _mamba3_scan_cpu(numpy_view(x), numpy_view(dt), numpy_view(A), numpy_view(Bm), numpy_view(Cm),
                     numpy_view(i["theta"]), numpy_view(i["trap"]), numpy_view(i["D"]), numpy_view(i["angle0"]),
                     numpy_view(i["B_prev0"]), numpy_view(i["x_prev0"]), K,
                     numpy_view(o["y"]), numpy_view(o["h"]), numpy_view(o["angle"]), numpy_view(o["B_prev"]),
                     numpy_view(o["x_prev"]))
    return _result(outputs, K, initial_state)


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _mamba3_scan_v1_row_per_thread(x, dt, A, Bm, Cm, theta, trap, D, angle0, B_prev0, x_prev0, K,
                                   y, h, angle, B_prev, x_prev):
    Bsz, T, H, R, P = x.shape
    N = Bm.shape[4]
    row = cuda.grid(1)
    if row >= Bsz * H * P:
        return
    b, hd, p = row // (H * P), (row // P) % H, row % P
    two_pi = numba.float32(2.0 * math.pi)
    state = cuda.local.array(MAX_STATE_DIM, numba.float32)            # this thread's row h[p, :]
    phi = cuda.local.array(MAX_ANGLES, numba.float32)                  # the pair's running angles
    cos_phi = cuda.local.array(MAX_ANGLES, numba.float32)
    sin_phi = cuda.local.array(MAX_ANGLES, numba.float32)
    B_before = cuda.local.array(MAX_PREVIOUS_B, numba.float32)        # B~_{t-1}, [R, N] flattened
    x_before = cuda.local.array(MAX_RANK, numba.float32)               # x_{t-1}[r, p]
    x_now = cuda.local.array(MAX_RANK, numba.float32)                  # x_t[r, p]
    for n in range(N):
        state[n] = h[b, hd, p, n]
    for k in range(K):
        phi[k] = angle0[b, hd, k]
    for r in range(R):
        x_before[r] = x_prev0[b, hd, r, p]
        for n in range(N):
            B_before[r * N + n] = B_prev0[b, hd, r, n]
    skip = D[hd]
    for t in range(T):
        step = dt[b, t, hd]
        alpha = math.exp(step * A[b, t, hd])
        lam = trap[b, t, hd]
        beta = (numba.float32(1.0) - lam) * step * alpha
        gamma = lam * step
        for k in range(K):
            a = math.fmod(phi[k] + step * theta[b, t, hd, k], two_pi)     # torch.remainder: fmod, then
            if a < 0:                                                      # into [0, 2 pi)
                a += two_pi
            phi[k] = a
            cos_phi[k] = math.cos(a)
            sin_phi[k] = math.sin(a)
        for r in range(R):
            x_now[r] = x[b, t, hd, r, p]
        for n in range(N):
            now = numba.float32(0.0)
            before = numba.float32(0.0)
            for r in range(R):
                # B~_t[r, n], rotated here (every thread of the pair repeats this: see the docstring)
                if n < 2 * K:
                    k, first = n // 2, n - n % 2
                    re, im = Bm[b, t, hd, r, first], Bm[b, t, hd, r, first + 1]
                    if n % 2 == 0:
                        turned = re * cos_phi[k] - im * sin_phi[k]
                    else:
                        turned = re * sin_phi[k] + im * cos_phi[k]
                else:
                    turned = Bm[b, t, hd, r, n]
                now += x_now[r] * turned
                before += x_before[r] * B_before[r * N + n]
                B_before[r * N + n] = turned                               # read above, then replaced
            state[n] = alpha * state[n] + beta * before + gamma * now
        for r in range(R):
            read = numba.float32(0.0)
            for n in range(N):
                if n < 2 * K:                                              # C~_t[r, n], rotated the same way
                    k, first = n // 2, n - n % 2
                    re, im = Cm[b, t, hd, r, first], Cm[b, t, hd, r, first + 1]
                    if n % 2 == 0:
                        turned = re * cos_phi[k] - im * sin_phi[k]
                    else:
                        turned = re * sin_phi[k] + im * cos_phi[k]
                else:
                    turned = Cm[b, t, hd, r, n]
                read += state[n] * turned
            y[b, t, hd, r, p] = read + skip * x_now[r]
            x_before[r] = x_now[r]
    for n in range(N):
        h[b, hd, p, n] = state[n]
    for r in range(R):
        x_prev[b, hd, r, p] = x_before[r]
    if p == 0:                                                             # every thread of the pair holds
        for k in range(K):                                                 # the same angles and B~
            angle[b, hd, k] = phi[k]
        for r in range(R):
            for n in range(N):
                B_prev[b, hd, r, n] = B_before[r * N + n]


@register("mamba3_scan", "numba_cuda")
def mamba3_scan_numba_cuda(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None):
    """numba CUDA Mamba-3 scan (v1: a thread per state row), float32. Returns (y [B, T, H, R, P], Mamba3ScanState)."""
    (Bsz, T, H, R, P, N, K), inputs, outputs = _prepare(x, dt, A, Bm, Cm, theta, trap, D, initial_state,
                                                        "numba_cuda", (torch.float32,))
    i, o = inputs, outputs
    threads, rows = launch.block_size(), Bsz * H * P
    launch.numba_cuda(_mamba3_scan_v1_row_per_thread, launch.grid_for(rows, threads), threads,
        numba_cuda_view(x), numba_cuda_view(dt), numba_cuda_view(A), numba_cuda_view(Bm), numba_cuda_view(Cm),
        numba_cuda_view(i["theta"]), numba_cuda_view(i["trap"]), numba_cuda_view(i["D"]),
        numba_cuda_view(i["angle0"]), numba_cuda_view(i["B_prev0"]), numba_cuda_view(i["x_prev0"]), K,
        numba_cuda_view(o["y"]), numba_cuda_view(o["h"]), numba_cuda_view(o["angle"]), numba_cuda_view(o["B_prev"]),
        numba_cuda_view(o["x_prev"]))
    return _result(outputs, K, initial_state)


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("mamba3_scan.cu")
CUPY_ENTRY_POINTS = ("mamba3_scan_row_per_thread",)  # the kernels this file launches


@register("mamba3_scan", "cupy")
def mamba3_scan_cupy(x, dt, A, Bm, Cm, theta=None, trap=None, D=None, initial_state=None):
    """CuPy Mamba-3 scan (a thread per state row), float32 CUDA. Returns (y [B, T, H, R, P], Mamba3ScanState)."""
    (Bsz, T, H, R, P, N, K), inputs, outputs = _prepare(x, dt, A, Bm, Cm, theta, trap, D, initial_state,
                                                        "cupy", (torch.float32,))
    i, o = inputs, outputs
    rows, threads = Bsz * H * P, launch.GPU_BLOCK                         # any block size works: threads never cooperate
    launch.cupy(CU_SOURCE, "mamba3_scan_row_per_thread", launch.grid_for(rows, threads), threads,
                (cupy_view(x), cupy_view(dt), cupy_view(A), cupy_view(Bm), cupy_view(Cm), cupy_view(i["theta"]),
                 cupy_view(i["trap"]), cupy_view(i["D"]), cupy_view(i["angle0"]), cupy_view(i["B_prev0"]),
                 cupy_view(i["x_prev0"]), cupy_view(o["y"]), cupy_view(o["h"]), cupy_view(o["angle"]),
                 cupy_view(o["B_prev"]), cupy_view(o["x_prev"]),
                 np.int32(Bsz), np.int32(T), np.int32(H), np.int32(R), np.int32(P), np.int32(N), np.int32(K)))
    return _result(outputs, K, initial_state)


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: H heads of P = V, N = min(2 D, 64)
    state values, MIMO rank R = 2, K = N / 4 rotated pairs (the layer's default turns half the state).

    Drawn as a Mamba3Layer makes them: dt = softplus(.) (about 0.05 - 1), A = -softplus(.) <= 0,
    lambda = sigmoid(.), theta = pi tanh(.), B and C of RMS 1 around the layer's bias of 1 (scaled by
    1/sqrt(N), so a read of N terms stays O(1)); a full non-zero initial state (h, angle in [0, 2 pi),
    B_prev, x_prev). The second case has no rotation and no trapezoid (theta, trap None) and starts from
    zeros, but carries an angle through, so that every output is a tensor (`check_backend` compares
    each of them; a None would have nothing to compare).

    The initial state goes in kwargs: `kernels.check.example_inputs` rebuilds tuples in args with
    `type(value)(generator)`, which a NamedTuple such as Mamba3ScanState does not take.
    """
    from kernels.check import random_tensor
    softplus = torch.nn.functional.softplus
    B, T, H, P = shapes["B"], shapes["T"], shapes["H"], shapes["V"]
    N, R = min(2 * shapes["D"], MAX_STATE_DIM), 2
    K = N // 4
    x = random_tensor((B, T, H, R, P), generator=generator)
    dt = softplus(random_tensor((B, T, H), generator=generator) - 1.0)                 # > 0
    A = -softplus(random_tensor((B, T, H), generator=generator))                       # <= 0
    Bm = (1.0 + random_tensor((B, T, H, R, N), generator=generator)) / math.sqrt(N)
    Cm = (1.0 + random_tensor((B, T, H, R, N), generator=generator)) / math.sqrt(N)
    theta = math.pi * torch.tanh(random_tensor((B, T, H, K), generator=generator))
    trap = torch.sigmoid(random_tensor((B, T, H), generator=generator))
    D = random_tensor((H,), generator=generator)
    state = ops.Mamba3ScanState(
        h=random_tensor((B, H, P, N), generator=generator, scale=0.5),
        angle=2 * math.pi * torch.rand(B, H, K, generator=generator),
        B_prev=(1.0 + random_tensor((B, H, R, N), generator=generator)) / math.sqrt(N),
        x_prev=random_tensor((B, H, R, P), generator=generator))
    carried_angle = ops.Mamba3ScanState(None, angle=2 * math.pi * torch.rand(B, H, K, generator=generator))
    return {"mamba3_scan": ((x, dt, A, Bm, Cm, theta, trap, D), {"initial_state": state}),
            "mamba3_scan (real state, trap None, from zeros)": ((x, dt, A, Bm, Cm, None, None, D),
                                                                {"initial_state": carried_angle})}
