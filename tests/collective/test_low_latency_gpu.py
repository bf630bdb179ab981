"""Low-latency mode on one GPU shared by 2 rank processes (gloo group, CUDA backend, peer stores),
at DeepEP's decode shape, against the reference. Ranks sharing a GPU should run under MPS
(`scripts/gpu_check.sh` starts it); `benchmarks/low_latency.py` adds CUDA-graph replays, the forced
NVSHMEM put path and timings.
"""

import pytest

from tritonep.testing import low_latency as ll

SHARED_GPU_ENV = {
    "TRITONEP_BACKEND": "cuda",
    "TRITON_INTERPRET": "0",
    "CUDA_VISIBLE_DEVICES": "0",
    "TRITONEP_TIMEOUT_S": "60",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
}


@pytest.mark.gpu
def test_low_latency_deepep_shape_two_ranks_on_one_gpu(cpu_pool):
    combos = ll.pairwise_matrix()
    results = cpu_pool(2, **SHARED_GPU_ENV).run(
        ll.check_low_latency_matrix,
        combos,
        num_tokens=128,
        hidden=7168,
        num_topk=8,
        num_experts=288,
        max_tokens=128,
        drop=0.01,
        timeout=500,
    )
    assert results == [len(combos)] * 2
