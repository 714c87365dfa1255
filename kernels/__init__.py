"""kernels: fast versions of `refimpl.ops`, swapped in by name.

    import kernels
    kernels.backend_status()              # what this machine can run, in words
    kernels.registered()                  # {op: [backends]}
    with kernels.use("numba"):            # swap every numba kernel in, for this block
        logits, _ = model(idx)

Backends: `reference` (plain PyTorch), `numba` (CPU), `numba_cuda` (GPU, or numba's
CUDA simulator when there is none), `cupy` (raw CUDA C from the .cu file beside
each op's module). Importing this package turns the CUDA simulator on when no
GPU is present (see `kernels.machine`).
"""

from kernels import machine  # first: it decides numba's CUDA target before numba is imported
from kernels.machine import backend_status, cuda_simulator_enabled, has_cuda_gpu, runnable_backends
from kernels.registry import BACKENDS, KernelNotFound, get, register, registered, use

# Importing an op's module registers its kernels. Each file is named after its op (refimpl's name for it).
from kernels import (adam_clip_step, attention, fast_weight_memory, gated_delta_rule, mamba3_scan,  # noqa: E402,F401
                     mlstm, modulated_linear, moe, neighbourhood_attention, quant_packing,           # (after machine)
                     rms_norm, selective_scan, ties_merge, vq_nearest)

#: every op module, in the order the checks and benchmarks list them
OP_MODULES = (rms_norm, attention, moe, gated_delta_rule, selective_scan, mlstm, fast_weight_memory, ties_merge,
              mamba3_scan, quant_packing, modulated_linear, neighbourhood_attention, vq_nearest, adam_clip_step)

__all__ = ["BACKENDS", "KernelNotFound", "backend_status", "cuda_simulator_enabled", "get", "has_cuda_gpu",
           "register", "registered", "runnable_backends", "use", "machine", "OP_MODULES"]
