"""numba's CUDA simulator, made faithful where the book relies on it: one shared array per block."""

import threading

import pytest

from kernels.machine import cuda_simulator_enabled, make_simulator_shared_arrays_thread_safe

pytestmark = pytest.mark.skipif(not cuda_simulator_enabled(), reason="only the simulator needs the fix")


def test_every_thread_of_a_block_gets_the_same_shared_array():
    import numba
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    assert make_simulator_shared_arrays_thread_safe()
    for _ in range(100):                                  # 100 blocks of 32 threads, released together
        block, threads = FakeCUDAShared(0), 32
        start, got = threading.Barrier(threads), [None] * threads

        def thread(t):
            start.wait()
            got[t] = block.array(8, numba.float64)        # the same line for every thread, as in a kernel

        workers = [threading.Thread(target=thread, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert all(a is got[0] for a in got), "two threads of one block got different shared arrays"
    assert block.array(0, numba.float64).size == 0        # dynamic shared memory still goes the simulator's way
