"""Internode high-throughput mode on GPUs, against the plain-torch reference.

Nodes come from `TRITONEP_NVL_DOMAIN_SIZE`: the RDMA memory is an NVSHMEM heap and every
cross-node byte goes through NVSHMEM puts (over NVLink or HBM here, standing in for the NIC).
* one rank per GPU (2 GPUs): 2 nodes x 1 rank, NCCL group;
* 2 ranks sharing GPU 0: 2 nodes x 1 rank, gloo group. NVSHMEM needs MPS for ranks that share a
  GPU: runs only where `CUDA_MPS_PIPE_DIRECTORY` names a running daemon (`scripts/gpu_check.sh`
  starts one).
Each runs the standard matrix at a moderate shape and the tiny-ring case (two-slot rings, one-token
chunks: every ring wraps many times). `benchmarks/internode.py` checks DeepEP's shape and times it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tritonep.testing import internode as inter

NODES_OF_ONE = {"TRITONEP_NVL_DOMAIN_SIZE": "1"}
SHARED_GPU_ENV = {
    "TRITONEP_BACKEND": "cuda",
    "TRITON_INTERPRET": "0",
    "CUDA_VISIBLE_DEVICES": "0",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
    "TRITONEP_TIMEOUT_S": "60",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
}
MODERATE = dict(
    num_tokens=[512, 301],
    hidden=2048,
    num_topk=8,
    num_experts=64,
    num_sms=8,
    nvl_chunk=8,
    nvl_capacity=64,
    rdma_chunk=8,
    rdma_capacity=64,
    num_nvl_bytes=256 << 20,
    num_rdma_bytes=256 << 20,
    expert_alignment=4,
    dtypes=(torch.bfloat16, torch.float32),
)
TINY_RINGS = dict(
    num_tokens=[96, 70],
    hidden=512,
    num_topk=4,
    num_experts=16,
    num_sms=4,
    nvl_chunk=1,
    nvl_capacity=2,
    rdma_chunk=1,
    rdma_capacity=2,
    matrix="quick",
)


def _run_both(pool) -> None:
    results = pool.run(inter.check_internode, **MODERATE, timeout=500)
    assert all(r["dispatches"] == 9 and r["combines"] == 4 for r in results), results
    assert sum(r["delivered"] for r in results) > 0, results
    results = pool.run(inter.check_internode, **TINY_RINGS, timeout=300)
    assert all(r["dispatches"] == 2 for r in results), results


@pytest.mark.gpu
@pytest.mark.world_size(2)
def test_internode_2x1_one_rank_per_gpu(gpu_pool):
    _run_both(gpu_pool(2, **NODES_OF_ONE))


@pytest.mark.gpu
@pytest.mark.skipif(
    not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), reason="needs a running MPS daemon"
)
def test_internode_2x1_two_ranks_on_one_gpu(cpu_pool):
    pytest.importorskip("nvidia.nvshmem", reason="needs the nvidia-nvshmem wheel")
    _run_both(cpu_pool(2, **SHARED_GPU_ENV, **NODES_OF_ONE))
