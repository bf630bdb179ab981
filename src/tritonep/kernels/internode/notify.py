"""Internode notify: open a collective call and exchange the counts, node level then rank level.

Problem: before rows move, rank (n, l) must learn how many rows it receives from every rank and,
per channel, where they land; as a forwarder, how many tokens reach its node from each column
peer (n', l); the host must learn both totals and the per-expert counts; and no rank may write a
payload into a peer that still runs the previous call's kernels.

Algorithm (one program):
1. Advance this rank's epoch (NVL signal region) and raise `started` in every column peer (through
   the device layer: puts to other nodes) and every node peer (NVL stores).
2. Counting mode only: build this rank's `rdma_channel_prefix_matrix` `[R_n, C]` and
   `gbl_channel_prefix_matrix` `[R, C]` from `is_token_in_rank` (handle entries 1 and 2).
3. Wait until every column peer started this epoch, then put one message to each of them, node n's
   copy holding what concerns node n: the layout key, this rank's tokens to node n per channel, to
   each rank of node n per channel, and its `num_tokens_per_expert` of node n's experts.
4. Wait for the R_n messages of this epoch (one per column peer), then wait until every node peer
   started and store one message to each node peer l': for each column peer, its layout key (-1
   if absent) and its tokens to l' per channel, plus the expert counts of l' summed over them.
5. Wait for the d node messages; every rank now holds the key of every rank: a disagreement is a
   geometry mismatch, reported instead of deadlocking the data kernel.
6. Counting mode only: write `recv_rdma_channel_prefix_matrix`, `recv_rdma_rank_prefix_sum`,
   `recv_gbl_channel_prefix_matrix`, `recv_gbl_rank_prefix_sum` (handle entries 3-6) and into the
   host block the received row count M, the forwarded token count X_rdma (packed as
   `X_rdma << 32 | M` in the received-count slot), the per-expert counts; then `ready`.

Rank masking: a rank exchanges nothing with the ranks it masks. A column peer it masks is also the
forwarder of this rank's tokens to its node, so tokens to that node are not sent at all (the data
kernel uses the same rule: counts and data agree).

Sync protocol: payload stores or puts, then a signal (device layer: ordered after the data); the
receiver acquires the signal. `started` makes the second handshake safe (see `regions.py`).

Example:
    2 nodes x 1 rank, C = 1; rank 0 sends 3 tokens to node 0 and 2 to node 1, rank 1 sends 1 and 4
    -> on rank 1: recv_gbl_rank_prefix_sum = [2, 6], recv_rdma_rank_prefix_sum = [2, 6].
"""

from dataclasses import dataclass

import torch
import triton.language as tl

from ... import protocol
from ...transport import device
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from ..common.sync import STOP_ALL, STOP_OFFSET
from . import regions
from .rings import (
    channel_tokens,
    helper,
    lane,
    now_ns,
    open_peer,
    peer_lanes,
    put_nbi_block,
    quiet,
    report_error,
    signal_op,
    tcumsum,
    tmin,
    tsum,
    wait_at_least,
)

_HEADER = tl.constexpr(regions.HEADER_BYTES)


@helper
def _wait_epoch(
    signals,
    lanes,
    live,
    peers,
    epoch,
    deadline,
    clock_addr,
    host_error_ptr,
    stop,
    rank,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    """Wait until the signal word (int64, local address `signals + 8 * lane`) of every `live` lane
    reached this call's epoch; past the deadline record a timeout naming the first late lane's
    rank (`peers`) with the epochs seen and awaited. Returns ok = no lane was late."""
    tag = epoch << 32
    values = wait_at_least(
        (signals + lanes * 8).to(tl.pointer_type(tl.int64)),
        tag + lanes * 0,
        live,
        deadline,
        clock_addr,
        USE_GLOBALTIMER,
    )
    late = live & (values < tag)
    ok = tsum(late.to(tl.int32), axis=0) == 0
    if not ok:
        report_error(
            host_error_ptr,
            stop,
            STOP_ALL,
            ERR_TIMEOUT,
            rank,
            late,
            peers,
            PHASE,
            -1,
            (values >> 32).to(tl.int32),
            epoch.to(tl.int32),
            BLOCK_RANKS,
        )
    return ok


@named_kernel(
    "internode",
    "notify",
    do_not_specialize=[
        "rank",
        "layout_key",
        "ready_token",
        "num_tokens",
        "num_worst_tokens",
        "rdma_base",
    ],
)
def _notify_kernel(
    peer_bases_ptr,
    routes_ptr,
    rdma_base,
    rank,
    layout_key,
    ready_token,
    num_channels,
    rank_mask_ptr,
    host_addr,
    clock_addr,
    timeout_ns,
    num_tokens,
    num_worst_tokens,
    experts_per_rank,
    num_tokens_per_expert_ptr,
    is_token_in_rank_ptr,
    rdma_channel_prefix_ptr,
    gbl_channel_prefix_ptr,
    recv_rdma_channel_prefix_ptr,
    recv_rdma_rank_prefix_sum_ptr,
    recv_gbl_channel_prefix_ptr,
    recv_gbl_rank_prefix_sum_ptr,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    COUNT: tl.constexpr,
    PHASE: tl.constexpr,
    NVL_DATA: tl.constexpr,
    RDMA_STARTED: tl.constexpr,
    RDMA_FLAGS: tl.constexpr,
    NVL_STARTED: tl.constexpr,
    NVL_FLAGS: tl.constexpr,
    RDMA_INBOX: tl.constexpr,
    RDMA_MSG_STAGING: tl.constexpr,
    RDMA_MSG_BYTES: tl.constexpr,
    NVL_INBOX: tl.constexpr,
    NVL_MSG_BYTES: tl.constexpr,
    HOST_READY: tl.constexpr,
    HOST_NUM_RECV: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_EXPERT_COUNTS: tl.constexpr,
    HOST_OVERFLOW: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    ERR_LAYOUT_MISMATCH: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    host = host_addr.to(tl.pointer_type(tl.int64))
    # Column peers (n', l): the ranks this one exchanges RDMA traffic with; node peers (n, l').
    node, local, nodes, locs, node_live, col_live = peer_lanes(
        rank, rank_mask_ptr, NUM_RANKS, RANKS_PER_NODE, BLOCK_NODES, BLOCK_LOCAL
    )
    ranks = tl.arange(0, BLOCK_RANKS)
    rank_ok = ranks < NUM_RANKS
    node_ok = nodes < NUM_NODES
    loc_ok = locs < D
    chans = tl.arange(0, BLOCK_CHANNELS)
    chan_ok = chans < num_channels
    col_peers = tl.where(node_ok, nodes * D + local, rank)
    node_peers = node * D + locs
    pe, delta, direct = open_peer(routes_ptr, rank, col_peers, TRANSPORT, FORCE_PUT)
    direct_i = direct.to(tl.int32)

    my_base = tl.load(peer_bases_ptr + rank)
    epoch_ptr = my_base.to(tl.pointer_type(tl.int64))
    stop = (my_base + STOP_OFFSET).to(tl.pointer_type(tl.int64))
    epoch = tl.load(epoch_ptr, volatile=True) + 1
    tl.store(epoch_ptr, epoch)
    tag = epoch << 32
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    my_nvl = my_base + NVL_DATA
    nvl_inbox = my_nvl + NVL_INBOX + locs * NVL_MSG_BYTES  # [d] node messages to this rank
    if COUNT:
        msg_ints = (_HEADER + 4 * num_channels * (1 + D) + 4 * D * experts_per_rank) // 4
    else:
        msg_ints = _HEADER // 4 + num_channels * 0

    # 1. This rank's payload areas of the previous call are free: tell the peers that write them.
    for n in range(NUM_NODES):
        if lane(col_live.to(tl.int32), nodes, n) > 0:
            signal_op(
                (rdma_base + RDMA_STARTED + node * 8).to(tl.pointer_type(tl.int64)),
                tag,
                lane(pe, nodes, n),
                lane(delta, nodes, n),
                lane(direct_i, nodes, n) > 0,
                device.SIGNAL_SET,
                TRANSPORT,
            )
    for l2 in range(D):
        if lane(node_live.to(tl.int32), locs, l2) > 0:
            peer_nvl = tl.load(peer_bases_ptr + node * D + l2) + NVL_DATA
            # Publishes nothing but the epoch: no data precedes it.
            tl.atomic_xchg(
                (peer_nvl + NVL_STARTED + local * 8).to(tl.pointer_type(tl.int64)),
                tag,
                sem="release",
                scope="sys",
            )

    # 2. Channel prefix matrices of this rank's tokens (handle entries 1 and 2).
    if COUNT:
        # Rank j receives a token only if neither j nor j's node's forwarder (its rank with this
        # rank's local index) is masked here.
        fwd_live = tl.load(rank_mask_ptr + (ranks // D) * D + local, mask=rank_ok, other=1) == 0
        live_dest = (
            rank_ok & (tl.load(rank_mask_ptr + ranks, mask=rank_ok, other=1) == 0) & fwd_live
        )
        running = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
        running_nodes = tl.zeros([BLOCK_NODES], dtype=tl.int32)
        rows_in_block = tl.arange(0, BLOCK_TOKENS)
        for c in range(0, num_channels):
            begin, end = channel_tokens(c, num_tokens, num_channels)
            for t0 in range(begin, end, BLOCK_TOKENS):
                rows = (t0 + rows_in_block).to(tl.int64)
                row_ok = rows < end
                flags = tl.load(
                    is_token_in_rank_ptr + rows[:, None] * NUM_RANKS + ranks[None, :],
                    mask=row_ok[:, None] & live_dest[None, :],
                    other=0,
                ).to(tl.int32)
                running += tsum(flags, axis=0)
                hits = tl.zeros([BLOCK_TOKENS, BLOCK_NODES], dtype=tl.int32)
                for l2 in range(D):
                    j = nodes * D + l2
                    j_live = col_live & (tl.load(rank_mask_ptr + j, mask=node_ok, other=1) == 0)
                    hit = tl.load(
                        is_token_in_rank_ptr + rows[:, None] * NUM_RANKS + j[None, :],
                        mask=row_ok[:, None] & j_live[None, :],
                        other=0,
                    ).to(tl.int32)
                    hits = tl.maximum(hits, hit)
                running_nodes += tsum(hits, axis=0)
            tl.store(gbl_channel_prefix_ptr + ranks * num_channels + c, running, mask=rank_ok)
            tl.store(
                rdma_channel_prefix_ptr + nodes * num_channels + c, running_nodes, mask=node_ok
            )
        tl.debug_barrier()  # the matrices are read back below by other threads of this program

    # 3. Every column peer started this epoch: send each its message.
    ok = _wait_epoch(
        rdma_base + RDMA_STARTED,
        nodes,
        col_live,
        col_peers,
        epoch,
        deadline,
        clock_addr,
        host + HOST_ERROR,
        stop,
        rank,
        ERR_TIMEOUT,
        PHASE,
        BLOCK_RANKS,
        USE_GLOBALTIMER,
    )
    if ok:
        for n in range(NUM_NODES):
            if lane(col_live.to(tl.int32), nodes, n) > 0:
                msg = rdma_base + RDMA_MSG_STAGING + n * RDMA_MSG_BYTES
                tl.store(msg.to(tl.pointer_type(tl.int64)), layout_key)
                if COUNT:
                    payload = (msg + _HEADER).to(tl.pointer_type(tl.int32))
                    node_row = tl.load(
                        rdma_channel_prefix_ptr + n * num_channels + chans, mask=chan_ok
                    )
                    tl.store(payload + chans, node_row, mask=chan_ok)
                    m2 = loc_ok[:, None] & chan_ok[None, :]
                    rank_rows = tl.load(
                        gbl_channel_prefix_ptr
                        + (n * D + locs)[:, None] * num_channels
                        + chans[None, :],
                        mask=m2,
                    )
                    tl.store(
                        payload + num_channels + locs[:, None] * num_channels + chans[None, :],
                        rank_rows,
                        mask=m2,
                    )
                    node_experts = D * experts_per_rank
                    for e0 in range(0, node_experts, BLOCK_EXPERTS):
                        es = e0 + tl.arange(0, BLOCK_EXPERTS)
                        counts = tl.load(
                            num_tokens_per_expert_ptr + n * node_experts + es,
                            mask=es < node_experts,
                        )
                        tl.store(
                            payload + num_channels * (1 + D) + es, counts, mask=es < node_experts
                        )
                tl.debug_barrier()  # every thread's part of the message is in place
                put_nbi_block(
                    (rdma_base + RDMA_INBOX + node * RDMA_MSG_BYTES).to(tl.pointer_type(tl.int32)),
                    msg.to(tl.pointer_type(tl.int32)),
                    msg_ints,
                    lane(pe, nodes, n),
                    lane(delta, nodes, n),
                    lane(direct_i, nodes, n) > 0,
                    TRANSPORT,
                    PUT_BLOCK,
                )
                # Ordered after the message by the device layer: whoever sees it sees the data.
                signal_op(
                    (rdma_base + RDMA_FLAGS + node * 8).to(tl.pointer_type(tl.int64)),
                    tag,
                    lane(pe, nodes, n),
                    lane(delta, nodes, n),
                    lane(direct_i, nodes, n) > 0,
                    device.SIGNAL_SET,
                    TRANSPORT,
                )

        # 4. The column peers' messages, then the node peers' start, then one message to each.
        ok = _wait_epoch(
            rdma_base + RDMA_FLAGS,
            nodes,
            col_live,
            col_peers,
            epoch,
            deadline,
            clock_addr,
            host + HOST_ERROR,
            stop,
            rank,
            ERR_TIMEOUT,
            PHASE,
            BLOCK_RANKS,
            USE_GLOBALTIMER,
        )
    if ok:
        tl.debug_barrier()  # the acquired flags order the inbox reads of every thread
        ok = _wait_epoch(
            my_nvl + NVL_STARTED,
            locs,
            node_live,
            node_peers,
            epoch,
            deadline,
            clock_addr,
            host + HOST_ERROR,
            stop,
            rank,
            ERR_TIMEOUT,
            PHASE,
            BLOCK_RANKS,
            USE_GLOBALTIMER,
        )
    if ok:
        inbox = rdma_base + RDMA_INBOX + nodes * RDMA_MSG_BYTES  # [R_n] message addresses
        keys = tl.load(inbox.to(tl.pointer_type(tl.int64)), mask=col_live, other=-1, volatile=True)
        keys = tl.where(col_live, keys, -1)
        for l2 in range(D):
            if lane(node_live.to(tl.int32), locs, l2) > 0:
                peer_nvl = tl.load(peer_bases_ptr + node * D + l2) + NVL_DATA
                dst = peer_nvl + NVL_INBOX + local * NVL_MSG_BYTES
                tl.store(dst.to(tl.pointer_type(tl.int64)) + nodes, keys, mask=node_ok)
                if COUNT:
                    body = (dst + 8 * NUM_NODES).to(tl.pointer_type(tl.int32))
                    m2 = col_live[:, None] & chan_ok[None, :]
                    rows = tl.load(
                        (inbox + _HEADER + 4 * num_channels * (1 + l2)).to(
                            tl.pointer_type(tl.int32)
                        )[:, None]
                        + chans[None, :],
                        mask=m2,
                        other=0,
                        volatile=True,
                    )
                    tl.store(
                        body + nodes[:, None] * num_channels + chans[None, :],
                        rows,
                        mask=node_ok[:, None] & chan_ok[None, :],
                    )
                    expert_base = _HEADER + 4 * num_channels * (1 + D) + 4 * l2 * experts_per_rank
                    for e0 in range(0, experts_per_rank, BLOCK_EXPERTS):
                        es = e0 + tl.arange(0, BLOCK_EXPERTS)
                        e_ok = es < experts_per_rank
                        counts = tl.load(
                            (inbox + expert_base).to(tl.pointer_type(tl.int32))[:, None]
                            + es[None, :],
                            mask=col_live[:, None] & e_ok[None, :],
                            other=0,
                            volatile=True,
                        )
                        tl.store(
                            body + NUM_NODES * num_channels + es, tsum(counts, axis=0), mask=e_ok
                        )
                tl.debug_barrier()  # the whole message first
                tl.atomic_xchg(
                    (peer_nvl + NVL_FLAGS + local * 8).to(tl.pointer_type(tl.int64)),
                    tag,
                    sem="release",
                    scope="sys",
                )  # publishes the message stored above

        # 5. The node peers' messages: the key of every rank.
        ok = _wait_epoch(
            my_nvl + NVL_FLAGS,
            locs,
            node_live,
            node_peers,
            epoch,
            deadline,
            clock_addr,
            host + HOST_ERROR,
            stop,
            rank,
            ERR_TIMEOUT,
            PHASE,
            BLOCK_RANKS,
            USE_GLOBALTIMER,
        )
    if ok:
        tl.debug_barrier()  # the acquired flags order the inbox reads of every thread
        all_keys = tl.load(
            nvl_inbox.to(tl.pointer_type(tl.int64))[:, None] + nodes[None, :],
            mask=node_live[:, None] & node_ok[None, :],
            other=-1,
            volatile=True,
        )  # [local index l'', node n'] = key of rank (n', l'')
        grid = nodes[None, :] * D + locs[:, None]
        differ = (all_keys != -1) & (all_keys != layout_key)
        if tsum(tsum(differ.to(tl.int32), axis=1), axis=0) > 0:
            ok = False
            first = tmin(tmin(tl.where(differ, grid, NUM_RANKS), axis=1), axis=0)
            seen = tsum(tsum(tl.where(grid == first, all_keys, 0), axis=1), axis=0)
            report_error(
                host + HOST_ERROR,
                stop,
                STOP_ALL,
                ERR_LAYOUT_MISMATCH,
                rank,
                ranks == first,
                ranks,
                PHASE,
                -1,
                seen,
                layout_key,
                BLOCK_RANKS,
            )

    # 6. Receive-side prefix matrices (handle entries 3-6) and the host-visible counts.
    if COUNT and ok:
        # Rows from rank j = (n', l''): forwarder l'''s message, row n', inclusive over channels.
        j_local = ranks % D
        j_node = ranks // D
        j_rows = my_nvl + NVL_INBOX + j_local * NVL_MSG_BYTES + 8 * NUM_NODES
        j_rows += 4 * j_node * num_channels
        j_key = tl.load(
            (my_nvl + NVL_INBOX + j_local * NVL_MSG_BYTES + j_node * 8).to(
                tl.pointer_type(tl.int64)
            ),
            mask=rank_ok,
            other=-1,
            volatile=True,
        )
        forwarder_live = tl.load(rank_mask_ptr + node * D + j_local, mask=rank_ok, other=1) == 0
        present = rank_ok & forwarder_live & (j_key != -1)
        total = tl.load(
            (j_rows + 4 * (num_channels - 1)).to(tl.pointer_type(tl.int32)),
            mask=present,
            other=0,
            volatile=True,
        )
        prefix = tcumsum(total, axis=0)
        tl.store(recv_gbl_rank_prefix_sum_ptr + ranks, prefix, mask=rank_ok)
        shifted = tl.load(
            j_rows.to(tl.pointer_type(tl.int32))[:, None] + chans[None, :] - 1,
            mask=present[:, None] & chan_ok[None, :] & (chans[None, :] > 0),
            other=0,
            volatile=True,
        )
        tl.store(
            recv_gbl_channel_prefix_ptr + ranks[:, None] * num_channels + chans[None, :],
            (prefix - total)[:, None] + shifted,
            mask=rank_ok[:, None] & chan_ok[None, :],
        )
        num_recv = tsum(total, axis=0)
        # Tokens reaching this node through this rank: its own inbox, one message per column peer.
        inbox = rdma_base + RDMA_INBOX + nodes * RDMA_MSG_BYTES + _HEADER
        node_rows = tl.load(
            inbox.to(tl.pointer_type(tl.int32))[:, None] + chans[None, :],
            mask=col_live[:, None] & chan_ok[None, :],
            other=0,
            volatile=True,
        )
        tl.store(
            recv_rdma_channel_prefix_ptr + nodes[:, None] * num_channels + chans[None, :],
            node_rows,
            mask=node_ok[:, None] & chan_ok[None, :],
        )
        node_total = tl.load(
            (inbox + 4 * (num_channels - 1)).to(tl.pointer_type(tl.int32)),
            mask=col_live,
            other=0,
            volatile=True,
        )
        tl.store(recv_rdma_rank_prefix_sum_ptr + nodes, tcumsum(node_total, axis=0), mask=node_ok)
        num_rdma_recv = tsum(node_total, axis=0)
        for e0 in range(0, experts_per_rank, BLOCK_EXPERTS):
            es = e0 + tl.arange(0, BLOCK_EXPERTS)
            e_ok = es < experts_per_rank
            counts = tl.load(
                (nvl_inbox + 8 * NUM_NODES + 4 * NUM_NODES * num_channels).to(
                    tl.pointer_type(tl.int32)
                )[:, None]
                + es[None, :],
                mask=node_live[:, None] & e_ok[None, :],
                other=0,
                volatile=True,
            )
            tl.store(host + HOST_EXPERT_COUNTS + es, tsum(counts, axis=0).to(tl.int64), mask=e_ok)
        tl.store(host + HOST_NUM_RECV, (num_rdma_recv.to(tl.int64) << 32) | num_recv.to(tl.int64))
        most = tl.maximum(num_recv, num_rdma_recv)
        if (num_worst_tokens > 0) & (most > num_worst_tokens):
            # The data kernel drops what lies beyond num_worst_tokens; the host reports it.
            tl.store(host + HOST_OVERFLOW, most.to(tl.int64))
        tl.debug_barrier()
        # Publishes the counts stored above to the host.
        tl.atomic_xchg(host + HOST_READY, ready_token, sem="release", scope="sys")
    quiet(TRANSPORT)  # the message puts are complete before the staging area is reused


@dataclass(frozen=True)
class NotifyCounts:
    """What a counting notify (non-cached dispatch) reads and writes.

    Reads `num_tokens_per_expert` int32 `[E]` and `is_token_in_rank` bool `[N, R]`; writes handle
    entries 1-6 (all int32, `[R_n, C]`, `[R, C]`, `[R_n, C]`, `[R_n]`, `[R, C]`, `[R]`) and the host
    block's counts.
    """

    num_tokens: int
    num_worst_tokens: int
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    recv_rdma_channel_prefix_matrix: torch.Tensor
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: torch.Tensor
    recv_gbl_rank_prefix_sum: torch.Tensor


class NotifyPlan:
    """The notify launch of one call geometry on one Buffer.

    `ctx`: the Buffer's `LaunchContext`; `memory`: its `BufferMemory` (RDMA routes, transport);
    `layout`: the call's `regions.CallLayout`; `counting`: exchange counts (non-cached dispatch)
    or only open the call (cached dispatch, combine); `layout_key`: the geometry fingerprint every
    rank compares.
    """

    def __init__(self, ctx, memory, layout, counting: bool, layout_key: int):
        signals = layout.signals
        self._head = (ctx.peer_bases, memory.rdma_routes, memory.rdma_base, ctx.rank, layout_key)
        self._middle = (
            layout.num_channels,
            ctx.rank_mask,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
        )
        self._experts_per_rank = layout.experts_per_rank if counting else 1
        # Without COUNT the tensor arguments are never dereferenced: any valid pointer will do.
        self._no_counts = (0, 0, 1) + (ctx.peer_bases,) * 8
        num_nodes = signals.num_nodes
        self._kernel = KernelLaunch(
            _notify_kernel,
            wrap=memory.device_wrapper,
            NUM_RANKS=ctx.num_ranks,
            RANKS_PER_NODE=signals.ranks_per_node,
            COUNT=counting,
            PHASE=protocol.PHASE_NOTIFY,
            NVL_DATA=ctx.data_offset,
            RDMA_STARTED=signals.rdma_started,
            RDMA_FLAGS=signals.rdma_flags,
            NVL_STARTED=signals.nvl_started,
            NVL_FLAGS=signals.nvl_flags,
            RDMA_INBOX=layout.rdma_inbox,
            RDMA_MSG_STAGING=layout.rdma_msg_staging,
            RDMA_MSG_BYTES=layout.rdma_msg_bytes,
            NVL_INBOX=layout.nvl_inbox,
            NVL_MSG_BYTES=layout.nvl_msg_bytes,
            HOST_READY=protocol.HOST_READY,
            HOST_NUM_RECV=protocol.HOST_NUM_RECV,
            HOST_ERROR=protocol.HOST_ERROR,
            HOST_EXPERT_COUNTS=protocol.HOST_EXPERT_COUNTS,
            HOST_OVERFLOW=protocol.HOST_OVERFLOW,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            ERR_LAYOUT_MISMATCH=protocol.ERR_LAYOUT_MISMATCH,
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_NODES=pow2(num_nodes),
            BLOCK_LOCAL=pow2(signals.ranks_per_node),
            BLOCK_CHANNELS=pow2(layout.num_channels),
            BLOCK_EXPERTS=min(pow2(max(layout.experts_per_rank, 1)), 128),
            BLOCK_TOKENS=32,
            TRANSPORT=memory.rdma_transport,
            FORCE_PUT=memory.rdma_force_put,
            USE_GLOBALTIMER=ctx.use_globaltimer,
            PUT_BLOCK=256,
            num_warps=4,
        )

    def launch(self, stream, ready_token: int = 0, counts: NotifyCounts | None = None) -> None:
        """One program on `stream`; `ready_token` (counting) is what it writes to the host's ready
        slot last."""
        if counts is None:
            tail = self._no_counts
        else:
            tail = (
                counts.num_tokens,
                counts.num_worst_tokens,
                self._experts_per_rank,
                counts.num_tokens_per_expert,
                counts.is_token_in_rank,
                counts.rdma_channel_prefix_matrix,
                counts.gbl_channel_prefix_matrix,
                counts.recv_rdma_channel_prefix_matrix,
                counts.recv_rdma_rank_prefix_sum,
                counts.recv_gbl_channel_prefix_matrix,
                counts.recv_gbl_rank_prefix_sum,
            )
        self._kernel.launch((1,), stream, *self._head, ready_token, *self._middle, *tail)
