"""The low-latency surface around the kernels (CPU backend): the RDMA memory view, topology
attributes, argument checks that name the argument and value, hook rules (stale and repeated hooks
raise), the clean barrier and the shrink-mode masks."""

from __future__ import annotations

import time

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
    # Signatures seen above (these shapes, dtypes and flags) skip the full checks; what they do
    # not cover is still checked on every call: layout and device.
    x_strided = torch.zeros((H, T), dtype=torch.bfloat16).t()
    y_strided = torch.zeros_like(y).transpose(1, 2).contiguous().transpose(1, 2)
    meta = torch.empty((T, K), dtype=torch.float32, device="meta")
    c = buffer.low_latency_combine
    for error, call, *needles in [
        (
            EPInvalidArgument,
            lambda: d(x_strided, idx, T, E, use_fp8=False, return_recv_hook=True),
            "x must be contiguous",
        ),  # fmt: skip
        (
            EPInvalidArgument,
            lambda: d(x.to("meta"), idx, T, E, use_fp8=False, return_recv_hook=True),
            "x must be on cpu",
        ),  # fmt: skip
        (EPInvalidArgument, lambda: c(y_strided, idx, weights, handle), "x must be contiguous"),
        (EPInvalidArgument, lambda: c(y, idx, meta, handle), "topk_weights must be on cpu"),
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


def wait_stats_task(ctx, stall_s: float) -> tuple:
    """Rank 1 starts its dispatch `stall_s` late, rank 0 its combine: the waiting rank's stats
    for the late source grow by about that much. The dispatch stats come in V1's `[R, R]` form
    (this rank's row is used, the others stay as they are), the combine stats as `[R]`."""
    buffer = ll_buffer(ctx, T, H, E)
    x = torch.ones((T, H), dtype=torch.bfloat16)
    idx = torch.tensor([[0, E - 1]] * T, dtype=tritonep.topk_idx_t)  # every token to both ranks
    weights = torch.ones((T, 2), dtype=torch.float32)
    dispatch_stats = torch.full((2, 2), -7, dtype=torch.int64)
    dispatch_stats[ctx.rank] = 0
    combine_stats = torch.zeros(2, dtype=torch.int64)
    for _ in range(2):  # the second time with the signatures of the first
        if ctx.rank == 1:
            time.sleep(stall_s)
        recv, _, handle, _, _ = buffer.low_latency_dispatch(
            x, idx, T, E, use_fp8=False, dispatch_wait_recv_cost_stats=dispatch_stats
        )
        if ctx.rank == 0:
            time.sleep(stall_s)
        buffer.low_latency_combine(
            recv, idx, weights, handle, combine_wait_recv_cost_stats=combine_stats
        )
    return dispatch_stats.tolist(), combine_stats.tolist()


def nodes_task(ctx) -> tuple:
    """Two nodes of one rank: the node arithmetic of the attributes and the layout."""
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20)
    idx = torch.tensor([[0, 3], [1, -1]], dtype=tritonep.topk_idx_t)
    _, per_node, _, _, _ = buffer.get_dispatch_layout(idx, 4)
    return (buffer.rdma_rank, buffer.nvl_rank, buffer.num_rdma_ranks, per_node.tolist())


def test_low_latency_api_cpu(cpu_pool):
    results = cpu_pool(2).run(api_task, timeout=300)
    assert results == [[], []], results


def test_wait_stats_count_the_time_a_late_peer_costs_cpu(cpu_pool):
    stall_s, unit_s = 0.3, 1e-9  # tritonep.WAIT_COST_UNIT: ns
    assert tritonep.WAIT_COST_UNIT == "ns"
    (dispatch_0, combine_0), (dispatch_1, combine_1) = cpu_pool(2).run(
        wait_stats_task, stall_s, timeout=300
    )
    assert dispatch_0[1] == [-7, -7] and dispatch_1[0] == [-7, -7], (dispatch_0, dispatch_1)
    # Two calls, each late by stall_s (plus the interpreted kernels of the peer).
    assert 1.5 * stall_s <= dispatch_0[0][1] * unit_s < 2 * stall_s + 10, dispatch_0
    assert 1.5 * stall_s <= combine_1[0] * unit_s < 2 * stall_s + 10, combine_1
    # The late rank found its peer's data there.
    assert dispatch_1[1][0] * unit_s < stall_s and combine_0[1] * unit_s < stall_s, (
        dispatch_1,
        combine_0,
    )


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
