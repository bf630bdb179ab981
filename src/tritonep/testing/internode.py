"""Rank-side correctness checks of the internode high-throughput mode (CPU suite and GPU runs).

Like `checks.check_intranode`, each function runs on every rank of a process group, draws fresh
inputs, runs tritonep, gathers what every rank passed and compares this rank's results with
`tritonep.reference`: exact equality for everything copied (rows, scales, top-k, counts, handle
entries) and for combine (fp32 sums in tritonep's internode order, `reference.internode_combine`).
The Buffer's nodes come from `TRITONEP_NVL_DOMAIN_SIZE` (e.g. 2 nodes x 2 ranks on 4 processes).

Crossing check: right after a dispatch, the RDMA tail counters of this rank (one per channel and
column peer, `kernels/internode/regions.py`) say how many token slots each column peer wrote into
this rank's rings during that call. They must equal the number of that peer's tokens bound for
*any* rank of this node: a token bound for several ranks of a node crosses once.
"""

from __future__ import annotations

import torch

import tritonep
from tritonep import reference
from tritonep.testing.checks import (
    _assert_equal,
    check_worst_case,
    checked_layout,
    device_of,
    dispatch_variant,
    gather,
    make_routing,
    per_token_cast_to_fp8,
    poisoned_allocations,
)


def get_buffer(ctx, num_nvl_bytes: int, num_rdma_bytes: int) -> tritonep.Buffer:
    """One internode Buffer per (rank process, sizes), reused across tasks."""
    key = ("internode buffer", num_nvl_bytes, num_rdma_bytes)
    buffer = ctx.state.get(key)
    if buffer is None:
        buffer = tritonep.Buffer(
            ctx.group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes
        )
        ctx.state[key] = buffer
    return buffer


def make_limited_routing(
    num_tokens, num_experts, num_topk, num_nodes, num_limited_nodes, generator, device, drop=0.1
):
    """DeepSeek-V3-style group-limited routing: each token first picks `num_limited_nodes` nodes,
    then its top-k experts among those nodes' experts only (distinct experts, some slots -1)."""
    experts_per_node = num_experts // num_nodes
    node_scores = torch.rand((num_tokens, num_nodes), generator=generator, dtype=torch.float32)
    chosen = torch.topk(node_scores, num_limited_nodes, dim=-1).indices
    allowed = torch.zeros((num_tokens, num_nodes), dtype=torch.bool)
    allowed.scatter_(1, chosen, True)
    scores = torch.rand((num_tokens, num_experts), generator=generator, dtype=torch.float32) + 1.0
    scores = scores.masked_fill(~allowed.repeat_interleave(experts_per_node, dim=1), 0.0)
    topk_idx = torch.topk(scores, num_topk, dim=-1, sorted=False).indices
    if drop > 0 and num_tokens > 0:
        dropped = torch.rand((num_tokens, num_topk), generator=generator) < drop
        topk_idx = topk_idx.masked_fill(dropped, -1)
    topk_weights = torch.rand((num_tokens, num_topk), generator=generator, dtype=torch.float32)
    return topk_idx.to(tritonep.topk_idx_t).to(device), topk_weights.to(device)


def rows_crossed(buffer) -> list[int]:
    """Token slots each column peer (index = its node) wrote into this rank's RDMA rings during
    the latest call, read from the RDMA tail counters (all channels)."""
    from tritonep.kernels.internode.regions import MAX_CHANNELS

    num_nodes = buffer.num_rdma_ranks
    # The signal area lies above the user's bytes, outside `get_local_buffer_tensor`'s view.
    signals = buffer._throughput_mode.signals
    words = buffer._memory._rdma_view.view(torch.int64).cpu()
    epoch = int(words[signals.rdma_started // 8 + buffer.rdma_rank]) >> 32  # this rank's own
    first = signals.rdma_tails // 8
    tails = words[first : first + MAX_CHANNELS * num_nodes].view(MAX_CHANNELS, num_nodes)
    current = (tails >> 32) == epoch
    return torch.where(current, tails & 0xFFFFFFFF, 0).sum(0).tolist()


def combine_blocks(group, rank, handle):
    """For the reference combines: rows of every rank j that came from `rank`, and their tokens."""
    prefix = gather(group, handle[6])
    itrs = gather(group, handle[0])
    blocks = []
    for j, p in enumerate(prefix):
        first = int(p[rank - 1]) if rank > 0 else 0
        blocks.append((first, torch.nonzero(itrs[rank][:, j].cpu()).flatten()))
    return blocks


def _check_handle(tag, handle, itr, want, num_nodes, ranks_per_node):
    assert len(handle) == 10, f"{tag}: the internode handle has 10 entries, got {len(handle)}"
    assert handle[0] is itr, f"{tag}: handle[0] must be the caller's is_token_in_rank"
    for index, name in enumerate(
        (
            "rdma_channel_prefix_matrix",
            "gbl_channel_prefix_matrix",
            "recv_rdma_channel_prefix_matrix",
            "recv_rdma_rank_prefix_sum",
            "recv_gbl_channel_prefix_matrix",
            "recv_gbl_rank_prefix_sum",
            "recv_src_meta",
        ),
        start=1,
    ):
        _assert_equal(f"{tag} handle[{index}] ({name})", handle[index], want[name])
    _assert_equal(f"{tag} handle[-4]", handle[-4], want["recv_gbl_rank_prefix_sum"])
    to_node = reference.node_mask(itr.cpu(), ranks_per_node)
    assert tuple(handle[8].shape) == (itr.size(0), num_nodes), f"{tag}: send_rdma_head shape"
    assert torch.equal(handle[8].cpu() >= 0, to_node), (
        f"{tag}: send_rdma_head must be negative exactly where a token goes to no rank of a node"
    )
    num_rdma = int(want["recv_rdma_rank_prefix_sum"][-1]) if num_nodes else 0
    assert tuple(handle[9].shape) == (num_rdma, ranks_per_node), (
        f"{tag}: send_nvl_head shape {tuple(handle[9].shape)} != {(num_rdma, ranks_per_node)}"
    )


def check_internode(
    ctx,
    *,
    num_tokens,
    hidden: int,
    num_topk: int,
    num_experts: int,
    num_sms: int = 2,
    nvl_chunk: int = 2,
    nvl_capacity: int = 4,
    rdma_chunk: int = 2,
    rdma_capacity: int = 4,
    num_nvl_bytes: int = 4 << 20,
    num_rdma_bytes: int = 4 << 20,
    seed: int = 0,
    matrix: str = "standard",
    drop: float = 0.1,
    skew: float = 0.0,
    expert_alignment: int = 1,
    limited_nodes: int = 0,
    dtypes: tuple = (torch.bfloat16,),
) -> dict:
    """DeepEP V1's internode test matrix against the reference; returns counts for the caller.

    num_tokens: an int, or one int per rank. matrix: "full" = {BF16 random, BF16 constant per rank,
    FP8 with float scales} x {top-k or not} x {sync, async} x {previous event or not};
    "standard" = four of those dispatches, each switch on and off at least once; "quick" = BF16
    random with top-k, sync; "minimal" = quick without the worst case and with one combine.
    Always: layout, handle entries, cached dispatch, the crossing count, combine (without weights
    and bias, with weights and one bias, with weights and two biases; in the other `dtypes` the
    last), worst case (unless minimal), FP8 with packed UE8M0 scales (full and standard).
    `limited_nodes` > 0: group-limited routing to that many nodes per token.
    """
    group, rank = ctx.group, ctx.rank
    if isinstance(num_tokens, (list, tuple)):
        num_tokens = num_tokens[rank]
    buffer = get_buffer(ctx, num_nvl_bytes, num_rdma_bytes)
    d, num_nodes = buffer.num_nvl_ranks, buffer.num_rdma_ranks
    assert num_nodes > 1, f"check_internode needs more than one node, got {num_nodes} of {d}"
    device = device_of(buffer)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    config = tritonep.Config(num_sms, nvl_chunk, nvl_capacity, rdma_chunk, rdma_capacity)
    x_rand = (
        torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32, device="cpu")
        .to(torch.bfloat16)
        .to(device)
    )
    x_const = torch.full((num_tokens, hidden), float(rank), dtype=torch.bfloat16, device=device)
    if limited_nodes:
        topk_idx, topk_weights = make_limited_routing(
            num_tokens, num_experts, num_topk, num_nodes, limited_nodes, gen, device, drop=drop
        )
    else:
        topk_idx, topk_weights = make_routing(
            num_tokens, num_experts, num_topk, gen, device, drop=drop, skew=skew
        )
    stats = {"dispatches": 0, "combines": 0}

    ntr, ntn, nte, itr = checked_layout(buffer, topk_idx, num_experts)
    layout = dict(
        num_tokens_per_rank=ntr,
        num_tokens_per_rdma_rank=ntn,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
    )

    all_itr = gather(group, itr)
    all_idx = gather(group, topk_idx)
    all_w = gather(group, topk_weights)
    want_handle = reference.internode_handle(rank, d, config.num_channels, all_itr)

    fp8 = per_token_cast_to_fp8(x_rand) if matrix in ("full", "standard") else None
    if matrix in ("quick", "minimal"):
        plan = [("bf16_rand", x_rand, [(True, False, False)])]
    elif matrix == "standard":
        # Every switch on and off at least once; the last bf16_rand variant (top-k) feeds combine.
        plan = [
            ("bf16_const", x_const, [(True, True, False)]),
            ("fp8", fp8, [(False, False, True)]),
            ("bf16_rand", x_rand, [(False, True, True), (True, False, False)]),
        ]
    else:
        variants = [(t, a, p) for t in (False, True) for a in (False, True) for p in (False, True)]
        plan = [(kind, x, variants) for kind, x in (("bf16_rand", x_rand), ("bf16_const", x_const))]
        plan.append(("fp8", fp8, variants))
    handle = recv_w = None
    for kind, x, variants in plan:
        data = x[0] if isinstance(x, tuple) else x
        all_x = gather(group, data)
        all_scales = gather(group, x[1]) if isinstance(x, tuple) else None
        for with_topk, async_finish, with_prev in variants:
            recv_x, recv_idx, recv_w, counts, handle = dispatch_variant(
                buffer,
                x,
                layout,
                topk_idx if with_topk else None,
                topk_weights if with_topk else None,
                expert_alignment,
                config,
                with_prev,
                async_finish,
            )
            tag = f"dispatch[{kind}, topk={with_topk}, async={async_finish}, prev={with_prev}]"
            if stats["dispatches"] == 0:
                # Token slots written into this rank's rings, per column peer, by this dispatch.
                crossed = rows_crossed(buffer)
                to_node = [reference.node_mask(m.cpu(), d) for m in all_itr]
                column = [n * d + buffer.nvl_rank for n in range(num_nodes)]
                want_crossed = [int(to_node[s][:, buffer.rdma_rank].sum()) for s in column]
                assert crossed == want_crossed, (
                    f"{tag}: token slots per column peer {crossed} != tokens bound for this node "
                    f"{want_crossed} (a token must cross once per node)"
                )
                stats["crossed"] = sum(crossed)
                stats["delivered"] = sum(
                    int(all_itr[s][:, buffer.rdma_rank * d : buffer.rdma_rank * d + d].sum())
                    for s in column
                )
            stats["dispatches"] += 1
            ref = reference.dispatch(
                rank,
                num_experts,
                all_x,
                all_itr,
                all_idx if with_topk else None,
                all_w if with_topk else None,
                all_scales,
            )
            got_x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
            _assert_equal(f"{tag} recv_x", got_x, ref["recv_x"])
            if isinstance(x, tuple):
                _assert_equal(f"{tag} recv_x_scales", recv_x[1], ref["recv_scales"])
            _check_handle(tag, handle, itr, want_handle, num_nodes, d)
            if with_topk:
                _assert_equal(f"{tag} recv_topk_idx", recv_idx, ref["recv_topk_idx"])
                _assert_equal(f"{tag} recv_topk_weights", recv_w, ref["recv_topk_weights"])
                aligned = [
                    -(-c // expert_alignment) * expert_alignment
                    for c in ref["num_recv_tokens_per_expert"]
                ]
                assert counts == aligned, f"{tag}: per-expert list {counts} != {aligned}"
            else:
                assert recv_idx is None and recv_w is None
            with poisoned_allocations(device):
                cached = buffer.dispatch(x, handle=handle, config=config, async_finish=async_finish)
            if async_finish:
                cached[-1].current_stream_wait()
            assert cached[1:5] == (None, None, None, None), f"{tag}: cached returns Nones"
            cached_x = cached[0][0] if isinstance(cached[0], tuple) else cached[0]
            _assert_equal(f"{tag} cached recv_x", cached_x, ref["recv_x"])
            if isinstance(x, tuple):
                _assert_equal(f"{tag} cached scales", cached[0][1], ref["recv_scales"])
            stats["dispatches"] += 1
        if kind != "bf16_rand":
            continue
        stats["combines"] += _check_combines(
            ctx,
            buffer,
            config,
            handle,
            recv_x,
            recv_w,
            topk_idx,
            topk_weights,
            dtypes,
            gen,
            all_variants=matrix != "minimal",
        )

    if matrix in ("full", "standard"):
        _check_ue8m0(ctx, buffer, config, x_rand, handle, all_itr)
        stats["dispatches"] += 1
    if matrix != "minimal":
        stats.update(
            _check_worst_case(
                ctx, buffer, config, x_rand, topk_idx, topk_weights, layout, num_experts
            )
        )
    stats["num_recv"] = int(handle[6][-1])
    return stats


def _check_combines(
    ctx, buffer, config, handle, recv_x, recv_w, topk_idx, topk_weights, dtypes, gen, all_variants
):
    """Combine the rows back: in the first dtype without weights and bias, with weights and one
    bias, with weights and two biases; in the other dtypes (and when not `all_variants`) only the
    last."""
    group, rank = ctx.group, ctx.rank
    device = recv_x.device
    num_tokens, hidden = handle[0].size(0), recv_x.size(1)
    d = buffer.num_nvl_ranks
    blocks = combine_blocks(group, rank, handle)
    all_recv_w = gather(group, recv_w) if recv_w is not None else None
    done = 0
    for index, dtype in enumerate(dtypes):
        y = recv_x.to(dtype)
        all_y = gather(group, y)
        variants = (
            ((False, 0), (True, 1), (True, 2)) if index == 0 and all_variants else ((True, 2),)
        )
        for with_weights, num_bias in variants:
            if with_weights and recv_w is None:
                continue
            biases = tuple(
                torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32)
                .to(dtype)
                .to(device)
                for _ in range(num_bias)
            )
            bias = None if num_bias == 0 else (biases[0] if num_bias == 1 else biases)
            with poisoned_allocations(device):
                combined, combined_w, event = buffer.combine(
                    y,
                    handle,
                    topk_weights=recv_w if with_weights else None,
                    bias=bias,
                    config=config,
                )
            want_x, want_w = reference.internode_combine(
                rank,
                d,
                all_y,
                blocks,
                num_tokens,
                biases=[b.cpu() for b in biases],
                weights=all_recv_w if with_weights else None,
            )
            tag = f"combine[{dtype}, weights={with_weights}, bias={num_bias}]"
            _assert_equal(f"{tag} combined_x", combined, want_x)
            _assert_equal(f"{tag} combined_topk_weights", combined_w, want_w)
            if with_weights:
                # Dispatch zeroes weights on non-owning ranks, so the sum restores the originals.
                restored = torch.where(
                    topk_idx.cpu() >= 0, topk_weights.cpu(), torch.zeros_like(topk_weights.cpu())
                )
                _assert_equal(f"{tag} restores topk_weights", combined_w.cpu(), restored)
            done += 1
    return done


def _check_ue8m0(ctx, buffer, config, x, handle, all_itr):
    """Cached FP8 dispatch with packed UE8M0 scales (int32, ceil(H / 512) columns), column-major
    as DeepEP passes them (`s.T.contiguous().T`: arbitrary strides are honoured)."""
    group, rank = ctx.group, ctx.rank
    data, _ = per_token_cast_to_fp8(x)
    words = -(-x.size(1) // 512)
    scales = torch.arange(x.size(0) * words, dtype=torch.int32).view(words, x.size(0)) + rank
    scales = scales.to(x.device).T  # [N, words], strides (1, N)
    recv = buffer.dispatch((data, scales), handle=handle, config=config)[0]
    all_data, all_scales = gather(group, data), gather(group, scales)
    ref = reference.dispatch(rank, 2 * ctx.world_size, all_data, all_itr, scales=all_scales)
    _assert_equal("ue8m0 cached recv_x", recv[0], ref["recv_x"])
    _assert_equal("ue8m0 cached scales", recv[1], ref["recv_scales"])


def _check_worst_case(ctx, buffer, config, x, topk_idx, topk_weights, layout, E):
    """`checks.check_worst_case` with the internode handle: `send_nvl_head` also gets the fixed
    row count, its rows past the forwarded tokens are -1, and combine follows the node order."""
    group, rank = ctx.group, ctx.rank
    d = buffer.num_nvl_ranks

    def check_handle(handle, num_worst):
        assert handle[7].size(0) == num_worst, (handle[7].size(0), num_worst)
        assert tuple(handle[9].shape) == (num_worst, d), tuple(handle[9].shape)
        num_rdma = int(handle[4][-1])
        assert bool((handle[9][num_rdma:] == -1).all()), "worst-case send_nvl_head padding is -1"

    def expected_combine(y, handle):
        blocks = combine_blocks(group, rank, handle)
        return reference.internode_combine(rank, d, gather(group, y), blocks, x.size(0))[0]

    return check_worst_case(
        ctx, buffer, config, x, topk_idx, topk_weights, layout, E, expected_combine, check_handle
    )
