"""Intranode dispatch/combine against the plain-torch reference (tritonep.testing.checks).

CPU: 1-4 rank processes, Triton interpreter, tiny shapes, DeepEP's full variant matrix.
GPU: one rank per GPU, DeepEP's default shape (4096 tokens, hidden 7168, top-8 of 256 experts).
"""

import pytest

from conftest import gpu_count
from tritonep.testing import checks

PAIRWISE = dict(matrix="pairwise")

CPU_CASES = [
    pytest.param(1, dict(num_tokens=16, hidden=128, num_topk=4, num_experts=8), id="r1"),
    pytest.param(2, dict(num_tokens=20, hidden=256, num_topk=4, num_experts=16), id="r2"),
    # 3 and 4 ranks: every pair of the stream options still meets (`matrix="pairwise"`); the
    # options are host-side, the kernels are those of the full matrix.
    pytest.param(
        3,
        dict(num_tokens=17, hidden=64, num_topk=3, num_experts=12, num_sms=6, chunk=3) | PAIRWISE,
        id="r3-odd",
    ),
    pytest.param(
        4,
        dict(num_tokens=8, hidden=128, num_topk=5, num_experts=32, num_sms=2, chunk=2) | PAIRWISE,
        id="r4-one-channel",
        # 4 ranks: edges[uneven] and the internode 2x2 tests; one channel: edges[r6].
        marks=pytest.mark.slow,
    ),
]

EDGE_CASES = [
    pytest.param(2, dict(num_tokens=[0, 9], hidden=64, num_topk=2, num_experts=4), id="empty-rank"),
    pytest.param(
        2, dict(num_tokens=1, hidden=32, num_topk=1, num_experts=2, drop=0.0), id="one-token"
    ),
    pytest.param(
        3,
        dict(
            num_tokens=24,
            hidden=64,
            num_topk=6,
            num_experts=24,
            skew=4.0,
            drop=0.3,
            expert_alignment=4,
        ),
        id="skewed",
    ),
    pytest.param(
        2,
        dict(
            num_tokens=40,
            hidden=8,
            num_topk=8,
            num_experts=16,
            num_sms=8,
            chunk=2,
            recv_capacity=64,
        ),
        id="narrow-rows",
    ),
    pytest.param(
        4,
        dict(num_tokens=[5, 0, 11, 3], hidden=96, num_topk=3, num_experts=8, drop=0.5),
        id="uneven",
    ),
    pytest.param(
        6, dict(num_tokens=5, hidden=32, num_topk=3, num_experts=12, num_sms=2, chunk=2), id="r6"
    ),
    pytest.param(
        8,
        dict(num_tokens=6, hidden=32, num_topk=3, num_experts=16, num_sms=2, chunk=2),
        id="r8",
        marks=pytest.mark.slow,  # 6 ranks pad to the same 8 rank lanes in the default run
    ),
]


@pytest.mark.parametrize("world_size,case", CPU_CASES)
def test_intranode_matrix_cpu(cpu_pool, world_size, case):
    results = cpu_pool(world_size).run(checks.check_intranode, **case, timeout=600)
    dispatches = 24 if case.get("matrix") == "pairwise" else 48
    assert all(r["dispatches"] >= dispatches and r["combines"] >= 3 for r in results), results


@pytest.mark.parametrize("world_size,case", EDGE_CASES)
def test_intranode_edges_cpu(cpu_pool, world_size, case):
    results = cpu_pool(world_size).run(checks.check_intranode, **case, matrix="quick", timeout=600)
    assert all(r["dispatches"] == 2 for r in results), results


@pytest.mark.gpu
def test_intranode_deepep_shape_gpu(gpu_pool):
    world_size = gpu_count()
    results = gpu_pool(world_size).run(
        checks.check_intranode,
        num_tokens=4096,
        hidden=7168,
        num_topk=8,
        num_experts=256,
        num_sms=24,
        chunk=6,
        recv_capacity=256,
        num_nvl_bytes=int(2e9),
        matrix="full",
        timeout=400,
    )
    assert all(r["num_recv"] > 0 for r in results), results


@pytest.mark.gpu
def test_intranode_small_chunks_gpu(gpu_pool):
    """Tiny queues force back-pressure (queue wrap-around) on the GPU, which the interpreter cannot
    show."""
    world_size = gpu_count()
    gpu_pool(world_size).run(
        checks.check_intranode,
        num_tokens=3000,
        hidden=2048,
        num_topk=8,
        num_experts=64 * world_size,
        num_sms=8,
        chunk=4,
        recv_capacity=8,
        num_nvl_bytes=int(2e9),
        matrix="quick",
        timeout=300,
    )
