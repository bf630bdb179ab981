"""Two ranks sharing one GPU (gloo group, CUDA backend, CUDA IPC peer memory).

Lets a single-GPU machine run every cross-rank code path compiled: queues, ring wrap-around under
back-pressure, FP8, top-k and worst-case dispatch. Timings from such a run mean nothing (the two
ranks' kernels share one GPU); correctness is exact.
"""

import pytest
from test_gpu_hygiene import check_no_growth, create_destroy_cycles_task

from tritonep.testing import checks


@pytest.mark.gpu
def test_two_ranks_on_one_gpu(shared_gpu_pool):
    pool = shared_gpu_pool(2)
    pool.run(
        checks.check_intranode,
        num_tokens=512,
        hidden=7168,
        num_topk=8,
        num_experts=256,
        num_sms=24,
        chunk=6,
        recv_capacity=256,
        num_nvl_bytes=int(1e9),
        matrix="full",
        timeout=400,
    )
    pool.run(
        checks.check_intranode,
        num_tokens=3000,
        hidden=2048,
        num_topk=8,
        num_experts=64,
        num_sms=8,
        chunk=4,
        recv_capacity=8,
        num_nvl_bytes=int(1e9),
        matrix="quick",
        timeout=300,
    )


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_release_their_ipc_memory(shared_gpu_pool):
    """CUDA IPC peer memory: each rank's allocation is freed once both have destroyed the buffer."""
    pool = shared_gpu_pool(2)
    check_no_growth(pool.run(create_destroy_cycles_task, cycles=30, timeout=400))
