"""The CPU harness itself (cuda_cpu.h, cuda_cpu.cpp) on the kernels of selftest.cu: each built-in gives what CUDA
gives, and each misuse that a GPU would turn into a wrong result, a hang or undefined behaviour is reported."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from cuda_cpu_harness import have_compiler, load

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs a host C++ compiler (g++) for the CPU harness")

# The cases of selftest.cu::Case.
(EXCHANGE, EXCHANGE_NO_BARRIER, WARP_OPS, BARRIER_AFTER_EXIT, TWO_BARRIERS, SHARED_OOB, SHARED_OOB_BY_POINTER,
 DYNAMIC_OOB, DEVICE_ASSERT, SHUFFLE_AFTER_EXIT, EXCHANGE_WARP_SYNC) = range(11)


@pytest.fixture(scope="module")
def selftest():
    lib = load().lib

    def run(case: int, x: torch.Tensor, out_per_thread: int = 1):
        """Launch selftest_kernel with one block of x.numel() threads; returns (error message or None, out)."""
        out = torch.full((x.numel() * out_per_thread,), float("nan"))
        lib.cuda_cpu_set_schedule_seed(ctypes.c_uint64(0))
        rc = lib.cuda_cpu_selftest(ctypes.c_int(case), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                   ctypes.c_int64(x.numel()))
        return (lib.cuda_cpu_last_error().decode() if rc else None), out

    return run


def test_barrier_orders_shared_memory(selftest):
    x = torch.randn(256)
    error, out = selftest(EXCHANGE, x)
    assert error is None and torch.equal(out, x.roll(-1))


def test_missing_barrier_gives_wrong_results(selftest):
    """Without the barrier, threads run to completion one after another in a shuffled order: some read shared
    memory before its writer ran (NaN, the fill of fresh shared memory)."""
    x = torch.randn(256)
    error, out = selftest(EXCHANGE_NO_BARRIER, x)
    assert error is None and out.isnan().any()


def test_warp_collective_is_no_block_barrier(selftest):
    """A warp collective completes when its warp's last lane arrives and that warp runs on: a warp that reads
    another warp's shared memory after a __syncwarp only (as an ldmatrix's exchange) reads it before its writer ran."""
    x = torch.randn(256)
    error, out = selftest(EXCHANGE_WARP_SYNC, x)
    assert error is None and out.isnan().any()


def test_warp_shuffles_and_votes(selftest):
    x = torch.randn(64)
    error, out = selftest(WARP_OPS, x, out_per_thread=4)
    assert error is None
    out, warps = out.view(64, 4), x.view(2, 32)
    assert torch.allclose(out[:, 0], warps.sum(1).repeat_interleave(32), atol=1e-5)  # xor butterfly: warp sums
    assert torch.equal(out[:, 1], warps[:, 3].repeat_interleave(32))  # __shfl_sync from lane 3
    up = torch.cat([warps[:, :1], warps[:, :-1]], dim=1)  # __shfl_up_sync by 1: lane 0 keeps its value
    assert torch.equal(out[:, 2], up.reshape(-1))
    ballots = [float(sum(1 << lane for lane in range(32) if warps[w, lane] > 0) & 0xFFFFFF) for w in range(2)]
    assert out[::32, 3].tolist() == ballots


@pytest.mark.parametrize("case, message", [
    (BARRIER_AFTER_EXIT, r"__syncthreads at .*selftest.cu:\d+ while thread \(\d+, 0, 0\) has exited"),
    (TWO_BARRIERS, r"__syncthreads at .*selftest.cu:\d+ while thread \(\d+, 0, 0\) waits in __syncthreads at "),
    (SHARED_OOB, r"thread \(63, 0, 0\): array index 64 out of bounds at .*selftest.cu"),
    (SHARED_OOB_BY_POINTER, r"thread \(63, 0, 0\): store outside the array it points into at .*selftest.cu"),
    (DYNAMIC_OOB, r"wrote byte 256 of dynamic shared memory, past the 256 bytes of the launch"),
    (DEVICE_ASSERT, r"device assertion `in\[t\] >= 0.0f && \"selftest: negative input\"` failed at .*selftest.cu"),
    (SHUFFLE_AFTER_EXIT, r"__shfl_xor_sync: lane 5 of the mask has exited"),
])
def test_misuse_is_reported(selftest, case, message):
    error, _ = selftest(case, -torch.rand(64))
    assert error is not None
    assert re.search(message, error), error
    assert error.startswith("kernel selftest_kernel, block (0, 0, 0)")
    error, out = selftest(EXCHANGE, torch.ones(64))  # the harness is usable after a fault
    assert error is None and torch.equal(out, torch.ones(64))
