"""Internode high-throughput mode on GPUs, against the plain-torch reference.

Nodes come from `TRITONEP_NVL_DOMAIN_SIZE`: the RDMA memory is an NVSHMEM heap and every
cross-node byte goes through NVSHMEM puts (over NVLink or HBM here, standing in for the NIC).
* one rank per GPU (2 GPUs): 2 nodes x 1 rank, NCCL group;
* ranks sharing GPU 0, gloo group: 2 nodes x 1 rank, and 2 nodes x 2 ranks with the put path
  forced between nodes (`TRITONEP_FORCE_PUT=1`: NVSHMEM puts instead of stores to mapped peers).
  NVSHMEM needs MPS for ranks that share a GPU: these run only where `CUDA_MPS_PIPE_DIRECTORY`
  names a running daemon (`scripts/gpu_check.sh` starts one).
Each runs the standard matrix at a moderate shape and the tiny-ring case (two-slot rings, one-token
chunks: every ring wraps many times). `benchmarks/internode.py` checks DeepEP's shape and times it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tritonep.testing import internode as inter

NODES_OF_ONE = {"TRITONEP_NVL_DOMAIN_SIZE": "1"}
TOKENS_PER_RANK = [512, 301, 77, 0]
MODERATE = dict(
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
TINY_RINGS_TOKENS = [96, 70, 33, 5]
TINY_RINGS = dict(
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


def _run_both(pool, world_size: int) -> None:
    results = pool.run(
        inter.check_internode,
        num_tokens=TOKENS_PER_RANK[:world_size],
        **MODERATE,
        timeout=500,
    )
    assert all(r["dispatches"] == 9 and r["combines"] == 4 for r in results), results
    assert sum(r["delivered"] for r in results) > 0, results
    results = pool.run(
        inter.check_internode,
        num_tokens=TINY_RINGS_TOKENS[:world_size],
        **TINY_RINGS,
        timeout=300,
    )
    assert all(r["dispatches"] == 2 for r in results), results


@pytest.mark.gpu
@pytest.mark.world_size(2)
def test_internode_2x1_one_rank_per_gpu(gpu_pool):
    _run_both(gpu_pool(2, **NODES_OF_ONE), 2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), reason="needs a running MPS daemon"
)
@pytest.mark.parametrize(
    ("world_size", "ranks_per_node", "force_put"),
    [(2, 1, "0"), (4, 2, "1")],
    ids=["2x1", "2x2-put"],
)
def test_internode_ranks_sharing_one_gpu(shared_gpu_pool, world_size, ranks_per_node, force_put):
    pytest.importorskip("nvidia.nvshmem", reason="needs the nvidia-nvshmem wheel")
    pool = shared_gpu_pool(
        world_size,
        # MPS shares must add up to at most 100 for NVSHMEM ranks sharing a GPU.
        CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(100 // world_size),
        TRITONEP_NVL_DOMAIN_SIZE=str(ranks_per_node),
        TRITONEP_FORCE_PUT=force_put,
    )
    _run_both(pool, world_size)
