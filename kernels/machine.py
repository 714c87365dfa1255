"""What this machine can run, and the one switch made on import.

numba decides at import time whether `numba.cuda` talks to a GPU or to its
CUDA *simulator* (plain Python threads acting out the same kernel). On a
machine with no CUDA GPU we turn the simulator on before numba is first
imported, so every `numba_cuda` kernel can still be run and checked, slowly,
at small shapes. Set NUMBA_ENABLE_CUDASIM yourself to override the choice.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import torch


def has_cuda_gpu() -> bool:
    """True when PyTorch sees a CUDA device."""
    return torch.cuda.is_available()


def _choose_numba_cuda_target() -> None:
    if "NUMBA_ENABLE_CUDASIM" in os.environ or "numba" in sys.modules:
        return  # the user chose, or numba already decided
    if not has_cuda_gpu():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


_choose_numba_cuda_target()


def cuda_simulator_enabled() -> bool:
    """True when numba.cuda is the simulator rather than a real GPU."""
    try:
        from numba import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


def make_simulator_shared_arrays_thread_safe() -> bool:
    """Fix a race in numba's CUDA simulator; returns whether the simulator is patched.

    The simulator gives each block one array per `cuda.shared.array` line, found or created with an unlocked
    check-then-set. When two threads of a block race there, they get different arrays, and a reduction through
    shared memory silently loses partial sums. This was seen once as a wrong Adam norm in a full test run. On a
    GPU, shared memory is one per block; here a lock makes it so. Called on import of `kernels`."""
    if not cuda_simulator_enabled():
        return False
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "thread_safe", False):
        return True
    original, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:            # dynamic shared memory, or the simulator's refusal
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)                          # the kernel line: the simulator's own key
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                if not isinstance(dtype, np.dtype):
                    dtype = numpy_support.as_dtype(dtype) if hasattr(dtype, "key") else np.dtype(dtype)
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array.thread_safe = True
    shared.array = array
    return True


make_simulator_shared_arrays_thread_safe()


@functools.cache
def backend_status() -> dict[str, str]:
    """One line per backend: 'ready: …', 'simulator: …' or 'unavailable: <why, in plain words>'."""
    status = {"reference": "ready: plain PyTorch"}
    try:
        import numba
        status["numba"] = f"ready: numba {numba.__version__} on {os.cpu_count()} CPU cores"
    except ImportError as err:
        status["numba"] = f"unavailable: numba is not installed ({err})"
    try:
        from numba import cuda
        if cuda_simulator_enabled():
            status["numba_cuda"] = "simulator: numba's CUDA simulator (no GPU here); correct but very slow, keep shapes small"
        elif cuda.is_available():
            name = cuda.get_current_device().name
            status["numba_cuda"] = f"ready: {name.decode() if isinstance(name, bytes) else name}"
        else:
            status["numba_cuda"] = "unavailable: numba finds no CUDA driver or GPU"
    except ImportError as err:
        status["numba_cuda"] = f"unavailable: numba-cuda is not installed ({err})"
    status["cupy"] = _cupy_status()
    return status


def _cupy_status() -> str:
    try:
        import cupy
    except ImportError as err:
        return f"unavailable: cupy is not installed ({err})"
    if not has_cuda_gpu():
        return "unavailable: CuPy kernels need a CUDA GPU and this machine has none (their CUDA C is still compiled by the tests, with nvcc and NVRTC)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # the CUDA runtime's own error types vary by version
        return f"unavailable: CuPy cannot reach the GPU ({type(err).__name__}: {err})"
    return f"ready: CuPy {cupy.__version__}, {n} device(s)"


def device_for(backend: str) -> str:
    """The torch device a backend's kernels take: "cpu" for numba (and numba_cuda under the simulator), else "cuda"."""
    if backend in ("reference", "numba") or (backend == "numba_cuda" and cuda_simulator_enabled()):
        return "cpu"
    return "cuda"


def nvcc_path() -> str | None:
    """Path of nvcc if the CUDA compiler is installed (used to compile-check the .cu files)."""
    return shutil.which("nvcc")


def runnable_backends() -> list[str]:
    """Backends this machine can execute (the simulator counts)."""
    return [b for b, s in backend_status().items() if not s.startswith("unavailable")]
