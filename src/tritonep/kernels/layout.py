"""`get_dispatch_layout`: per-rank, per-node and per-expert token counts plus `is_token_in_rank`.

Problem: from `topk_idx [N, K]` (negative = no expert) compute
  num_tokens_per_rank[j]    tokens with >= 1 expert on rank j,
  num_tokens_per_node[n]    tokens with >= 1 expert on a rank of node n,
  num_tokens_per_expert[e]  (t, k) pairs with topk_idx[t, k] == e,
  is_token_in_rank[t, j].

Algorithm: one launch, one program per block of tokens. Each program writes its rows of
`is_token_in_rank` and adds its partial counts into a persistent int32 accumulator (kept zero
between calls), then takes a ticket; the program that draws the last ticket copies the sums into
the fresh outputs, zeroes the accumulator and re-arms the ticket. One round of atomics per program
and one load for the last one: no zero-fill kernel, no serial reduction, graph-replay safe. The
sums are of integers, so the result does not depend on the order of the atomics.

Example:
    R=2, E=4 (L=2), topk_idx=[[0, 3], [1, -1], [-1, -1]]
    -> is_token_in_rank=[[1, 1], [1, 0], [0, 0]], num_tokens_per_rank=[2, 1],
       num_tokens_per_expert=[1, 1, 0, 1]

Constraints: ids >= E are treated as -1 (reference §0) and the first one is recorded in the host
block (`protocol.HOST_BAD_EXPERT`); the Buffer raises about it on its next call. Any R, any E
divisible by R.
"""

import triton.language as tl

from .. import protocol
from .common.launch import KernelLaunch, pow2
from .common.naming import named_kernel


@named_kernel("layout", "route_stats", do_not_specialize=["num_tokens"])
def _route_stats_kernel(
    topk_idx_ptr,
    num_tokens,
    scratch_ptr,
    rank_mask_ptr,
    num_tokens_per_rank_ptr,
    num_tokens_per_node_ptr,
    num_tokens_per_expert_ptr,
    is_token_in_rank_ptr,
    host_addr,
    NUM_TOPK: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    HAS_NODES: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    NUM_BINS: tl.constexpr,
    HOST_BAD_EXPERT: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    experts_per_rank: tl.constexpr = NUM_EXPERTS // NUM_RANKS
    num_nodes: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    # scratch: [ticket | experts | ranks | nodes]
    expert_acc = scratch_ptr + 1
    rank_acc = expert_acc + NUM_EXPERTS
    node_acc = rank_acc + NUM_RANKS

    tokens = pid.to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_ok = tokens < num_tokens
    ks = tl.arange(0, BLOCK_TOPK)
    ranks = tl.arange(0, BLOCK_RANKS)
    # Experts of masked ranks count as not selected (rank masking, see Buffer.update_mask_buffer).
    # The whole mask loads beside the ids, not gathered per id after them: one load latency less.
    rank_live = tl.load(rank_mask_ptr + ranks, mask=ranks < NUM_RANKS, other=1) == 0
    raw = tl.load(
        topk_idx_ptr + tokens[:, None] * NUM_TOPK + ks[None, :],
        mask=token_ok[:, None] & (ks[None, :] < NUM_TOPK),
        other=-1,
    )
    # An id >= E is a caller error: count it as -1 (reference §0) and record the first one met, for
    # the host to report at its next look at the host block (no host synchronisation here).
    too_big = raw >= NUM_EXPERTS
    if tl.sum(too_big.to(tl.int32), axis=None) > 0:
        flat = tokens[:, None] * NUM_TOPK + ks[None, :]
        first = tl.min(tl.where(too_big, flat, num_tokens * NUM_TOPK), axis=None)
        bad_value = tl.sum(tl.where(flat == first, raw, 0), axis=None)
        record = host_addr.to(tl.pointer_type(tl.int64)) + HOST_BAD_EXPERT
        zero = tl.full([], 0, tl.int64)
        if (
            tl.atomic_cas(record, zero, zero + first // NUM_TOPK + 1, sem="acq_rel", scope="sys")
            == 0
        ):
            tl.store(record + 1, first % NUM_TOPK)
            tl.store(record + 2, bad_value.to(tl.int64))
            tl.store(record + 3, NUM_EXPERTS)
    idx = tl.where((raw >= 0) & ~too_big, raw, -1).to(tl.int32)
    owner = tl.where(idx >= 0, idx // experts_per_rank, -1)  # [T, K]
    live_hit = ((owner[:, :, None] == ranks[None, None, :]) & rank_live[None, None, :]).to(tl.int32)
    selected = tl.max(live_hit, axis=2) > 0  # [T, K]: an expert of a live rank
    idx = tl.where(selected, idx, -1)
    owner = tl.where(selected, owner, -1)
    in_rank = tl.max(live_hit, axis=1)  # [T, R]
    tl.store(
        is_token_in_rank_ptr + tokens[:, None] * NUM_RANKS + ranks[None, :],
        in_rank != 0,
        mask=token_ok[:, None] & (ranks[None, :] < NUM_RANKS),
    )

    # Bin 0 of the histogram collects the -1 entries and is dropped.
    bins = tl.histogram(tl.reshape(idx + 1, (BLOCK_TOKENS * BLOCK_TOPK,)), NUM_BINS)
    bin_ids = tl.arange(0, NUM_BINS)
    tl.atomic_add(
        expert_acc + bin_ids - 1,
        bins,
        mask=(bin_ids >= 1) & (bin_ids <= NUM_EXPERTS) & (bins > 0),
        sem="relaxed",
        scope="gpu",
    )
    tl.atomic_add(
        rank_acc + ranks,
        tl.sum(in_rank, axis=0),
        mask=ranks < NUM_RANKS,
        sem="relaxed",
        scope="gpu",
    )
    if HAS_NODES:
        nodes = tl.arange(0, BLOCK_NODES)
        owner_node = tl.where(owner >= 0, owner // RANKS_PER_NODE, -1)
        in_node = tl.max((owner_node[:, :, None] == nodes[None, None, :]).to(tl.int32), axis=1)
        tl.atomic_add(
            node_acc + nodes,
            tl.sum(in_node, axis=0),
            mask=nodes < num_nodes,
            sem="relaxed",
            scope="gpu",
        )

    # Publish this program's additions, then take a ticket; the last one copies out and re-zeroes.
    tl.debug_barrier()
    ticket = tl.atomic_add(scratch_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == num_programs - 1:
        cols = tl.arange(0, NUM_BINS)
        expert_sum = tl.load(expert_acc + cols, mask=cols < NUM_EXPERTS, cache_modifier=".cg")
        tl.store(num_tokens_per_expert_ptr + cols, expert_sum, mask=cols < NUM_EXPERTS)
        tl.store(expert_acc + cols, 0, mask=cols < NUM_EXPERTS)
        rank_sum = tl.load(rank_acc + ranks, mask=ranks < NUM_RANKS, cache_modifier=".cg")
        tl.store(num_tokens_per_rank_ptr + ranks, rank_sum, mask=ranks < NUM_RANKS)
        tl.store(rank_acc + ranks, 0, mask=ranks < NUM_RANKS)
        if HAS_NODES:
            nodes = tl.arange(0, BLOCK_NODES)
            node_sum = tl.load(node_acc + nodes, mask=nodes < num_nodes, cache_modifier=".cg")
            tl.store(num_tokens_per_node_ptr + nodes, node_sum, mask=nodes < num_nodes)
            tl.store(node_acc + nodes, 0, mask=nodes < num_nodes)
        tl.store(scratch_ptr, 0)


def scratch_slots(num_experts: int, num_ranks: int, num_nodes: int) -> int:
    """int32 slots of the persistent accumulator `RouteStatsPlan` needs (zeroed once)."""
    return 1 + num_experts + num_ranks + num_nodes


class RouteStatsPlan:
    """The layout launch of one geometry: `[N, K]` routing over E experts, R ranks in nodes.

    `block_tokens` (tokens per program) depends on N only below 64 tokens, so one plan serves
    every larger N. Build with `plan_route_stats`; `launch` fills outputs the caller allocated.
    """

    def __init__(
        self,
        num_topk: int,
        num_experts: int,
        num_ranks: int,
        ranks_per_node: int,
        with_nodes: bool,
        block_tokens: int,
    ):
        self.num_ranks = num_ranks
        self.num_experts = num_experts
        self.num_nodes = num_ranks // ranks_per_node
        self.with_nodes = with_nodes
        self.block_tokens = block_tokens
        self.scratch_slots = scratch_slots(num_experts, num_ranks, self.num_nodes)
        block_topk = pow2(max(num_topk, 1))
        self._kernel = KernelLaunch(
            _route_stats_kernel,
            NUM_TOPK=num_topk,
            NUM_EXPERTS=num_experts,
            NUM_RANKS=num_ranks,
            RANKS_PER_NODE=ranks_per_node,
            HAS_NODES=with_nodes,
            BLOCK_TOKENS=block_tokens,
            BLOCK_TOPK=block_topk,
            BLOCK_RANKS=pow2(num_ranks),
            BLOCK_NODES=pow2(self.num_nodes),
            NUM_BINS=pow2(num_experts + 1),
            HOST_BAD_EXPERT=protocol.HOST_BAD_EXPERT,
            num_warps=4,
        )

    def launch(self, stream, topk_idx, num_tokens: int, fixed, host_addr: int, outputs) -> None:
        """One launch on `stream`. `fixed`: `AddressedTensors` of (scratch: int32, >=
        `scratch_slots(...)` entries, zero before and after; rank mask: int32 `[R]`, non-zero for
        ranks whose experts count as not selected); `host_addr`: the host block, where the first
        expert id >= E is recorded; `outputs`: `AddressedTensors` of `allocate_outputs`."""
        launch, (topk_idx,), (scratch, rank_mask), outs = self._kernel.choose(
            (topk_idx,), fixed, outputs
        )
        per_rank, per_node, per_expert, is_token_in_rank = outs
        num_programs = max(1, -(-num_tokens // self.block_tokens))
        launch(
            (num_programs,),
            stream,
            topk_idx,
            num_tokens,
            scratch,
            rank_mask,
            per_rank,
            per_node if per_node is not None else per_rank,
            per_expert,
            is_token_in_rank,
            host_addr,
        )


def plan_route_stats(
    num_tokens: int,
    num_topk: int,
    num_experts: int,
    num_ranks: int,
    ranks_per_node: int,
    with_nodes: bool,
) -> RouteStatsPlan:
    block_topk = pow2(max(num_topk, 1))
    num_nodes = num_ranks // ranks_per_node
    # Keep the [tokens, topk, ranks] membership tile near 8K elements per program.
    block_tokens = max(
        1,
        min(64, 8192 // (block_topk * max(pow2(num_ranks), pow2(num_nodes) if with_nodes else 1))),
    )
    block_tokens = min(pow2(block_tokens), pow2(max(num_tokens, 1)))
    return RouteStatsPlan(
        num_topk, num_experts, num_ranks, ranks_per_node, with_nodes, block_tokens
    )
