"""The low-latency surface around the kernels (CPU backend): the RDMA memory view, topology
attributes, argument checks that name the argument and value, hook rules (stale and repeated hooks
raise), the clean barrier and the shrink-mode masks."""

from __future__ import annotations

import torch

import tritonep
from tritonep.errors import EPInvalidArgument, EPStateError
from tritonep.testing.low_latency import ll_buffer

T, H, K, E = 4, 128, 2, 4


def _expect(error, call, *needles) -> str | None:
    try:
        call()
    except error as e:
        missing = [n for n in needles if n not in str(e)]
        return f"{error.__name__} without {missing}: {e}" if missing else None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return f"wanted {error.__name__}, got {type(e).__name__}: {e}"
    return f"wanted {error.__name__}, nothing raised"


def api_task(ctx) -> list[str]:
    buffer = ll_buffer(ctx, T, H, E, shrink=True)
    problems = []
    # RDMA memory: a view of num_rdma_bytes, bytes offsets, writable.
    view = buffer.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True)
    if view.numel() != buffer.num_rdma_bytes // 4:
        problems.append(f"rdma view has {view.numel()} ints for {buffer.num_rdma_bytes} bytes")
    if (buffer.rdma_rank, buffer.nvl_rank, buffer.num_rdma_ranks) != (0, ctx.rank, 1):
        problems.append(f"topology {buffer.rdma_rank, buffer.nvl_rank, buffer.num_rdma_ranks}")
    if buffer.nvshmem_qp_depth != 1024:
        problems.append(f"nvshmem_qp_depth {buffer.nvshmem_qp_depth}")

    x = torch.zeros((T, H), dtype=torch.bfloat16)
    idx = torch.zeros((T, K), dtype=tritonep.topk_idx_t)
    d = buffer.low_latency_dispatch
    checks = [
        (EPInvalidArgument, lambda: d(x.half(), idx, T, E), "x", "bfloat16", "float16"),
        (
            EPInvalidArgument,
            lambda: d(torch.zeros((T + 1, H), dtype=torch.bfloat16), idx, T, E),
            "x",
            str(T),
        ),  # fmt: skip
        (EPInvalidArgument, lambda: d(x, idx[:, :1].expand(T, 40).contiguous(), T, E), "topk_idx"),
        (EPInvalidArgument, lambda: d(x, idx, T, E, use_ue8m0=True), "use_ue8m0", "round_scale"),
        (
            EPInvalidArgument,
            lambda: d(x, idx, T, E, async_finish=True, return_recv_hook=True),
            "async_finish",
            "return_recv_hook",
        ),  # fmt: skip
        (EPInvalidArgument, lambda: d(x, idx, T, 5), "num_experts", "5"),
        (
            EPInvalidArgument,
            lambda: d(torch.zeros((T, 64), dtype=torch.bfloat16), idx, T, E),
            "hidden",
            "64",
        ),  # fmt: skip
        (EPInvalidArgument, lambda: d(x, idx, 1 << 16, E), "num_rdma_bytes", "size_hint"),
        (
            EPInvalidArgument,
            lambda: d(
                x, idx, T, E, dispatch_wait_recv_cost_stats=torch.zeros(3, dtype=torch.int64)
            ),
            "dispatch_wait_recv_cost_stats",
        ),  # fmt: skip
    ]
    for error, call, *needles in checks:
        problem = _expect(error, call, *needles)
        if problem:
            problems.append(problem)

    # Hooks: a hook runs once; the hook of call k is stale once call k + 2 was issued.
    recv, _, handle, _, hook = d(x, idx, T, E, use_fp8=False, return_recv_hook=True)
    hook()
    problem = _expect(EPStateError, hook, "already ran")
    if problem:
        problems.append(problem)
    _, _, _, _, old_hook = d(x, idx, T, E, use_fp8=False, return_recv_hook=True)
    y = torch.zeros_like(recv)
    weights = torch.zeros((T, K), dtype=torch.float32)
    for _ in range(2):  # calls k + 1 and k + 2
        buffer.low_latency_combine(y, idx, weights, handle)
    problem = _expect(EPStateError, old_hook, "stale")
    if problem:
        problems.append(problem)
    c = buffer.low_latency_combine
    for error, call, *needles in [
        (
            EPInvalidArgument,
            lambda: c(y, idx, weights, handle, use_logfmt=True, zero_copy=True),
            "use_logfmt",
            "zero_copy",
        ),  # fmt: skip
        (EPInvalidArgument, lambda: c(y, idx, weights, handle, out=torch.zeros((T, 8))), "out"),
        (EPInvalidArgument, lambda: c(y, idx, weights, handle[:4]), "handle", "5-tuple"),
        (EPInvalidArgument, lambda: c(y[:, :1], idx, weights, handle), "x"),
        # After combines that took this handle (its checks are remembered): other ints, or other
        # tensors beside the same ints, are checked again.
        (
            EPInvalidArgument,
            lambda: c(y, idx, weights, (*handle[:2], T - 1, H, E)),
            "packed_recv_src_info",
            f"[{E // 2}, {2 * (T - 1)}]",
        ),  # fmt: skip
        (
            EPInvalidArgument,
            lambda: c(y, idx, weights, (handle[0][:, :1], *handle[1:])),
            "packed_recv_src_info",
        ),  # fmt: skip
    ]:
        problem = _expect(error, call, *needles)
        if problem:
            problems.append(problem)

    # The clean barrier and the masks (local, current stream).
    buffer.clean_low_latency_buffer(T, H, E)
    status = torch.ones(ctx.world_size, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    if status.tolist() != [0] * ctx.world_size:
        problems.append(f"fresh mask {status.tolist()}")
    buffer.low_latency_update_mask_buffer(1 - ctx.rank, True)
    buffer.low_latency_query_mask_buffer(status)
    if status.tolist()[1 - ctx.rank] != 1:
        problems.append(f"mask after update {status.tolist()}")
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    if status.tolist() != [0] * ctx.world_size:
        problems.append(f"mask after clean {status.tolist()}")
    problem = _expect(EPInvalidArgument, lambda: buffer.low_latency_update_mask_buffer(7), "7")
    if problem:
        problems.append(problem)
    buffer.clean_low_latency_buffer(T, H, E)
    return problems


def nodes_task(ctx) -> tuple:
    """Two nodes of one rank: the node arithmetic of the attributes and the layout."""
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20)
    idx = torch.tensor([[0, 3], [1, -1]], dtype=tritonep.topk_idx_t)
    _, per_node, _, _, _ = buffer.get_dispatch_layout(idx, 4)
    return (buffer.rdma_rank, buffer.nvl_rank, buffer.num_rdma_ranks, per_node.tolist())


def test_low_latency_api_cpu(cpu_pool):
    results = cpu_pool(2).run(api_task, timeout=300)
    assert results == [[], []], results


def test_two_nodes_of_one_rank_cpu(cpu_pool):
    results = cpu_pool(2, TRITONEP_NVL_DOMAIN_SIZE="1").run(nodes_task, timeout=300)
    assert results == [(0, 0, 2, [2, 1]), (1, 0, 2, [2, 1])], results


def test_rdma_view_requires_rdma_memory_cpu(cpu_pool):
    results = cpu_pool(2).run(no_rdma_task, timeout=120)
    assert results == ["ok", "ok"], results


def no_rdma_task(ctx) -> str:
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=1 << 20)
    problem = _expect(
        EPStateError,
        lambda: buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True),
        "num_rdma_bytes=0",
    )
    return problem or "ok"
