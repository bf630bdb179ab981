"""Low-latency mode on one GPU shared by 2 or 4 rank processes (gloo group, CUDA backend, peer
stores), at DeepEP's decode shape, against the reference. Ranks sharing a GPU should run under MPS
(`scripts/gpu_check.sh` starts it); `benchmarks/low_latency.py` adds CUDA-graph replays, the forced
NVSHMEM put path and timings.
"""

import pytest
from test_low_latency import check_shrink_round, check_timeout_errors

from tritonep.protocol import ll_register_cap
from tritonep.testing import low_latency as ll

DEEPEP_SHAPE = dict(num_tokens=128, hidden=7168, num_topk=8, num_experts=288, max_tokens=128)


def check_on_one_gpu(pool, combos: list[dict]) -> None:
    """Every combination on every rank of `pool`, ~1 % of the top-k entries -1."""
    results = pool.run(
        ll.check_low_latency_matrix,
        combos,
        **DEEPEP_SHAPE,
        drop=0.01,
        timeout=250,  # below gpu_check's stage limit, so a hang reports every rank's stack
    )
    assert results == [len(combos)] * pool.world_size


@pytest.mark.gpu
def test_low_latency_deepep_shape_two_ranks_on_one_gpu(shared_gpu_pool):
    pool = shared_gpu_pool(2)
    check_on_one_gpu(pool, ll.pairwise_matrix())
    # Every build this machine made fits two programs per SM (the launch sizes of ranks sharing
    # a GPU count on it; protocol.ll_register_cap).
    for built in pool.run(ll.kernel_resources, **DEEPEP_SHAPE):
        assert {(row["kernel"], row["role"]) for row in built} >= {
            ("dispatch", "fused"),
            ("combine", "fused"),
            ("combine", "send"),
            ("combine", "receive"),
        }
        for row in built:
            assert row["registers"] <= ll_register_cap(8), row  # 8 warps per LL program on a GPU


@pytest.mark.gpu
def test_low_latency_four_ranks_on_one_gpu(shared_gpu_pool):
    """4 ranks on one GPU: each launches one program per SM of a quarter of the SMs
    (`resident_program_budget`), so all four fused launches are resident together."""
    ue8m0 = dict(use_fp8=True, round_scale=True, use_ue8m0=True)
    combos = [
        dict(**ue8m0, hook=True, twice=True, use_logfmt=True),
        dict(use_fp8=False, zero_copy=True, with_out=True),
        dict(use_fp8=True, use_logfmt=True, with_out=True),
        dict(use_fp8=True, hook=True),
    ]
    check_on_one_gpu(shared_gpu_pool(4), combos)


@pytest.mark.gpu
def test_low_latency_timeout_two_ranks_on_one_gpu(shared_gpu_pool):
    """A peer that never calls: rank 0's dispatch at DeepEP's shape gives up after
    TRITONEP_TIMEOUT_S and reports it on its next call, with no device fault on the way."""
    pool = shared_gpu_pool(2, TRITONEP_TIMEOUT_S="3")
    pool.run(ll.make_ll_buffer, **DEEPEP_SHAPE, timeout=120)
    first = pool.run(ll.timeout_round, dead_rank=1, stall_s=12.0, **DEEPEP_SHAPE, timeout=120)[0]
    check_timeout_errors(first["errors"])


@pytest.mark.gpu
def test_low_latency_shrink_three_ranks_on_one_gpu(shared_gpu_pool):
    """Shrink mode on the GPU at DeepEP's shape: first a rank masked between dispatch and combine,
    then rank 2 never calls, and ranks 0 and 1 time out on it, mask it and complete without it."""
    pool = shared_gpu_pool(3, TRITONEP_TIMEOUT_S="3")
    pool.run(ll.make_ll_buffer, shrink=True, **DEEPEP_SHAPE, timeout=120)
    for result in pool.run(ll.masked_combine_round, masked_rank=2, **DEEPEP_SHAPE, timeout=120):
        assert result["masked_ok"] and result["after_ok"], result
    check_shrink_round(pool, DEEPEP_SHAPE)
