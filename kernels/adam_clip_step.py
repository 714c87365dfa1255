"""Adam with gradient clipping, fused on flat buffers: one reduction, then one element-wise update.

Reference: `refimpl.ops.adam_clip_step` (= clip_grad_norm_ then torch.optim.Adam's step).
    param, grad, exp_avg, exp_avg_sq [N], step t, lr, beta1, beta2, eps, weight_decay, max_norm or None
    -> total_norm (0-dim, the gradient norm before clipping); param, exp_avg, exp_avg_sq updated IN PLACE

The observation every version here uses: only one number couples the N elements, the gradient
norm. Once it is known, element i's update reads param[i], grad[i], m[i], v[i] and nothing else:

    pass 1   s = sum_i grad[i]^2                      a parallel reduction (the only communication)
    pass 2   coef = min(1, max_norm / (sqrt(s) + 1e-6))
             g = coef grad[i] + weight_decay param[i];  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
             param[i] -= step_size m / (sqrt(v) / bc2_sqrt + eps)          for every i, independently

with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed once on the host. The
step is memory-bound: pass 2 streams four buffers in and three out (28 bytes per float32 element)
for about a dozen flops, pass 1 reads one buffer.

The sum of squares is accumulated in float64 by every backend (not in the inputs' precision,
as other kernels here do). It is the one number that scales every element, and it sums N terms
of one sign: a float32 running sum of k terms has an error bound of k * 6e-8 relative, 0.6 for a
CPU thread summing 10^7 of a 10^8-parameter model's squares (typical errors are far smaller, but
nothing guarantees it). In float64 the same bound is ~1e-9, and the cost is nil for a pass that
waits on memory anyway.

These kernels mutate their inputs, so the usual `_prepare` changes: no `new_output` for the
three updated buffers (they are the outputs), the returned norm is the only new tensor, and
there is no `forward_only` check (an optimiser step is never part of a graph; the reference runs
under no_grad, and the kernels write through detached views). They also need the buffers
contiguous (the refimpl check refuses a strided view, which `numpy_view` would otherwise
silently copy, losing the update). There is no per-thread array, so no size limit but memory
(indices are 64-bit). After writing, each kernel bumps the three buffers' autograd version
counters, as the reference's in-place torch ops do.

The ladder
    numba       pass 1: prange reduction of the float64 sum; pass 2: prange over elements. The
                clip coefficient is computed on the host in between (it is the CPU: no round trip).
    numba_cuda  v1 (registered): kernel 1, a grid-stride loop per thread, a shared-memory tree
                per block and one atomic add per block into a 1-element float64 device array;
                kernel 2, one thread per element, reading the norm from that device array, so
                nothing is copied back to the host between the passes.
    cupy        adam_clip_step.cu, adam_sum_of_squares and adam_clip_update: the same two kernels in CUDA C.
Faster rungs (warp-shuffle reductions; a multi-tensor "apply" over a list of buffers instead of
one flat buffer, as apex does; bf16 params with float32 master weights) are the GPU issue's work.
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
from kernels.tensors import (NUMBA_FASTMATH, cupy_view, expect_device, expect_dtype, new_output,
                             numba_cuda_view, numpy_view)
from refimpl import ops

register("adam_clip_step", "reference")(ops.adam_clip_step)

#: the arguments the op updates in place (param, exp_avg, exp_avg_sq): kernels.check compares them as outputs
IN_PLACE_ARGUMENTS = {"adam_clip_step": (0, 2, 3)}

REDUCE_BLOCK = 128        # shared-memory length of numba_cuda's reduction; its launch uses <= this, a power of two
CUPY_REDUCE_BLOCK = 256   # = ADAM_BLOCK in adam_clip_step.cu: the reduction's block size there
MAX_REDUCE_BLOCKS = 1024  # grid cap for the reductions: the grid-stride loop covers the rest (<= 1024 atomics)
SIMULATOR_REDUCE_BLOCKS = 2  # under numba's simulator: still two blocks meeting in the atomic, few threads


def _prepare(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm, backend, dtypes):
    N = ops.check_adam_clip_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                                   max_norm)
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    expect_dtype("adam_clip_step", "param", param, dtypes)   # the check above made all four one dtype
    expect_device("adam_clip_step", backend, tensors)
    # Host scalars: the bias corrections depend only on t, so they are computed once here in Python floats.
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    return N, step_size, bc2_sqrt


def _mark_written(*tensors: torch.Tensor) -> None:
    """Tell autograd these were modified in place (the kernels wrote through raw views it cannot see)."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


def _norm_output(norm_sq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The returned norm: sqrt of the float64 sum, in the buffers' dtype, 0-dim, computed where it lives
    (on the GPU for the CUDA backends: reading it would make the host wait)."""
    return norm_sq.sqrt().to(dtype).reshape(())


def _reduce_blocks(N: int, threads: int) -> int:
    from kernels.machine import cuda_simulator_enabled
    cap = SIMULATOR_REDUCE_BLOCKS if cuda_simulator_enabled() else MAX_REDUCE_BLOCKS
    return max(1, min(launch.grid_for(N, threads), cap))


# ---------------------------------------------------------------- numba (CPU)

@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _sum_of_squares_cpu(grad):
    total = 0.0                                            # float64, whatever grad's dtype (see the docstring)
    for i in numba.prange(grad.shape[0]):
        x = np.float64(grad[i])
        total += x * x
    return total


@numba.njit(parallel=True, fastmath=NUMBA_FASTMATH, cache=True)
def _adam_update_cpu(param, grad, exp_avg, exp_avg_sq, coef, beta1, beta2, step_size, bc2_sqrt, eps, weight_decay):
    real = param.dtype.type                                # compute in the buffers' precision (vectorises)
    c, b1, b2 = real(coef), real(beta1), real(beta2)
    one_minus_b1, one_minus_b2 = real(1.0 - beta1), real(1.0 - beta2)
    lr_t, bc2, e, wd = real(step_size), real(bc2_sqrt), real(eps), real(weight_decay)
    decay = weight_decay != 0.0
    for i in numba.prange(param.shape[0]):
        p = param[i]
        g = c * grad[i]
        if decay:
            g += wd * p                                    # L2 form (torch.optim.Adam), not AdamW
        m = b1 * exp_avg[i] + one_minus_b1 * g
        v = b2 * exp_avg_sq[i] + one_minus_b2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] = p - lr_t * m / (math.sqrt(v) / bc2 + e)


@register("adam_clip_step", "numba")
def adam_clip_step_numba(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.0, max_norm=None):
    """numba CPU Adam + clipping, float32/float64 CPU buffers, updated in place. Returns the norm (0-dim)."""
    _, step_size, bc2_sqrt = _prepare(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                                      max_norm, "numba", (torch.float32, torch.float64))
    norm = math.sqrt(_sum_of_squares_cpu(numpy_view(grad)))                  # pass 1
    coef = 1.0 if max_norm is None else min(1.0, max_norm / (norm + ops.CLIP_EPS))
    _adam_update_cpu(numpy_view(param), numpy_view(grad), numpy_view(exp_avg), numpy_view(exp_avg_sq),  # pass 2
                     coef, beta1, beta2, step_size, bc2_sqrt, eps, weight_decay)
    _mark_written(param, exp_avg, exp_avg_sq)
    total_norm = new_output((), param.dtype, param.device)
    total_norm.fill_(norm)
    return total_norm


# ---------------------------------------------------------------- numba CUDA

@cuda.jit
def _sum_of_squares_v1(grad, norm_sq):
    partial = cuda.shared.array(REDUCE_BLOCK, numba.float64)
    tid = cuda.threadIdx.x
    acc = numba.float64(0.0)
    i, stride = cuda.grid(1), cuda.gridsize(1)
    while i < grad.shape[0]:                               # grid-stride: neighbouring threads, neighbouring i
        x = numba.float64(grad[i])
        acc += x * x
        i += stride
    partial[tid] = acc
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:                                        # tree: log2(block) halvings, a barrier after each
        if tid < half:
            partial[tid] += partial[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        cuda.atomic.add(norm_sq, 0, partial[0])            # one atomic per block


@cuda.jit
def _adam_update_v1(param, grad, exp_avg, exp_avg_sq, norm_sq, clip, max_norm, beta1, beta2, one_minus_b1,
                    one_minus_b2, step_size, bc2_sqrt, eps, weight_decay):
    i = cuda.grid(1)
    if i >= param.shape[0]:
        return
    coef = numba.float32(1.0)
    if clip:                                               # every thread reads the same norm (a broadcast)
        coef = numba.float32(min(1.0, max_norm / (math.sqrt(norm_sq[0]) + 1e-6)))
    p = param[i]
    g = coef * grad[i]
    if weight_decay != 0:
        g += weight_decay * p
    m = beta1 * exp_avg[i] + one_minus_b1 * g
    v = beta2 * exp_avg_sq[i] + one_minus_b2 * g * g
    exp_avg[i] = m
    exp_avg_sq[i] = v
    param[i] = p - step_size * m / (math.sqrt(v) / bc2_sqrt + eps)


@register("adam_clip_step", "numba_cuda")
def adam_clip_step_numba_cuda(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
                              eps=1e-8, weight_decay=0.0, max_norm=None):
    """numba CUDA Adam + clipping (v1: block reduction + atomic, then a thread per element), float32,
    updated in place. Returns the norm (0-dim, on the device)."""
    N, step_size, bc2_sqrt = _prepare(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                                      max_norm, "numba_cuda", (torch.float32,))
    threads = launch.block_size()                           # 32 or 128: a power of two <= REDUCE_BLOCK
    norm_sq = torch.zeros(1, dtype=torch.float64, device=param.device)   # the accumulator must start at 0
    launch.numba_cuda(_sum_of_squares_v1, _reduce_blocks(N, threads), threads, numba_cuda_view(grad), numba_cuda_view(norm_sq))
    f32 = np.float32
    launch.numba_cuda(_adam_update_v1, launch.grid_for(N, threads), threads,
        numba_cuda_view(param), numba_cuda_view(grad), numba_cuda_view(exp_avg), numba_cuda_view(exp_avg_sq),
        numba_cuda_view(norm_sq), max_norm is not None, np.float64(max_norm or 0.0), f32(beta1), f32(beta2),
        f32(1 - beta1), f32(1 - beta2), f32(step_size), f32(bc2_sqrt), f32(eps), f32(weight_decay))
    _mark_written(param, exp_avg, exp_avg_sq)
    return _norm_output(norm_sq, param.dtype)


# ---------------------------------------------------------------- CuPy raw CUDA

CU_SOURCE = Path(__file__).with_name("adam_clip_step.cu")
CUPY_ENTRY_POINTS = ("adam_sum_of_squares", "adam_clip_update")  # the kernels this file launches


@register("adam_clip_step", "cupy")
def adam_clip_step_cupy(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, max_norm=None):
    """CuPy Adam + clipping (the two kernels of adam_clip_step.cu), float32 CUDA, updated in place. Returns the norm (0-dim)."""
    N, step_size, bc2_sqrt = _prepare(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                                      max_norm, "cupy", (torch.float32,))
    norm_sq = torch.zeros(1, dtype=torch.float64, device=param.device)
    threads = launch.GPU_BLOCK                                    # the update: any block size
    launch.cupy(CU_SOURCE, "adam_sum_of_squares", _reduce_blocks(N, CUPY_REDUCE_BLOCK), CUPY_REDUCE_BLOCK,
                (cupy_view(grad), cupy_view(norm_sq), np.int64(N)))
    launch.cupy(CU_SOURCE, "adam_clip_update", launch.grid_for(N, threads), threads,
                (cupy_view(param), cupy_view(grad), cupy_view(exp_avg), cupy_view(exp_avg_sq), cupy_view(norm_sq),
                 np.int64(N), np.int32(max_norm is not None), np.float64(max_norm or 0.0), np.float32(beta1),
                 np.float32(beta2), np.float32(1 - beta1), np.float32(1 - beta2), np.float32(step_size),
                 np.float32(bc2_sqrt), np.float32(eps), np.float32(weight_decay)))
    _mark_written(param, exp_avg, exp_avg_sq)
    return _norm_output(norm_sq, param.dtype)


def example_inputs(shapes: dict, generator=None) -> dict:
    """{case: (args, kwargs)} for `kernels.check.example_shapes(...)`: one flat buffer of N = R C elements
    (240 at `tiny`, 260,096 at `small`), moments as after ten steps (m ~ 0.1 g, v ~ g^2 > 0), step 11.

    The op's output is the norm only; its real results are the three buffers it updates in place
    (IN_PLACE_ARGUMENTS), which `kernels.check.check_case` compares too, each side on its own copies.
    """
    from kernels.check import random_tensor
    N = shapes["R"] * shapes["C"]
    param = random_tensor((N,), generator=generator)
    grad = random_tensor((N,), generator=generator, scale=0.1)
    exp_avg = random_tensor((N,), generator=generator, scale=0.01)
    exp_avg_sq = random_tensor((N,), generator=generator, scale=0.1) ** 2 + 1e-4
    # Every keyword away from its default; eps = 1e-3 is ~1% of sqrt(v) ~ 0.1, so a kernel dropping it is seen.
    clipped = dict(step=11, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.01,
                   max_norm=0.05 * N ** 0.5)                                          # the norm is ~0.1 sqrt(N)
    plain = dict(step=11, lr=3e-3)
    return {"adam_clip_step": ((param, grad, exp_avg, exp_avg_sq), clipped),
            "adam_clip_step (no clipping, no weight decay)":
                ((param.clone(), grad.clone(), exp_avg.clone(), exp_avg_sq.clone()), plain)}
