"""Internode high-throughput mode against the plain-torch reference (`tritonep.testing.internode`).

CPU: rank processes in the Triton interpreter, nodes from `TRITONEP_NVL_DOMAIN_SIZE`: 2 nodes x 2
ranks (DeepEP's variant matrix), 3 x 1, 2 x 3 with group-limited routing (a token bound for several
ranks of a node crosses once, counted from the RDMA tail counters), rings of two slots on the
emulated put path (every peer, this rank included, through the put path), buffers far smaller than
one dispatch, rank masking, a stalled rank (timeout naming rank, nodes and phase), a geometry
mismatch, argument checks.
GPU: `test_internode_gpu.py`; `benchmarks/internode.py` checks DeepEP's shape and times it.
"""

from __future__ import annotations

import time

import pytest
import torch

import tritonep
from tritonep import reference
from tritonep.testing import checks
from tritonep.testing import internode as inter

SHAPE = dict(hidden=64, num_topk=3)


def _nodes(size: int) -> dict:
    return {"TRITONEP_NVL_DOMAIN_SIZE": str(size)}


def test_internode_matrix_2x2_cpu(cpu_pool):
    results = cpu_pool(4, **_nodes(2)).run(
        inter.check_internode,
        num_tokens=[8, 5, 0, 9],
        num_experts=8,
        nvl_chunk=4,
        nvl_capacity=8,
        rdma_chunk=4,
        rdma_capacity=8,
        expert_alignment=2,
        dtypes=(torch.bfloat16, torch.float32),
        **SHAPE,
        timeout=600,
    )
    assert all(r["dispatches"] == 9 and r["combines"] == 4 for r in results), results


@pytest.mark.slow
def test_internode_full_matrix_2x2_cpu(cpu_pool):
    results = cpu_pool(4, **_nodes(2)).run(
        inter.check_internode,
        num_tokens=12,
        num_experts=16,
        num_sms=4,
        matrix="full",
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        **SHAPE,
        timeout=1800,
    )
    assert all(r["dispatches"] >= 49 for r in results), results


@pytest.mark.slow
def test_internode_3x1_cpu(cpu_pool):
    results = cpu_pool(3, **_nodes(1)).run(
        inter.check_internode,
        num_tokens=[7, 0, 10],
        num_experts=6,
        matrix="quick",
        limited_nodes=2,
        nvl_chunk=4,
        nvl_capacity=8,
        rdma_chunk=4,
        rdma_capacity=8,
        hidden=32,
        num_topk=2,
        timeout=600,
    )
    assert all(r["dispatches"] == 2 for r in results), results


def test_internode_group_limited_2x3_crosses_once_cpu(cpu_pool):
    """DeepSeek-V3-style routing (each token to one node): a token for several ranks of a node
    crosses once; `check_internode` asserts the tail counts, here they must be fewer than the
    rows delivered."""
    results = cpu_pool(6, **_nodes(3)).run(
        inter.check_internode,
        num_tokens=6,
        num_experts=12,
        num_topk=4,
        hidden=32,
        limited_nodes=1,
        drop=0.0,
        matrix="minimal",
        nvl_chunk=4,
        nvl_capacity=8,
        rdma_chunk=4,
        rdma_capacity=8,
        timeout=900,
    )
    assert sum(r["crossed"] for r in results) < sum(r["delivered"] for r in results), results


def test_internode_tiny_rings_put_path_cpu(cpu_pool):
    """Rings of two slots (the capacity cut by the byte budgets, not by the config) and one-token
    chunks: every ring wraps many times; every peer goes through the emulated put path."""
    results = cpu_pool(2, TRITONEP_FORCE_PUT="1", **_nodes(1)).run(
        inter.check_internode,
        num_tokens=[8, 5],
        num_experts=4,
        matrix="quick",
        nvl_chunk=1,
        nvl_capacity=256,
        rdma_chunk=1,
        rdma_capacity=256,
        num_nvl_bytes=2944,  # rings of 2 slots (kernels/internode/regions.py)
        num_rdma_bytes=6400,
        dtypes=(torch.bfloat16,),
        **SHAPE,
        timeout=600,
    )
    assert all(r["dispatches"] == 2 and r["combines"] == 3 for r in results), results


# ----------------------------------------------------------------- low-latency compatibility
def compatibility_task(ctx, low_latency_first: bool) -> int:
    """V1's compatibility flow on one Buffer: internode calls, `clean_low_latency_buffer`, then
    low-latency calls (which share the RDMA memory), all checked against the references. With
    `low_latency_first`, low-latency calls come first too, on an RDMA memory of exactly V1's
    low-latency hint: their layout then reaches the top of the user's bytes, right below the
    internode signal words, which must survive it."""
    from tritonep.testing import low_latency as ll

    T, H, E = (32 if low_latency_first else 8), 128, 8
    hint = tritonep.Buffer.get_low_latency_rdma_size_hint(T, H, ctx.world_size, E)
    size = hint if low_latency_first else max(hint, 1 << 20)
    buffer = tritonep.Buffer(
        ctx.group, num_nvl_bytes=1 << 20, num_rdma_bytes=size, low_latency_mode=True
    )
    ctx.state[("internode buffer", 1 << 20, size)] = buffer  # what both checks will use
    ctx.state[("ll-buffer", T, H, E, False)] = buffer
    low_latency = dict(num_topk=3, num_experts=E, max_tokens=T, use_fp8=True)
    if low_latency_first:
        ll.check_low_latency(ctx, num_tokens=T, hidden=H, **low_latency)
    stats = inter.check_internode(
        ctx,
        num_tokens=6,
        hidden=H,
        num_topk=3,
        num_experts=E,
        matrix="minimal",
        num_nvl_bytes=1 << 20,
        num_rdma_bytes=size,
    )
    buffer.clean_low_latency_buffer(T, H, E)
    ll.check_low_latency(ctx, num_tokens=5, hidden=H, **low_latency)
    del ctx.state[("internode buffer", 1 << 20, size)], ctx.state[("ll-buffer", T, H, E, False)]
    return stats["combines"]


@pytest.mark.parametrize(
    "low_latency_first",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["v1-order", "ll-first"],
)
def test_internode_and_low_latency_on_one_buffer_cpu(cpu_pool, low_latency_first):
    results = cpu_pool(4, **_nodes(2)).run(compatibility_task, low_latency_first, timeout=600)
    assert results == [1] * 4, results


# ------------------------------------------------------------------------------- masking
def masked_round_task(ctx, seed=3, num_tokens=10, hidden=64, num_topk=3, num_experts=8):
    """Rank 3 masked by everyone and masking everyone: survivors exchange everything that needs
    neither rank 3 nor, across nodes, rank 3 as forwarder (its column peers' tokens to its node)."""
    group, rank, world = ctx.group, ctx.rank, ctx.world_size
    buffer = inter.get_buffer(ctx, (4 << 20) + 128, 4 << 20)  # its own buffer: masks are per Buffer
    d = buffer.num_nvl_ranks
    dead = world - 1
    masked = {dead} if rank != dead else set(range(world)) - {dead}
    for r in masked:
        buffer.update_mask_buffer(r, True)
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16)
    topk_idx, topk_weights = checks.make_routing(
        num_tokens, num_experts, num_topk, gen, "cpu", drop=0.0
    )
    config = tritonep.Config(2, 4, 8, 4, 8)
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, _, _, counts, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        num_tokens_per_rdma_rank=ntn,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        config=config,
    )
    # What each source really sends: not to masked ranks, nor through a masked forwarder.
    all_itr = checks.gather(group, itr)
    masks = checks.gather(group, sorted(masked))
    effective = []
    for s, m in enumerate(all_itr):
        m = m.clone()
        for j in range(world):
            forwarder = (j // d) * d + s % d
            if j in masks[s] or forwarder in masks[s]:
                m[:, j] = False
        effective.append(m)
    all_x = checks.gather(group, x)
    want = reference.dispatch(rank, num_experts, all_x, effective)
    assert torch.equal(recv_x, want["recv_x"]), (rank, recv_x.shape, want["recv_x"].shape)
    handle_want = reference.internode_handle(rank, d, config.num_channels, effective)
    for index, name in ((6, "recv_gbl_rank_prefix_sum"), (4, "recv_rdma_rank_prefix_sum")):
        assert torch.equal(handle[index], handle_want[name]), (rank, name, handle[index])
    combined, _, _ = buffer.combine(recv_x, handle, config=config)
    blocks = []
    prefixes = checks.gather(group, handle[6])
    for j in range(world):
        first = int(prefixes[j][rank - 1]) if rank > 0 else 0
        blocks.append((first, torch.nonzero(effective[rank][:, j]).flatten()))
    want_x, _ = reference.internode_combine(
        rank, d, checks.gather(group, recv_x), blocks, num_tokens
    )
    assert torch.equal(combined, want_x), rank
    buffer.clean_mask_buffer()
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        num_tokens_per_rdma_rank=ntn,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        config=config,
    )[0]
    full = reference.dispatch(rank, num_experts, all_x, checks.gather(group, itr))
    assert torch.equal(recv_x, full["recv_x"]), rank
    own = int(handle[6][rank]) - (int(handle[6][rank - 1]) if rank > 0 else 0)
    return int(handle[6][-1]) - own  # rows the masked call brought from other ranks


def test_internode_rank_masking_2x2_cpu(cpu_pool):
    from_others = cpu_pool(4, **_nodes(2)).run(masked_round_task, timeout=600)
    assert from_others[3] == 0 and all(n > 0 for n in from_others[:3]), from_others


# ------------------------------------------------------------------------- failures
def _small_args(buffer, rank, hidden=32, num_tokens=6, num_experts=4):
    gen = torch.Generator().manual_seed(rank)
    idx, weights = checks.make_routing(num_tokens, num_experts, 2, gen, "cpu", drop=0.0)
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(idx, num_experts)
    return dict(
        x=torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16),
        num_tokens_per_rank=ntr,
        num_tokens_per_rdma_rank=ntn,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=idx,
        topk_weights=weights,
        config=tritonep.Config(2, 2, 4, 2, 4),
    )


def _describe(call) -> dict:
    t0 = time.monotonic()
    try:
        call()
        return dict(type=None, seconds=time.monotonic() - t0)
    except tritonep.EPError as e:
        return dict(type=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)


def stall_task(ctx, stall_s: float) -> dict:
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20)
    args = _small_args(buffer, ctx.rank)
    buffer.dispatch(**args)  # a healthy call first
    if ctx.rank == 1:
        time.sleep(stall_s)  # alive, but never makes the next call
        return {}
    first = _describe(lambda: buffer.dispatch(**args))
    later = _describe(lambda: buffer.dispatch(**args))
    return {"first": first, "later": later}


def test_internode_stalled_rank_times_out_naming_rank_node_phase_cpu(cpu_pool):
    pool = cpu_pool(2, TRITONEP_TIMEOUT_S="3", **_nodes(1))
    first, later = (lambda r: (r["first"], r["later"]))(pool.run(stall_task, 5.0, timeout=120)[0])
    assert first["type"] == "EPTimeoutError", first
    message = first["message"]
    for part in ("rank 0", "notify phase", "rank 1", "node 1", "node 0"):
        assert part in message, message
    assert first["seconds"] < 10, first
    assert later["type"] == "EPStateError" and "unusable" in later["message"], later


def mismatch_task(ctx) -> dict:
    buffer = inter.get_buffer(ctx, 1 << 20, 1 << 20)
    args = _small_args(buffer, ctx.rank, hidden=32 if ctx.rank == 0 else 64)
    return _describe(lambda: buffer.dispatch(**args))


def test_internode_geometry_mismatch_is_reported_cpu(cpu_pool):
    results = cpu_pool(2, TRITONEP_TIMEOUT_S="3", **_nodes(1)).run(mismatch_task, timeout=120)
    for result in results:
        assert result["type"] == "EPInvalidArgument", result
        assert "different geometry" in result["message"], result


def validation_task(ctx) -> list:
    """Argument checks of the internode entry points (no kernel runs)."""
    buffer = inter.get_buffer(ctx, 4 << 20, 4 << 20)
    args = _small_args(buffer, ctx.rank)
    seen = []

    def expect(error, needle, call):
        try:
            call()
        except error as e:
            assert needle in str(e), (needle, str(e))
            seen.append(needle)
            return
        raise AssertionError(f"expected {error.__name__} containing {needle!r}")

    no_config = {k: v for k, v in args.items() if k != "config"}
    expect(
        tritonep.EPInvalidArgument,
        "config must be given",
        lambda: buffer.internode_dispatch(**no_config),
    )
    no_rdma = {**args, "num_tokens_per_rdma_rank": None}
    expect(
        tritonep.EPInvalidArgument,
        "num_tokens_per_rdma_rank is required",
        lambda: buffer.dispatch(**no_rdma),
    )
    handle = buffer.dispatch(**args)[4]
    assert isinstance(handle, tuple) and len(handle) == 10
    expect(
        tritonep.EPInvalidArgument,
        "10-tuple",
        lambda: buffer.dispatch(args["x"], handle=handle[:6], config=args["config"]),
    )
    expect(
        tritonep.EPInvalidArgument,
        "channels",
        lambda: buffer.combine(args["x"][:0], handle, config=tritonep.Config(4, 2, 4, 2, 4)),
    )
    expect(
        tritonep.EPInvalidArgument,
        "x must have shape",
        lambda: buffer.combine(args["x"][:1], handle, config=args["config"]),
    )
    # A worst-case dispatch receiving more than num_worst_tokens rows reports it (no hang, no
    # write past the outputs) and leaves the buffer usable.
    received = int(handle[6][-1])
    if max(received, int(handle[4][-1])) > 1:  # rows, or tokens forwarded (both are bounded)
        expect(
            tritonep.EPInvalidArgument,
            "num_worst_tokens",
            lambda: buffer.dispatch(**args, num_worst_tokens=1),
        )
    else:
        buffer.dispatch(**args, num_worst_tokens=1)
        seen.append("num_worst_tokens")
    assert buffer.dispatch(**args)[4][6][-1] == received
    return seen


def test_internode_argument_checks_cpu(cpu_pool):
    results = cpu_pool(4, **_nodes(2)).run(validation_task, timeout=300)
    assert all(len(r) == 6 for r in results), results
