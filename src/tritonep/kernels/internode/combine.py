"""Internode combine: reduce inside each node first, then across nodes, back on the source rank.

Problem: after a dispatch with handle h, rank r = (n, l') holds `x_r [X, H]` (row i = its i-th
received row); token t of rank s = (n_s, l) must become
`bias0[t] + bias1[t] + sum over nodes n (ascending) of round(sum over ranks (n, l') of node n that
received t (ascending l') of x_(n,l')[row of t])`, all sums in fp32, the per-node partial rounded to
x's dtype for the crossing (reference §10 allows it), the result rounded once; top-k weights
likewise but never rounded.

Algorithm (one persistent launch, channels as in dispatch, every flow the reverse of dispatch's):
* NVL sender (rank (n, l'), channel c): returns to each forwarder (n, l) of its node the rows it
  received through it, source by source (n' ascending) and token by token: the stream that
  dispatch's `send_nvl_head` indexes. It serves whichever forwarder has rows left and room.
* forwarder (rank (n, l), channel c): walks the tokens it forwarded in dispatch, column peer by
  column peer (n' ascending) and token by token, so it consumes every local rank's stream in
  order; per token it sums the copies of the ranks that got it (`send_nvl_head >= 0`), rounds, and
  writes the partial to slot `k % capacity` of ring (c, n) of the source (n', l) -- k being the
  token's index among (n', c)'s tokens to node n, which dispatch recorded in the source's
  `send_rdma_head` -- through the device layer, then signals the tail.
* receiver (rank s, channel c): walks its channel's tokens in order; once every node's partial of
  a tile has arrived it sums bias, then partials by ascending node, rounds, stores, and hands the
  slots back to the forwarders.

Progress with small rings: the forwarder sends a partial tile when the source's ring is nearly
full, and each receiver tile needs at most `capacity` entries of any ring, so the forwarder always
holds what the receiver waits for or has room to produce it; the forwarder only needs rows the NVL
senders can already push (at most a tile per stream, a tile fits a ring). Program layout (`FUSED`)
as in dispatch: on the GPU program c is the NVL sender and receiver of channel c and program C + c
its forwarder; in the interpreter program c runs all three.

Example:
    2 nodes x 2 ranks; token t of rank 0 went to ranks 2 and 3, which return 1.0 and 2.0
    -> rank 2 (the forwarder) sums 3.0, rounds it and puts it to rank 0, which adds its bias.
"""

import torch
import triton.language as tl

from ... import _env, protocol
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from .rings import (
    channel_roles,
    channel_tokens,
    column,
    copy_rows,
    forwarded_tokens,
    helper,
    idle,
    lane,
    open_call,
    open_peer,
    peer_lanes,
    poll,
    publish_slots,
    quiet,
    received_rows,
    round_to,
    row_block,
    signal_peer,
    targmax,
    tmax,
    tmin,
    tsum,
)

MAX_TILE = 64


@helper
def _return_step(
    c,
    cs_sent,
    cs_stream,
    cs_head,
    cs_total,
    starts,
    counts,
    tag,
    my_nvl,
    peer_bases_ptr,
    rank,
    x_addr,
    topk_weights_addr,
    nvl_capacity,
    chunk,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    NVL_DATA: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Return one chunk of received rows to one forwarder of this node.

    Returns (cs_sent, cs_stream, cs_head, moved, rank waited for or -1)."""
    D: tl.constexpr = RANKS_PER_NODE
    node = rank // D
    local = rank % D
    ranks = tl.arange(0, BLOCK_RANKS)
    rank_ok = ranks < NUM_RANKS
    locs = tl.arange(0, BLOCK_LOCAL)
    i = tl.arange(0, TILE)
    moved = tl.zeros([], dtype=tl.int32)
    pending = cs_stream < cs_total
    room = (cs_head - tag).to(tl.int32) + nvl_capacity - cs_stream
    stale = pending & (room < tl.minimum(cs_total - cs_stream, chunk))
    if tsum(stale.to(tl.int32), axis=0) > 0:
        cs_head = poll(
            (my_nvl + NVL_HEADS + (c * D + locs) * 8).to(tl.pointer_type(tl.int64)), cs_head, stale
        )
        room = (cs_head - tag).to(tl.int32) + nvl_capacity - cs_stream
    ready = tl.where(pending, tl.minimum(cs_total - cs_stream, room), 0)
    waiting = tl.where(
        tsum(pending.to(tl.int32), axis=0) > 0,
        node * D + tmin(tl.where(pending, locs, BLOCK_LOCAL), axis=0),
        -1,
    )
    if tmax(ready, axis=0) > 0:
        tl.debug_barrier()  # slots are overwritten only after the acquired heads freed them
        dst = targmax(ready, axis=0)
        # The stream to forwarder dst: sources j = (n', dst) by ascending n', rows in order.
        candidates = rank_ok & ((ranks % D) == dst) & (cs_sent < counts)
        j = tmin(tl.where(candidates, ranks, BLOCK_RANKS), axis=0)
        k = tl.minimum(tl.minimum(lane(ready, locs, dst), lane(counts - cs_sent, ranks, j)), chunk)
        src_row = (lane(starts + cs_sent, ranks, j) + i).to(tl.int64)
        position = lane(cs_stream, locs, dst)
        in_chunk = i < k
        peer_nvl = tl.load(peer_bases_ptr + node * D + dst) + NVL_DATA
        slots = (
            peer_nvl
            + NVL_RING
            + ((c * D + local) * nvl_capacity + (position + i) % nvl_capacity).to(tl.int64)
            * SLOT_BYTES
        )
        copy_rows(
            x_addr + src_row * ROW_BYTES, slots, in_chunk, ROW_BYTES // 4, BLOCK_W, "", PREFETCH
        )
        if HAS_WEIGHTS:
            ks = tl.arange(0, BLOCK_TOPK)
            mk = in_chunk[:, None] & (ks[None, :] < NUM_TOPK)
            w = tl.load(
                (topk_weights_addr + src_row * (NUM_TOPK * 4)).to(tl.pointer_type(tl.float32))[
                    :, None
                ]
                + ks[None, :],
                mask=mk,
            )
            tl.store(
                (slots + OFF_WEIGHTS).to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
                w,
                mask=mk,
            )
        tl.debug_barrier()  # every thread's rows before the tail
        # Publishes the rows stored above.
        tl.atomic_xchg(
            (peer_nvl + NVL_TAILS + (c * D + local) * 8).to(tl.pointer_type(tl.int64)),
            tag + (position + k).to(tl.int64),
            sem="release",
            scope="sys",
        )
        cs_sent = tl.where(ranks == j, cs_sent + k, cs_sent)
        cs_stream = tl.where(locs == dst, cs_stream + k, cs_stream)
        moved += 1
    return cs_sent, cs_stream, cs_head, moved, waiting


@helper
def _reduce_step(
    c,
    f_node,
    f_done,
    f_count,
    f_rowbase,
    f_nvl_seen,
    f_nvl_used,
    f_rdma_head,
    tag,
    node_live,
    my_nvl,
    peer_bases_ptr,
    routes_ptr,
    rdma_base,
    rank,
    send_nvl_head_ptr,
    rdma_capacity,
    nvl_capacity,
    chunk,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    HIDDEN: tl.constexpr,
    DTYPE: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    NVL_DATA: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_RING: tl.constexpr,
    RDMA_STAGING: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    """Reduce one tile of forwarded tokens over this node's ranks and send it to the source.

    Returns (f_node, f_done, f_nvl_seen, f_nvl_used, f_rdma_head, moved, rank waited for)."""
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    node = rank // D
    local = rank % D
    nodes = tl.arange(0, BLOCK_NODES)
    locs = tl.arange(0, BLOCK_LOCAL)
    loc_ok = locs < D
    i = tl.arange(0, TILE)
    moved = tl.zeros([], dtype=tl.int32)
    # The next column peer with tokens left (ascending node).
    left = lane(f_count, nodes, f_node)
    while (f_node < NUM_NODES) & (f_done >= left):
        f_node += 1
        f_done = f_done * 0
        left = lane(f_count, nodes, f_node)
    waiting = tl.where(f_node < NUM_NODES, f_node * D + local, -1)
    if f_node < NUM_NODES:
        room = (lane(f_rdma_head, nodes, f_node) - tag).to(tl.int32) + rdma_capacity - f_done
        if room <= 0:
            heads = (rdma_base + RDMA_HEADS + (c * NUM_NODES + nodes) * 8).to(
                tl.pointer_type(tl.int64)
            )
            f_rdma_head = poll(heads, f_rdma_head, nodes == f_node)
            room = (lane(f_rdma_head, nodes, f_node) - tag).to(tl.int32) + rdma_capacity - f_done
        # A partial tile when the source's ring is nearly full (see the module docstring).
        k = tl.minimum(tl.minimum(left - f_done, chunk), room)
        if k > 0:
            rows = (lane(f_rowbase, nodes, f_node) + f_done + i).to(tl.int64)
            in_chunk = i < k
            idx = tl.load(
                send_nvl_head_ptr + rows[:, None] * D + locs[None, :],
                mask=in_chunk[:, None] & loc_ok[None, :],
                other=-1,
            )
            idx = tl.where(node_live[None, :], idx, -1)
            need = tmax(idx, axis=0) + 1  # rows of each local rank's stream this tile needs
            short = (tag + need.to(tl.int64)) > f_nvl_seen
            if tsum(short.to(tl.int32), axis=0) > 0:
                tails = (my_nvl + NVL_TAILS + (c * D + locs) * 8).to(tl.pointer_type(tl.int64))
                f_nvl_seen = poll(tails, f_nvl_seen, short)
                short = (tag + need.to(tl.int64)) > f_nvl_seen
            if tsum(short.to(tl.int32), axis=0) > 0:
                waiting = node * D + tmin(tl.where(short, locs, BLOCK_LOCAL), axis=0)
            else:
                tl.debug_barrier()  # rows and free slots acquired by one thread, used by all
                pe, delta, direct = open_peer(
                    routes_ptr, rank, f_node * D + local, TRANSPORT, FORCE_PUT
                )
                ring = (
                    rdma_base
                    + RDMA_RING
                    + ((c * NUM_NODES + node) * rdma_capacity).to(tl.int64) * SLOT_BYTES
                )
                stage = (
                    rdma_base
                    + RDMA_STAGING
                    + ((c * NUM_NODES + f_node) * rdma_capacity).to(tl.int64) * SLOT_BYTES
                )
                q = ((f_done + i) % rdma_capacity).to(tl.int64)
                out = tl.where(direct, ring + delta, stage) + q * SLOT_BYTES
                hs = tl.arange(0, BLOCK_H)
                for h0 in range(0, HIDDEN, BLOCK_H):
                    cols = h0 + hs
                    col_ok = cols < HIDDEN
                    acc = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
                    for l2 in range(D):
                        id_l = column(idx, locs, l2)
                        addr = (
                            my_nvl
                            + NVL_RING
                            + ((c * D + l2) * nvl_capacity + tl.maximum(id_l, 0) % nvl_capacity).to(
                                tl.int64
                            )
                            * SLOT_BYTES
                        )
                        acc += tl.load(
                            row_block(addr, cols, DTYPE, BLOCK_H),
                            mask=(in_chunk & (id_l >= 0))[:, None] & col_ok[None, :],
                            other=0.0,
                            cache_modifier=".cg",
                        ).to(tl.float32)
                    tl.store(
                        row_block(out, cols, DTYPE, BLOCK_H),
                        round_to(acc, DTYPE, INTERPRETED),
                        mask=in_chunk[:, None] & col_ok[None, :],
                    )
                if HAS_WEIGHTS:
                    ks = tl.arange(0, BLOCK_TOPK)
                    wacc = tl.zeros([TILE, BLOCK_TOPK], dtype=tl.float32)
                    for l2 in range(D):
                        id_l = column(idx, locs, l2)
                        addr = (
                            my_nvl
                            + NVL_RING
                            + OFF_WEIGHTS
                            + ((c * D + l2) * nvl_capacity + tl.maximum(id_l, 0) % nvl_capacity).to(
                                tl.int64
                            )
                            * SLOT_BYTES
                        )
                        wacc += tl.load(
                            addr.to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
                            mask=(in_chunk & (id_l >= 0))[:, None] & (ks[None, :] < NUM_TOPK),
                            other=0.0,
                            cache_modifier=".cg",
                        )
                    tl.store(
                        (out + OFF_WEIGHTS).to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
                        wacc,
                        mask=in_chunk[:, None] & (ks[None, :] < NUM_TOPK),
                    )
                publish_slots(
                    ring,
                    stage,
                    rdma_base + RDMA_TAILS + (c * NUM_NODES + node) * 8,
                    f_done,
                    k,
                    rdma_capacity,
                    tag,
                    pe,
                    delta,
                    direct,
                    SLOT_BYTES,
                    TRANSPORT,
                    PUT_BLOCK,
                )
                f_nvl_used = tl.maximum(f_nvl_used, need)
                tl.debug_barrier()  # every thread read its rows before they go back
                for l2 in range(D):
                    if lane(need, locs, l2) > 0:
                        peer_nvl = tl.load(peer_bases_ptr + node * D + l2) + NVL_DATA
                        # Publishes nothing but consumption: the sender may reuse the slots.
                        tl.atomic_xchg(
                            (peer_nvl + NVL_HEADS + (c * D + local) * 8).to(
                                tl.pointer_type(tl.int64)
                            ),
                            tag + lane(f_nvl_used, locs, l2).to(tl.int64),
                            sem="release",
                            scope="sys",
                        )
                f_done += k
                moved += 1
                waiting = waiting * 0 - 1
    return f_node, f_done, f_nvl_seen, f_nvl_used, f_rdma_head, moved, waiting


@helper
def _receive_step(
    c,
    cr_next,
    cr_end,
    cr_seen,
    tag,
    col_live,
    routes_ptr,
    rdma_base,
    rank,
    send_rdma_head_ptr,
    bias0_ptr,
    bias1_ptr,
    out_ptr,
    out_weights_ptr,
    rdma_capacity,
    chunk,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    HIDDEN: tl.constexpr,
    DTYPE: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BIAS0: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_RING: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Finish one tile of this rank's tokens once every node's partial arrived.

    Returns (cr_next, cr_seen, moved, rank waited for or -1)."""
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    node = rank // D
    local = rank % D
    nodes = tl.arange(0, BLOCK_NODES)
    node_ok = nodes < NUM_NODES
    i = tl.arange(0, TILE)
    moved = tl.zeros([], dtype=tl.int32)
    rows = cr_next + i
    valid = (i < chunk) & (rows < cr_end)
    rows64 = rows.to(tl.int64)
    idx = tl.load(
        send_rdma_head_ptr + rows64[:, None] * NUM_NODES + nodes[None, :],
        mask=valid[:, None] & node_ok[None, :],
        other=-1,
    )
    idx = tl.where(col_live[None, :], idx, -1)
    need = tmax(idx, axis=0) + 1  # partials of each node's stream this tile needs
    short = (tag + need.to(tl.int64)) > cr_seen
    if tsum(short.to(tl.int32), axis=0) > 0:
        tails = (rdma_base + RDMA_TAILS + (c * NUM_NODES + nodes) * 8).to(tl.pointer_type(tl.int64))
        cr_seen = poll(tails, cr_seen, short)
        short = (tag + need.to(tl.int64)) > cr_seen
    blocked = tsum(short.to(tl.int32), axis=0) > 0
    waiting = tl.where(blocked, tmin(tl.where(short, nodes, BLOCK_NODES), axis=0) * D + local, -1)
    if not blocked:
        tl.debug_barrier()  # the partials acquired by one thread are read by all
        hs = tl.arange(0, BLOCK_H)
        for h0 in range(0, HIDDEN, BLOCK_H):
            cols = h0 + hs
            col_ok = cols < HIDDEN
            m2 = valid[:, None] & col_ok[None, :]
            acc = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
            if HAS_BIAS0:
                acc += tl.load(
                    bias0_ptr + rows64[:, None] * HIDDEN + cols[None, :], mask=m2, other=0.0
                ).to(tl.float32)
            if HAS_BIAS1:
                acc += tl.load(
                    bias1_ptr + rows64[:, None] * HIDDEN + cols[None, :], mask=m2, other=0.0
                ).to(tl.float32)
            for n in range(NUM_NODES):
                id_n = column(idx, nodes, n)
                addr = (
                    rdma_base
                    + RDMA_RING
                    + (
                        (c * NUM_NODES + n) * rdma_capacity + tl.maximum(id_n, 0) % rdma_capacity
                    ).to(tl.int64)
                    * SLOT_BYTES
                )
                acc += tl.load(
                    row_block(addr, cols, DTYPE, BLOCK_H),
                    mask=(valid & (id_n >= 0))[:, None] & col_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                ).to(tl.float32)
            tl.store(
                out_ptr + rows64[:, None] * HIDDEN + cols[None, :],
                round_to(acc, DTYPE, INTERPRETED),
                mask=m2,
            )
        if HAS_WEIGHTS:
            ks = tl.arange(0, BLOCK_TOPK)
            mk = valid[:, None] & (ks[None, :] < NUM_TOPK)
            wacc = tl.zeros([TILE, BLOCK_TOPK], dtype=tl.float32)
            for n in range(NUM_NODES):
                id_n = column(idx, nodes, n)
                addr = (
                    rdma_base
                    + RDMA_RING
                    + OFF_WEIGHTS
                    + (
                        (c * NUM_NODES + n) * rdma_capacity + tl.maximum(id_n, 0) % rdma_capacity
                    ).to(tl.int64)
                    * SLOT_BYTES
                )
                wacc += tl.load(
                    addr.to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
                    mask=mk & (id_n >= 0)[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(out_weights_ptr + rows64[:, None] * NUM_TOPK + ks[None, :], wacc, mask=mk)
        # Hand the slots back to each node's forwarder (after every thread read them).
        for n in range(NUM_NODES):
            used = lane(need, nodes, n)
            if used > 0:
                signal_peer(
                    routes_ptr,
                    rank,
                    n * D + local,
                    rdma_base + RDMA_HEADS + (c * NUM_NODES + node) * 8,
                    tag + used.to(tl.int64),
                    TRANSPORT,
                    FORCE_PUT,
                )
        cr_next = cr_next + tl.minimum(chunk, cr_end - cr_next)
        moved += 1
    return cr_next, cr_seen, moved, waiting


@named_kernel("internode", "combine", do_not_specialize=["rdma_base", "rank", "num_tokens"])
def _combine_kernel(
    x_addr,
    topk_weights_addr,
    bias0_ptr,
    bias1_ptr,
    out_ptr,
    out_weights_ptr,
    rank_mask_ptr,
    recv_rdma_channel_prefix_ptr,
    recv_rdma_rank_prefix_sum_ptr,
    recv_gbl_channel_prefix_ptr,
    recv_gbl_rank_prefix_sum_ptr,
    send_rdma_head_ptr,
    send_nvl_head_ptr,
    peer_bases_ptr,
    routes_ptr,
    rdma_base,
    rank,
    num_tokens,
    num_channels,
    rdma_capacity,
    nvl_capacity,
    rdma_chunk,
    nvl_chunk,
    host_addr,
    clock_addr,
    timeout_ns,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    HIDDEN: tl.constexpr,
    DTYPE: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BIAS0: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    NVL_DATA: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_RING: tl.constexpr,
    RDMA_STAGING: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    FUSED: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PREFETCH: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    ROW_BYTES: tl.constexpr = HIDDEN * DTYPE.primitive_bitwidth // 8
    host, stop, ok, ranks, live, peer_bases, my_base, tag, deadline = open_call(
        host_addr,
        rank_mask_ptr,
        peer_bases_ptr,
        rank,
        clock_addr,
        timeout_ns,
        NUM_RANKS,
        BLOCK_RANKS,
        USE_GLOBALTIMER,
    )
    epoch = tag >> 32
    node, _, nodes, locs, node_live, col_live = peer_lanes(
        rank, rank_mask_ptr, NUM_RANKS, RANKS_PER_NODE, BLOCK_NODES, BLOCK_LOCAL
    )
    rank_ok = ranks < NUM_RANKS
    my_nvl = my_base + NVL_DATA
    # sends: the NVL sender and receiver of channel c; forwards: its forwarder.
    c, sends, forwards = channel_roles(num_channels, FUSED)

    # NVL sender: x rows of (source j, channel c), returned to forwarder j % d.
    starts, ends = received_rows(
        recv_gbl_channel_prefix_ptr,
        recv_gbl_rank_prefix_sum_ptr,
        c,
        num_channels,
        NUM_RANKS,
        BLOCK_RANKS,
    )
    forwarder_live = tl.load(rank_mask_ptr + node * D + ranks % D, mask=rank_ok, other=1) == 0
    counts = tl.where(sends & rank_ok & forwarder_live, ends - starts, 0)
    cs_total = tsum(tl.where((ranks[None, :] % D) == locs[:, None], counts[None, :], 0), 1)
    cs_sent = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
    cs_stream = tl.zeros([BLOCK_LOCAL], dtype=tl.int32)
    cs_head = tl.zeros([BLOCK_LOCAL], dtype=tl.int64) + tag

    # Forwarder: tokens of (column peer (n', l), channel c), rows of send_nvl_head.
    f_count, f_rowbase = forwarded_tokens(
        recv_rdma_channel_prefix_ptr,
        recv_rdma_rank_prefix_sum_ptr,
        c,
        num_channels,
        forwards & col_live,
        NUM_NODES,
        BLOCK_NODES,
    )
    f_node = tl.zeros([], dtype=tl.int32)
    f_done = tl.zeros([], dtype=tl.int32)
    f_nvl_seen = tl.zeros([BLOCK_LOCAL], dtype=tl.int64) + tag
    f_nvl_used = tl.zeros([BLOCK_LOCAL], dtype=tl.int32)
    f_rdma_head = tl.zeros([BLOCK_NODES], dtype=tl.int64) + tag

    # Receiver: this rank's channel-c tokens.
    cr_begin, cr_end = channel_tokens(c, num_tokens, num_channels)
    cr_next = tl.where(sends, cr_begin, cr_end)
    cr_seen = tl.zeros([BLOCK_NODES], dtype=tl.int64) + tag

    f_left = tsum(f_count, axis=0)
    busy = (tsum((cs_stream < cs_total).to(tl.int32), axis=0) > 0) | (f_left > 0)
    busy = busy | (cr_next < cr_end)
    while busy & ok:
        progress = tl.zeros([], dtype=tl.int32)
        waiting = tl.full([], -1, tl.int32)
        if tsum((cs_stream < cs_total).to(tl.int32), axis=0) > 0:
            cs_sent, cs_stream, cs_head, moved, waited = _return_step(
                c,
                cs_sent,
                cs_stream,
                cs_head,
                cs_total,
                starts,
                counts,
                tag,
                my_nvl,
                peer_bases_ptr,
                rank,
                x_addr,
                topk_weights_addr,
                nvl_capacity,
                nvl_chunk,
                NUM_RANKS,
                RANKS_PER_NODE,
                ROW_BYTES,
                NUM_TOPK,
                HAS_WEIGHTS,
                SLOT_BYTES,
                OFF_WEIGHTS,
                NVL_DATA,
                NVL_TAILS,
                NVL_HEADS,
                NVL_RING,
                TILE,
                BLOCK_W,
                BLOCK_RANKS,
                BLOCK_LOCAL,
                BLOCK_TOPK,
                PREFETCH,
            )
            progress += moved
            waiting = tl.where(moved > 0, waiting, waited)
        if f_left > 0:
            f_node, f_done, f_nvl_seen, f_nvl_used, f_rdma_head, moved, waited = _reduce_step(
                c,
                f_node,
                f_done,
                f_count,
                f_rowbase,
                f_nvl_seen,
                f_nvl_used,
                f_rdma_head,
                tag,
                node_live,
                my_nvl,
                peer_bases_ptr,
                routes_ptr,
                rdma_base,
                rank,
                send_nvl_head_ptr,
                rdma_capacity,
                nvl_capacity,
                rdma_chunk,
                NUM_RANKS,
                RANKS_PER_NODE,
                HIDDEN,
                DTYPE,
                NUM_TOPK,
                HAS_WEIGHTS,
                SLOT_BYTES,
                OFF_WEIGHTS,
                NVL_DATA,
                RDMA_TAILS,
                RDMA_HEADS,
                RDMA_RING,
                RDMA_STAGING,
                NVL_TAILS,
                NVL_HEADS,
                NVL_RING,
                TILE,
                BLOCK_H,
                BLOCK_NODES,
                BLOCK_LOCAL,
                BLOCK_TOPK,
                TRANSPORT,
                FORCE_PUT,
                INTERPRETED,
                PUT_BLOCK,
            )
            progress += moved
            waiting = tl.where((waiting >= 0) | (moved > 0), waiting, waited)
            f_left = tsum(tl.where(nodes >= f_node, f_count, 0), axis=0) - f_done
        if cr_next < cr_end:
            cr_next, cr_seen, moved, waited = _receive_step(
                c,
                cr_next,
                cr_end,
                cr_seen,
                tag,
                col_live,
                routes_ptr,
                rdma_base,
                rank,
                send_rdma_head_ptr,
                bias0_ptr,
                bias1_ptr,
                out_ptr,
                out_weights_ptr,
                rdma_capacity,
                rdma_chunk,
                NUM_RANKS,
                RANKS_PER_NODE,
                HIDDEN,
                DTYPE,
                NUM_TOPK,
                HAS_WEIGHTS,
                HAS_BIAS0,
                HAS_BIAS1,
                SLOT_BYTES,
                OFF_WEIGHTS,
                RDMA_TAILS,
                RDMA_HEADS,
                RDMA_RING,
                TILE,
                BLOCK_H,
                BLOCK_NODES,
                BLOCK_TOPK,
                TRANSPORT,
                FORCE_PUT,
                INTERPRETED,
            )
            progress += moved
            waiting = tl.where((waiting >= 0) | (moved > 0), waiting, waited)
        busy = (tsum((cs_stream < cs_total).to(tl.int32), axis=0) > 0) | (f_left > 0)
        busy = busy | (cr_next < cr_end)
        if busy & (progress == 0):
            ok = idle(
                ok,
                stop,
                epoch,
                deadline,
                clock_addr,
                host + HOST_ERROR,
                ERR_TIMEOUT,
                rank,
                tl.maximum(waiting, 0),
                ranks,
                PHASE,
                c,
                tsum(cs_stream, axis=0) + f_done + (cr_next - cr_begin),
                tsum(cs_total, axis=0) + f_left + (cr_end - cr_begin),
                BLOCK_RANKS,
                USE_GLOBALTIMER,
            )
    quiet(TRANSPORT)  # every put of this program is complete before the kernel ends


_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class CombinePlan:
    """The combine launch of one call geometry on one Buffer.

    Fixed per plan: the call layout (`layout`: slot layout `[row | weights]`, ring capacities),
    chunks, hidden size and dtype, top-k width, which biases are given, role fusion and the program
    shape (`tile_words` bounds the `[tile, BLOCK_H]` fp32 accumulator).
    """

    def __init__(
        self,
        ctx,
        memory,
        layout,
        *,
        rdma_chunk: int,
        nvl_chunk: int,
        hidden: int,
        dtype: torch.dtype,
        num_topk: int,
        has_bias: tuple[bool, bool],
        fused: bool,
        num_warps: int,
        tile_words: int,
        prefetch: bool,
    ):
        signals, slot = layout.signals, layout.slot
        rdma_chunk = max(1, min(rdma_chunk, layout.rdma_capacity, MAX_TILE))
        nvl_chunk = max(1, min(nvl_chunk, layout.nvl_capacity, MAX_TILE))
        tile = pow2(max(rdma_chunk, nvl_chunk))
        self.num_channels = layout.num_channels
        self._grid = (layout.num_channels if fused else 2 * layout.num_channels,)
        self._has_weights = num_topk > 0
        self._rank_mask = ctx.rank_mask
        self._tail = (ctx.peer_bases, memory.rdma_routes, memory.rdma_base, ctx.rank)
        self._static = (
            layout.num_channels,
            layout.rdma_capacity,
            layout.nvl_capacity,
            rdma_chunk,
            nvl_chunk,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
        )
        row_words = hidden * dtype.itemsize // 4
        self._kernel = KernelLaunch(
            _combine_kernel,
            wrap=memory.device_wrapper,
            NUM_RANKS=ctx.num_ranks,
            RANKS_PER_NODE=signals.ranks_per_node,
            HIDDEN=hidden,
            DTYPE=_DTYPES[dtype],
            NUM_TOPK=num_topk,
            HAS_WEIGHTS=num_topk > 0,
            HAS_BIAS0=has_bias[0],
            HAS_BIAS1=has_bias[1],
            SLOT_BYTES=slot.num_bytes,
            OFF_WEIGHTS=slot.topk_weights,
            NVL_DATA=ctx.data_offset,
            RDMA_TAILS=signals.rdma_tails,
            RDMA_HEADS=signals.rdma_heads,
            RDMA_RING=layout.rdma_ring,
            RDMA_STAGING=layout.rdma_staging,
            NVL_TAILS=signals.nvl_tails,
            NVL_HEADS=signals.nvl_heads,
            NVL_RING=layout.nvl_ring,
            FUSED=fused,
            HOST_ERROR=protocol.HOST_ERROR,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=protocol.PHASE_COMBINE,
            TILE=tile,
            BLOCK_W=min(pow2(row_words), max(16, tile_words // tile)),
            BLOCK_H=min(pow2(hidden), max(16, tile_words // tile)),
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_NODES=pow2(signals.num_nodes),
            BLOCK_LOCAL=pow2(signals.ranks_per_node),
            BLOCK_TOPK=pow2(max(num_topk, 1)),
            TRANSPORT=memory.rdma_transport,
            FORCE_PUT=memory.rdma_force_put,
            USE_GLOBALTIMER=ctx.use_globaltimer,
            INTERPRETED=_env.interpret_enabled(),
            PREFETCH=prefetch,
            PUT_BLOCK=1024,
            num_warps=num_warps,
            launch_cooperative_grid=not fused,
        )

    def launch(
        self,
        stream,
        x,
        topk_weights,
        bias0,
        bias1,
        recv_rdma_channel_prefix_matrix,
        recv_rdma_rank_prefix_sum,
        recv_gbl_channel_prefix_matrix,
        recv_gbl_rank_prefix_sum,
        send_rdma_head,
        send_nvl_head,
        out,
        out_weights,
    ) -> None:
        """The data kernel on `stream`; `out [N, H]` / `out_weights [N, K]` are filled."""
        self._kernel.launch(
            self._grid,
            stream,
            x.data_ptr(),
            topk_weights.data_ptr() if self._has_weights else 0,
            bias0 if bias0 is not None else out,
            bias1 if bias1 is not None else out,
            out,
            out_weights if self._has_weights else out,
            self._rank_mask,
            recv_rdma_channel_prefix_matrix,
            recv_rdma_rank_prefix_sum,
            recv_gbl_channel_prefix_matrix,
            recv_gbl_rank_prefix_sum,
            send_rdma_head,
            send_nvl_head,
            *self._tail,
            out.shape[0],
            *self._static,
        )
