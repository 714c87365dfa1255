"""Between torch tensors and the kernels: argument checks, array views, outputs.

Kernels take and return torch tensors. CPU tensors reach numba as NumPy views
(no copy); CUDA tensors reach numba-cuda and CuPy through
`__cuda_array_interface__` (no copy). Under numba's CUDA simulator the
`numba_cuda` kernels take CPU tensors, since there is no device memory.

Every check raises ValueError saying what was expected, before any kernel runs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kernels.machine import cuda_simulator_enabled

_POISON = False

#: numba CPU kernels' fast-math flags: reassociation lets LLVM vectorise sums. Not the full
#: fastmath set, which also assumes no inf/NaN (the online softmax starts from -inf, and a
#: NaN input must stay visible in the output).
NUMBA_FASTMATH = {"reassoc", "contract", "arcp"}


@contextmanager
def poisoned_outputs():
    """Within the block, kernel outputs start as NaN (floats) or -1 (ints), so an
    element a kernel forgets to write cannot pass a comparison by luck."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill: uninitialised, or poisoned inside `poisoned_outputs()`."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def forward_only(op: str, *tensors: torch.Tensor) -> None:
    """Kernels compute forward passes only; refuse to silently drop a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{op}: kernels are forward-only and would drop the gradient; "
                         "call under torch.no_grad() or use the reference op to train")


def expect_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Refuse `t` (ValueError naming op, argument and the dtypes allowed) unless its dtype is in `allowed`."""
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{op}: {name} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def expect_device(op: str, backend: str, tensors: dict[str, torch.Tensor]) -> None:
    """numba: CPU tensors. cupy: CUDA tensors. numba_cuda: CUDA tensors (CPU under the simulator)."""
    if backend == "numba":
        want, why = "cpu", "numba kernels run on the CPU"
    elif backend == "numba_cuda" and cuda_simulator_enabled():
        want, why = "cpu", "numba's CUDA simulator is on (no GPU), so numba_cuda kernels take CPU tensors"
    else:
        want, why = "cuda", f"{backend} kernels run on a CUDA GPU"
    for name, t in tensors.items():
        if t.device.type != want:
            raise ValueError(f"{op}: {name} is a {t.device.type} tensor but {why}; move it with .to('{want}')")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def numpy_view(t: torch.Tensor):
    """A NumPy view of a CPU tensor (made contiguous first if it is not)."""
    return t.detach().contiguous().numpy()


def numba_cuda_view(t: torch.Tensor):
    """What a numba.cuda kernel takes: a NumPy view under the simulator, else a device-array view."""
    if cuda_simulator_enabled():
        return numpy_view(t)
    from numba import cuda
    return cuda.as_cuda_array(t.detach().contiguous())


def cupy_view(t: torch.Tensor):
    """A CuPy array sharing a CUDA tensor's memory."""
    import cupy
    return cupy.asarray(t.detach().contiguous())
