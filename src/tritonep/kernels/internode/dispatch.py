"""Internode dispatch: every token crosses to each destination node once, then fans out over NVLink.

Problem: rank s = (n_s, l) holds `x [N, H]`; rank r = (n, l') must receive the rows with
`is_token_in_rank[t, r]`, ordered by source rank, then token (reference §14.1), with top-k ids
rebased to r's local experts (-1 elsewhere, weight 0) and FP8 scales; a token bound for several
ranks of one node crosses between nodes once.

Algorithm (one persistent launch; channel c = a contiguous token range of each rank, reference §12):
* RDMA sender (rank s, channel c): walks its channel's tokens in chunks. A token goes to node n if
  it goes to any rank of n; it is written once per such node into slot `position % capacity` of
  ring (c, n_s) of rank (n, l) -- the forwarder: the rank of node n with s's local index -- with
  its top-k ids (global), weights, scales, and per rank of node n the token's position in the
  (s, c) stream to that rank (-1 if it does not go there). Another node's ring is reached through
  the device layer (staged in this rank's RDMA memory, then put); the chunk is published with a
  tail signal ordered after the data.
* forwarder (rank (n, l), channel c): takes whatever has arrived from any column peer (n', l),
  copies each token into ring (c, l) of every rank of node n that receives it (NVLink stores),
  publishes tails there and hands the RDMA slots back to the source (head signal). Non-cached, it
  records `send_nvl_head`: the index of each token in the combine stream of each local rank.
* NVL receiver (rank r, channel c): takes whatever has arrived from any forwarder of its node and
  copies it to output row `recv_gbl_channel_prefix_matrix[src][c] + position`, rebasing the top-k
  ids; non-cached, it writes `recv_src_meta`.

No role ever blocks on one peer while another could move: every step takes what is available and
room is only awaited by retrying. So any ring of at least one chunk makes progress (sender: the
forwarder drains its ring; forwarder: the receivers drain theirs; receivers: only wait for data).

Programs: on the GPU `2C` programs (`FUSED=False`): program c is the RDMA sender and the NVL
receiver of channel c (one polling loop), program C + c its forwarder; all resident (cooperative
launch). In the interpreter (`FUSED=True`), which runs a launch's programs one after another,
program c runs all three roles of channel c in one polling loop: channels never interact, and
every rank runs its program c at the same time, so rings of any size work on the CPU too (tests
use rings of two slots).

Sync protocol: data, then a signal ordered after it (device layer across nodes, barrier + release
at system scope over NVLink); consumers acquire signals. Every wait ends at the call's deadline with
an error record naming the peer and channel (see `rings.idle`).

Example:
    2 nodes x 2 ranks; rank 0's token t goes to ranks 2 and 3 (both on node 1)
    -> one copy of t crosses to rank 2 (rank 0's local index), which stores it into ranks 2 and 3.
"""

import triton.language as tl

from ... import protocol
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from . import regions
from .rings import (
    channel_roles,
    channel_tokens,
    column,
    copy_rows,
    cumsum_rows,
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
    signal_peer,
    targmax,
    tcumsum,
    tmax,
    tmin,
    tsum,
)

_HEADER = tl.constexpr(regions.HEADER_BYTES)
MAX_TILE = 64  # rows per step of any role; prefix sums in a step are [TILE, TILE, lanes] reductions


@helper
def _send_step(
    c,
    s_next,
    s_end,
    s_sent_r,
    s_sent_n,
    s_head,
    tag,
    x_addr,
    x_row_stride,
    scales_ptr,
    scales_stride_row,
    scales_stride_col,
    topk_idx_ptr,
    topk_weights_ptr,
    is_token_in_rank_ptr,
    send_rdma_head_ptr,
    rank_mask_ptr,
    routes_ptr,
    rdma_base,
    rank,
    chunk,
    capacity,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    X_WORDS: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    TOPK_IDX_TY: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_SCALES: tl.constexpr,
    OFF_TOPK: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    OFF_META: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_RING: tl.constexpr,
    RDMA_STAGING: tl.constexpr,
    WRITE_HANDLE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    """One chunk of the RDMA sender, if every destination node's ring has room for it.

    Returns (s_next, s_sent_r, s_sent_n, s_head, moved, node waited for or -1)."""
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    node = rank // D
    local = rank % D
    ranks = tl.arange(0, BLOCK_RANKS)
    nodes = tl.arange(0, BLOCK_NODES)
    node_ok = nodes < NUM_NODES
    locs = tl.arange(0, BLOCK_LOCAL)
    loc_ok = locs < D
    i = tl.arange(0, TILE)
    rows = s_next + i
    valid = (i < chunk) & (rows < s_end)
    rows64 = rows.to(tl.int64)
    # A token goes to node n if it goes to a live rank of n whose forwarder is live here.
    fwd_live = node_ok & (tl.load(rank_mask_ptr + nodes * D + local, mask=node_ok, other=1) == 0)
    hits = tl.zeros([TILE, BLOCK_NODES], dtype=tl.int32)
    for l2 in range(D):
        j = nodes * D + l2
        j_live = fwd_live & (tl.load(rank_mask_ptr + j, mask=node_ok, other=1) == 0)
        hit = tl.load(
            is_token_in_rank_ptr + rows64[:, None] * NUM_RANKS + j[None, :],
            mask=valid[:, None] & j_live[None, :],
            other=0,
        ).to(tl.int32)
        hits = tl.maximum(hits, hit)
    count_n = tsum(hits, axis=0)
    new_sent_n = s_sent_n + count_n
    # Room for the whole chunk in every destination ring (heads carry the epoch).
    need = tag + tl.maximum(new_sent_n - capacity, 0).to(tl.int64)
    short = (count_n > 0) & (s_head < need)
    if tsum(short.to(tl.int32), axis=0) > 0:
        heads = (rdma_base + RDMA_HEADS + (c * NUM_NODES + nodes) * 8).to(tl.pointer_type(tl.int64))
        s_head = poll(heads, s_head, short)
        short = (count_n > 0) & (s_head < need)
    blocked = tsum(short.to(tl.int32), axis=0) > 0
    wait_node = tmin(tl.where(short, nodes, BLOCK_NODES), axis=0)
    moved = tl.zeros([], dtype=tl.int32)
    if not blocked:
        tl.debug_barrier()  # slots are overwritten only after the acquired heads freed them
        if WRITE_HANDLE:
            # -1 for every node first; each destination node's positions are stored below.
            tl.store(
                send_rdma_head_ptr + rows64[:, None] * NUM_NODES + nodes[None, :],
                -1,
                mask=valid[:, None] & node_ok[None, :] & (hits == 0),
            )
        src_x = x_addr + rows64 * x_row_stride * 4
        ks = tl.arange(0, BLOCK_TOPK)
        ss = tl.arange(0, BLOCK_SCALES)
        if HAS_TOPK:
            mk = valid[:, None] & (ks[None, :] < NUM_TOPK)
            idx = tl.load(topk_idx_ptr + rows64[:, None] * NUM_TOPK + ks[None, :], mask=mk)
            weights = tl.load(topk_weights_ptr + rows64[:, None] * NUM_TOPK + ks[None, :], mask=mk)
        if HAS_SCALES:
            scales = tl.load(
                scales_ptr + rows64[:, None] * scales_stride_row + ss[None, :] * scales_stride_col,
                mask=valid[:, None] & (ss[None, :] < NUM_SCALES),
            )
        peers = tl.where(node_ok, nodes * D + local, rank)
        pe, delta, direct = open_peer(routes_ptr, rank, peers, TRANSPORT, FORCE_PUT)
        direct_i = direct.to(tl.int32)
        # The destination ring of this rank's node on every forwarder (local symmetric address).
        ring = rdma_base + RDMA_RING + ((c * NUM_NODES + node) * capacity).to(tl.int64) * SLOT_BYTES
        for n in range(NUM_NODES):
            cnt = lane(count_n, nodes, n)
            if cnt > 0:
                first = lane(s_sent_n, nodes, n)
                n_pe = lane(pe, nodes, n)
                n_delta = lane(delta, nodes, n)
                n_direct = lane(direct_i, nodes, n) > 0
                hit_n = column(hits, nodes, n)
                to_n = hit_n > 0
                # Ring positions of this chunk's tokens for node n: an exclusive scan (1-D: the
                # [TILE, TILE, R_n] masked reduction would not fit registers at 20 nodes).
                pos = first + tcumsum(hit_n, axis=0) - hit_n
                if WRITE_HANDLE:
                    tl.store(send_rdma_head_ptr + rows64 * NUM_NODES + n, pos, mask=to_n)
                q = (pos % capacity).to(tl.int64)
                stage = (
                    rdma_base
                    + RDMA_STAGING
                    + ((c * NUM_NODES + n) * capacity).to(tl.int64) * SLOT_BYTES
                )
                # Straight into the forwarder's ring when stores reach it, else into staging.
                slots = tl.where(n_direct, ring + n_delta, stage) + q * SLOT_BYTES
                copy_rows(src_x, slots, to_n, X_WORDS, BLOCK_W, "", PREFETCH)
                if HAS_SCALES:
                    tl.store(
                        (slots + OFF_SCALES).to(tl.pointer_type(tl.int32))[:, None] + ss[None, :],
                        scales,
                        mask=to_n[:, None] & (ss[None, :] < NUM_SCALES),
                    )
                if HAS_TOPK:
                    mk = to_n[:, None] & (ks[None, :] < NUM_TOPK)
                    tl.store(
                        (slots + OFF_TOPK).to(tl.pointer_type(TOPK_IDX_TY))[:, None] + ks[None, :],
                        idx,
                        mask=mk,
                    )
                    tl.store(
                        (slots + OFF_WEIGHTS).to(tl.pointer_type(tl.float32))[:, None]
                        + ks[None, :],
                        weights,
                        mask=mk,
                    )
                # Meta: position of the token in the (this rank, c) stream to each rank of node n.
                j = n * D + locs
                j_live = (
                    loc_ok
                    & (lane(fwd_live.to(tl.int32), nodes, n) > 0)
                    & (tl.load(rank_mask_ptr + j, mask=loc_ok, other=1) == 0)
                )
                j_flags = tl.load(
                    is_token_in_rank_ptr + rows64[:, None] * NUM_RANKS + j[None, :],
                    mask=valid[:, None] & j_live[None, :],
                    other=0,
                ).to(tl.int32)
                in_node = ranks[None, :] == j[:, None]  # [d, R]: rank j = (n, l) of lane l
                j_sent = tsum(tl.where(in_node, s_sent_r[None, :], 0), axis=1)
                j_pos = j_sent[None, :] + cumsum_rows(j_flags, TILE, False)
                # This node's ranks' streams advance by the chunk's tokens for them.
                s_sent_r += tsum(tl.where(in_node, tsum(j_flags, axis=0)[:, None], 0), axis=0)
                tl.store(
                    (slots + OFF_META).to(tl.pointer_type(tl.int32))[:, None] + locs[None, :],
                    tl.where(j_flags > 0, j_pos, -1),
                    mask=to_n[:, None] & loc_ok[None, :],
                )
                publish_slots(
                    ring,
                    stage,
                    rdma_base + RDMA_TAILS + (c * NUM_NODES + node) * 8,
                    first,
                    cnt,
                    capacity,
                    tag,
                    n_pe,
                    n_delta,
                    n_direct,
                    SLOT_BYTES,
                    TRANSPORT,
                    PUT_BLOCK,
                )
        s_sent_n = new_sent_n
        s_next = s_next + tl.minimum(chunk, s_end - s_next)
        moved += 1
    return s_next, s_sent_r, s_sent_n, s_head, moved, tl.where(blocked, wait_node, -1)


@helper
def _forward_step(
    c,
    f_consumed,
    f_expected,
    f_rowbase,
    f_sent,
    f_head,
    combine_base,
    tag,
    node_live,
    my_nvl,
    peer_bases_ptr,
    routes_ptr,
    rdma_base,
    rank,
    send_nvl_head_ptr,
    num_nvl_head_rows,
    rdma_capacity,
    nvl_capacity,
    chunk,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_META: tl.constexpr,
    NVL_DATA: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_RING: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    WRITE_HANDLE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Forward one batch of arrived tokens from one column peer to the ranks of this node.

    Returns (f_consumed, f_sent, f_head, moved)."""
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
    node = rank // D
    local = rank % D
    nodes = tl.arange(0, BLOCK_NODES)
    locs = tl.arange(0, BLOCK_LOCAL)
    loc_ok = locs < D
    i = tl.arange(0, TILE)
    moved = tl.zeros([], dtype=tl.int32)
    pending = f_consumed < f_expected
    tails = (rdma_base + RDMA_TAILS + (c * NUM_NODES + nodes) * 8).to(tl.pointer_type(tl.int64))
    seen = tl.atomic_add(tails, 0, mask=pending, sem="acquire", scope="sys")  # the data behind it
    avail = tl.where(pending & (seen >= tag), (seen - tag).to(tl.int32) - f_consumed, 0)
    if tmax(avail, axis=0) > 0:
        tl.debug_barrier()  # every thread reads the slots after the acquiring thread's load
        src = targmax(avail, axis=0)
        k = tl.minimum(lane(avail, nodes, src), chunk)
        start = lane(f_consumed, nodes, src)
        in_chunk = i < k
        slots = (
            rdma_base
            + RDMA_RING
            + ((c * NUM_NODES + src) * rdma_capacity + (start + i) % rdma_capacity).to(tl.int64)
            * SLOT_BYTES
        )
        pos = tl.load(
            (slots + OFF_META).to(tl.pointer_type(tl.int32))[:, None] + locs[None, :],
            mask=in_chunk[:, None] & loc_ok[None, :],
            other=-1,
            cache_modifier=".cg",
        )
        dest = (pos >= 0) & node_live[None, :]
        dest_i = dest.to(tl.int32)
        cnt_l = tsum(dest_i, axis=0)
        need = tag + tl.maximum(f_sent + cnt_l - nvl_capacity, 0).to(tl.int64)
        short = (cnt_l > 0) & (f_head < need)
        if tsum(short.to(tl.int32), axis=0) > 0:
            heads = (my_nvl + NVL_HEADS + (c * D + locs) * 8).to(tl.pointer_type(tl.int64))
            f_head = poll(heads, f_head, short)
            short = (cnt_l > 0) & (f_head < need)
        if tsum(short.to(tl.int32), axis=0) == 0:
            tl.debug_barrier()  # NVL slots are overwritten only after the acquired heads
            npos = f_sent[None, :] + cumsum_rows(dest_i, TILE, False)
            bits = tsum(tl.where(dest, 1 << locs[None, :], 0), axis=1)
            for l2 in range(D):
                cl = lane(cnt_l, locs, l2)
                if cl > 0:
                    to_l = column(dest_i, locs, l2) > 0
                    q = (column(npos, locs, l2) % nvl_capacity).to(tl.int64)
                    peer_nvl = tl.load(peer_bases_ptr + node * D + l2) + NVL_DATA
                    dst = (
                        peer_nvl
                        + NVL_RING
                        + ((c * D + local) * nvl_capacity).to(tl.int64) * SLOT_BYTES
                        + q * SLOT_BYTES
                    )
                    # Row, scales, top-k ids and weights as they came; then the NVL meta.
                    copy_rows(slots, dst, to_l, OFF_META // 4, BLOCK_W, ".cg", PREFETCH)
                    meta = (dst + OFF_META).to(tl.pointer_type(tl.int32))
                    tl.store(meta, column(pos, locs, l2), mask=to_l)
                    tl.store(meta + 1, src + i * 0, mask=to_l)
                    tl.store(meta + 2, bits, mask=to_l)
                    tl.debug_barrier()  # every thread's rows before the tail
                    tail = (peer_nvl + NVL_TAILS + (c * D + local) * 8).to(
                        tl.pointer_type(tl.int64)
                    )
                    # Publishes the rows stored above.
                    tl.atomic_xchg(
                        tail,
                        tag + (lane(f_sent, locs, l2) + cl).to(tl.int64),
                        sem="release",
                        scope="sys",
                    )
            if WRITE_HANDLE:
                row = (lane(f_rowbase, nodes, src) + start + i).to(tl.int64)
                base = tsum(tl.where(nodes[:, None] == src, combine_base, 0), axis=0)
                tl.store(
                    send_nvl_head_ptr + row[:, None] * D + locs[None, :],
                    tl.where(dest, base[None, :] + pos, -1),
                    mask=(in_chunk & (row < num_nvl_head_rows))[:, None] & loc_ok[None, :],
                )
            f_sent += cnt_l
            f_consumed = tl.where(nodes == src, f_consumed + k, f_consumed)
            # Hand the slots back to the source (after every thread read them).
            signal_peer(
                routes_ptr,
                rank,
                src * D + local,
                rdma_base + RDMA_HEADS + (c * NUM_NODES + node) * 8,
                tag + (start + k).to(tl.int64),
                TRANSPORT,
                FORCE_PUT,
            )
            moved += 1
    return f_consumed, f_sent, f_head, moved


@helper
def _receive_step(
    c,
    r_consumed,
    r_expected,
    tag,
    my_nvl,
    peer_bases_ptr,
    rank,
    num_channels,
    experts_per_rank,
    recv_gbl_channel_prefix_ptr,
    recv_x_addr,
    recv_scales_addr,
    recv_topk_idx_addr,
    recv_topk_weights_addr,
    recv_src_meta_ptr,
    num_recv_rows,
    nvl_capacity,
    RANKS_PER_NODE: tl.constexpr,
    X_WORDS: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    TOPK_IDX_TY: tl.constexpr,
    TOPK_BYTES: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_SCALES: tl.constexpr,
    OFF_TOPK: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    OFF_META: tl.constexpr,
    NVL_DATA: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    WRITE_HANDLE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Copy one batch of arrived rows from one forwarder of this node into the outputs.

    Returns (r_consumed, moved)."""
    D: tl.constexpr = RANKS_PER_NODE
    node = rank // D
    local = rank % D
    locs = tl.arange(0, BLOCK_LOCAL)
    i = tl.arange(0, TILE)
    moved = tl.zeros([], dtype=tl.int32)
    pending = r_consumed < r_expected
    tails = (my_nvl + NVL_TAILS + (c * D + locs) * 8).to(tl.pointer_type(tl.int64))
    seen = tl.atomic_add(tails, 0, mask=pending, sem="acquire", scope="sys")  # the data behind it
    avail = tl.where(pending & (seen >= tag), (seen - tag).to(tl.int32) - r_consumed, 0)
    if tmax(avail, axis=0) > 0:
        tl.debug_barrier()  # every thread reads the slots after the acquiring thread's load
        src_l = targmax(avail, axis=0)
        k = tl.minimum(lane(avail, locs, src_l), TILE)
        start = lane(r_consumed, locs, src_l)
        in_chunk = i < k
        slots = (
            my_nvl
            + NVL_RING
            + ((c * D + src_l) * nvl_capacity + (start + i) % nvl_capacity).to(tl.int64)
            * SLOT_BYTES
        )
        meta = (slots + OFF_META).to(tl.pointer_type(tl.int32))
        pos = tl.load(meta, mask=in_chunk, other=0, cache_modifier=".cg")
        src_node = tl.load(meta + 1, mask=in_chunk, other=0, cache_modifier=".cg")
        bits = tl.load(meta + 2, mask=in_chunk, other=0, cache_modifier=".cg")
        src_rank = src_node * D + src_l
        out_row = (
            tl.load(
                recv_gbl_channel_prefix_ptr + src_rank * num_channels + c, mask=in_chunk, other=0
            )
            + pos
        )
        keep = in_chunk & (out_row < num_recv_rows)  # beyond: a worst-case overflow, reported
        out_row = out_row.to(tl.int64)
        copy_rows(
            slots, recv_x_addr + out_row * (X_WORDS * 4), keep, X_WORDS, BLOCK_W, ".cg", PREFETCH
        )
        if HAS_SCALES:
            ss = tl.arange(0, BLOCK_SCALES)
            ms = keep[:, None] & (ss[None, :] < NUM_SCALES)
            values = tl.load(
                (slots + OFF_SCALES).to(tl.pointer_type(tl.int32))[:, None] + ss[None, :],
                mask=ms,
                cache_modifier=".cg",
            )
            tl.store(
                (recv_scales_addr + out_row * (NUM_SCALES * 4)).to(tl.pointer_type(tl.int32))[
                    :, None
                ]
                + ss[None, :],
                values,
                mask=ms,
            )
        if HAS_TOPK:
            ks = tl.arange(0, BLOCK_TOPK)
            mk = keep[:, None] & (ks[None, :] < NUM_TOPK)
            idx = tl.load(
                (slots + OFF_TOPK).to(tl.pointer_type(TOPK_IDX_TY))[:, None] + ks[None, :],
                mask=mk,
                other=-1,
                cache_modifier=".cg",
            )
            weights = tl.load(
                (slots + OFF_WEIGHTS).to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
                mask=mk,
                other=0.0,
                cache_modifier=".cg",
            )
            local_id = idx - rank * experts_per_rank
            mine = (idx >= 0) & (local_id >= 0) & (local_id < experts_per_rank)
            tl.store(
                (recv_topk_idx_addr + out_row * TOPK_BYTES).to(tl.pointer_type(TOPK_IDX_TY))[
                    :, None
                ]
                + ks[None, :],
                tl.where(mine, local_id, -1),
                mask=mk,
            )
            tl.store(
                (recv_topk_weights_addr + out_row * (NUM_TOPK * 4)).to(tl.pointer_type(tl.float32))[
                    :, None
                ]
                + ks[None, :],
                tl.where(mine, weights, 0.0),
                mask=mk,
            )
        if WRITE_HANDLE:
            tl.store(recv_src_meta_ptr + out_row * 2, src_node, mask=keep)
            tl.store(recv_src_meta_ptr + out_row * 2 + 1, bits, mask=keep)
        r_consumed = tl.where(locs == src_l, r_consumed + k, r_consumed)
        tl.debug_barrier()  # every thread read its slots before they go back
        head = tl.load(peer_bases_ptr + node * D + src_l) + NVL_DATA + NVL_HEADS
        head += (c * D + local) * 8
        # Publishes nothing but consumption: the forwarder may overwrite the slots.
        tl.atomic_xchg(
            head.to(tl.pointer_type(tl.int64)),
            tag + (start + k).to(tl.int64),
            sem="release",
            scope="sys",
        )
        moved += 1
    return r_consumed, moved


@named_kernel(
    "internode",
    "dispatch",
    do_not_specialize=[
        "x_row_stride",
        "scales_stride_row",
        "scales_stride_col",
        "num_recv_rows",
        "num_nvl_head_rows",
        "rdma_base",
        "rank",
        "num_tokens",
    ],
)
def _dispatch_kernel(
    x_addr,
    x_row_stride,
    scales_ptr,
    scales_stride_row,
    scales_stride_col,
    topk_idx_ptr,
    topk_weights_ptr,
    is_token_in_rank_ptr,
    rank_mask_ptr,
    recv_rdma_channel_prefix_ptr,
    recv_rdma_rank_prefix_sum_ptr,
    recv_gbl_channel_prefix_ptr,
    recv_gbl_rank_prefix_sum_ptr,
    send_rdma_head_ptr,
    send_nvl_head_ptr,
    recv_src_meta_ptr,
    recv_x_addr,
    recv_scales_addr,
    recv_topk_idx_addr,
    recv_topk_weights_addr,
    num_recv_rows,
    num_nvl_head_rows,
    peer_bases_ptr,
    routes_ptr,
    rdma_base,
    rank,
    num_tokens,
    num_channels,
    experts_per_rank,
    rdma_capacity,
    nvl_capacity,
    rdma_chunk,
    nvl_chunk,
    host_addr,
    clock_addr,
    timeout_ns,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    X_WORDS: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    TOPK_IDX_TY: tl.constexpr,
    TOPK_BYTES: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    OFF_SCALES: tl.constexpr,
    OFF_TOPK: tl.constexpr,
    OFF_WEIGHTS: tl.constexpr,
    OFF_META: tl.constexpr,
    NVL_DATA: tl.constexpr,
    RDMA_TAILS: tl.constexpr,
    RDMA_HEADS: tl.constexpr,
    RDMA_INBOX: tl.constexpr,
    RDMA_MSG_BYTES: tl.constexpr,
    RDMA_RING: tl.constexpr,
    RDMA_STAGING: tl.constexpr,
    NVL_TAILS: tl.constexpr,
    NVL_HEADS: tl.constexpr,
    NVL_RING: tl.constexpr,
    WRITE_HANDLE: tl.constexpr,
    WORST: tl.constexpr,
    FUSED: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PREFETCH: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    D: tl.constexpr = RANKS_PER_NODE
    NUM_NODES: tl.constexpr = NUM_RANKS // RANKS_PER_NODE
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
    node, local, nodes, locs, node_live, col_live = peer_lanes(
        rank, rank_mask_ptr, NUM_RANKS, RANKS_PER_NODE, BLOCK_NODES, BLOCK_LOCAL
    )
    rank_ok = ranks < NUM_RANKS
    loc_ok = locs < D
    i = tl.arange(0, TILE)
    my_nvl = my_base + NVL_DATA
    # sends: the RDMA sender and NVL receiver of channel c; forwards: its forwarder.
    c, sends, forwards = channel_roles(num_channels, FUSED)

    # RDMA sender: this rank's channel-c tokens.
    s_begin, s_end = channel_tokens(c, num_tokens, num_channels)
    s_next = tl.where(sends, s_begin, s_end)
    s_sent_r = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
    s_sent_n = tl.zeros([BLOCK_NODES], dtype=tl.int32)
    s_head = tl.zeros([BLOCK_NODES], dtype=tl.int64) + tag
    s_wait = tl.full([], -1, tl.int32)

    # NVL receiver: rows of (source j, channel c), summed per forwarder l' = j % d.
    starts, ends = received_rows(
        recv_gbl_channel_prefix_ptr,
        recv_gbl_rank_prefix_sum_ptr,
        c,
        num_channels,
        NUM_RANKS,
        BLOCK_RANKS,
    )
    per_source = tl.where(rank_ok, ends - starts, 0)
    r_expected = tsum(tl.where((ranks[None, :] % D) == locs[:, None], per_source[None, :], 0), 1)
    r_expected = tl.where(sends & node_live, r_expected, 0)
    r_consumed = tl.zeros([BLOCK_LOCAL], dtype=tl.int32)

    # Forwarder: tokens of (column peer (n', l), channel c), and where they sit in send_nvl_head.
    f_expected, f_rowbase = forwarded_tokens(
        recv_rdma_channel_prefix_ptr,
        recv_rdma_rank_prefix_sum_ptr,
        c,
        num_channels,
        forwards & col_live,
        NUM_NODES,
        BLOCK_NODES,
    )
    f_consumed = tl.zeros([BLOCK_NODES], dtype=tl.int32)
    f_sent = tl.zeros([BLOCK_LOCAL], dtype=tl.int32)
    f_head = tl.zeros([BLOCK_LOCAL], dtype=tl.int64) + tag
    combine_base = tl.zeros([BLOCK_NODES, BLOCK_LOCAL], dtype=tl.int32)
    if WRITE_HANDLE:
        # Local rank l' returns combine rows to this forwarder source by source (n' ascending), so
        # a token's index in that stream is its position plus the rows l' got from column peers
        # of lower nodes in channel c (their notify messages, still in this rank's inbox).
        chan_prev = tl.maximum(c - 1, 0)
        rows_of = rdma_base + RDMA_INBOX + nodes * RDMA_MSG_BYTES + _HEADER + 4 * num_channels
        m2 = col_live[:, None] & loc_ok[None, :]
        cur = tl.load(
            (rows_of[:, None] + 4 * (locs[None, :] * num_channels + c)).to(
                tl.pointer_type(tl.int32)
            ),
            mask=m2,
            other=0,
        )
        prev = tl.load(
            (rows_of[:, None] + 4 * (locs[None, :] * num_channels + chan_prev)).to(
                tl.pointer_type(tl.int32)
            ),
            mask=m2 & (c > 0),
            other=0,
        )
        combine_base = cumsum_rows(cur - prev, BLOCK_NODES, False)

    if WORST:
        # Padding rows of a worst-case dispatch: top-k -1, weight 0, no source; send_nvl_head -1.
        num_recv = tl.load(recv_gbl_rank_prefix_sum_ptr + NUM_RANKS - 1)
        pad = tl.cdiv(tl.maximum(num_recv_rows - num_recv, 0), num_channels)
        pad_begin = num_recv + c * pad
        pad_end = tl.minimum(pad_begin + pad, num_recv_rows)
        if sends:
            for r0 in range(pad_begin, pad_end, TILE):
                prow = (r0 + i).to(tl.int64)
                pmask = prow < pad_end
                tl.store(recv_src_meta_ptr + prow * 2, -1, mask=pmask)
                tl.store(recv_src_meta_ptr + prow * 2 + 1, 0, mask=pmask)
                if HAS_TOPK:
                    ks = tl.arange(0, BLOCK_TOPK)
                    mk = pmask[:, None] & (ks[None, :] < NUM_TOPK)
                    tl.store(
                        (recv_topk_idx_addr + prow * TOPK_BYTES).to(tl.pointer_type(TOPK_IDX_TY))[
                            :, None
                        ]
                        + ks[None, :],
                        -1,
                        mask=mk,
                    )
                    tl.store(
                        (recv_topk_weights_addr + prow * (NUM_TOPK * 4)).to(
                            tl.pointer_type(tl.float32)
                        )[:, None]
                        + ks[None, :],
                        0.0,
                        mask=mk,
                    )
        num_rdma = tl.load(recv_rdma_rank_prefix_sum_ptr + NUM_NODES - 1)
        pad = tl.cdiv(tl.maximum(num_nvl_head_rows - num_rdma, 0), num_channels)
        pad_begin = num_rdma + c * pad
        pad_end = tl.minimum(pad_begin + pad, num_nvl_head_rows)
        if forwards:
            for r0 in range(pad_begin, pad_end, TILE):
                prow = (r0 + i).to(tl.int64)
                tl.store(
                    send_nvl_head_ptr + prow[:, None] * D + locs[None, :],
                    -1,
                    mask=(prow < pad_end)[:, None] & loc_ok[None, :],
                )

    busy = (
        (s_next < s_end)
        | (tsum((f_consumed < f_expected).to(tl.int32), axis=0) > 0)
        | (tsum((r_consumed < r_expected).to(tl.int32), axis=0) > 0)
    )
    while busy & ok:
        progress = tl.zeros([], dtype=tl.int32)
        if tsum((r_consumed < r_expected).to(tl.int32), axis=0) > 0:
            r_consumed, moved = _receive_step(
                c,
                r_consumed,
                r_expected,
                tag,
                my_nvl,
                peer_bases_ptr,
                rank,
                num_channels,
                experts_per_rank,
                recv_gbl_channel_prefix_ptr,
                recv_x_addr,
                recv_scales_addr,
                recv_topk_idx_addr,
                recv_topk_weights_addr,
                recv_src_meta_ptr,
                num_recv_rows,
                nvl_capacity,
                RANKS_PER_NODE,
                X_WORDS,
                NUM_TOPK,
                NUM_SCALES,
                HAS_TOPK,
                HAS_SCALES,
                TOPK_IDX_TY,
                TOPK_BYTES,
                SLOT_BYTES,
                OFF_SCALES,
                OFF_TOPK,
                OFF_WEIGHTS,
                OFF_META,
                NVL_DATA,
                NVL_TAILS,
                NVL_HEADS,
                NVL_RING,
                WRITE_HANDLE,
                TILE,
                BLOCK_W,
                BLOCK_LOCAL,
                BLOCK_TOPK,
                BLOCK_SCALES,
                PREFETCH,
            )
            progress += moved
        if tsum((f_consumed < f_expected).to(tl.int32), axis=0) > 0:
            f_consumed, f_sent, f_head, moved = _forward_step(
                c,
                f_consumed,
                f_expected,
                f_rowbase,
                f_sent,
                f_head,
                combine_base,
                tag,
                node_live,
                my_nvl,
                peer_bases_ptr,
                routes_ptr,
                rdma_base,
                rank,
                send_nvl_head_ptr,
                num_nvl_head_rows,
                rdma_capacity,
                nvl_capacity,
                nvl_chunk,
                NUM_RANKS,
                RANKS_PER_NODE,
                SLOT_BYTES,
                OFF_META,
                NVL_DATA,
                RDMA_TAILS,
                RDMA_HEADS,
                RDMA_RING,
                NVL_TAILS,
                NVL_HEADS,
                NVL_RING,
                WRITE_HANDLE,
                TILE,
                BLOCK_W,
                BLOCK_NODES,
                BLOCK_LOCAL,
                TRANSPORT,
                FORCE_PUT,
                PREFETCH,
            )
            progress += moved
        if s_next < s_end:
            s_next, s_sent_r, s_sent_n, s_head, moved, s_wait = _send_step(
                c,
                s_next,
                s_end,
                s_sent_r,
                s_sent_n,
                s_head,
                tag,
                x_addr,
                x_row_stride,
                scales_ptr,
                scales_stride_row,
                scales_stride_col,
                topk_idx_ptr,
                topk_weights_ptr,
                is_token_in_rank_ptr,
                send_rdma_head_ptr,
                rank_mask_ptr,
                routes_ptr,
                rdma_base,
                rank,
                rdma_chunk,
                rdma_capacity,
                NUM_RANKS,
                RANKS_PER_NODE,
                X_WORDS,
                NUM_TOPK,
                NUM_SCALES,
                HAS_TOPK,
                HAS_SCALES,
                TOPK_IDX_TY,
                SLOT_BYTES,
                OFF_SCALES,
                OFF_TOPK,
                OFF_WEIGHTS,
                OFF_META,
                RDMA_TAILS,
                RDMA_HEADS,
                RDMA_RING,
                RDMA_STAGING,
                WRITE_HANDLE,
                TILE,
                BLOCK_W,
                BLOCK_RANKS,
                BLOCK_NODES,
                BLOCK_LOCAL,
                BLOCK_TOPK,
                BLOCK_SCALES,
                TRANSPORT,
                FORCE_PUT,
                PREFETCH,
                PUT_BLOCK,
            )
            progress += moved
        r_pending = r_consumed < r_expected
        f_pending = f_consumed < f_expected
        busy = (
            (s_next < s_end)
            | (tsum(r_pending.to(tl.int32), axis=0) > 0)
            | (tsum(f_pending.to(tl.int32), axis=0) > 0)
        )
        if busy & (progress == 0):
            # Name what this program waits for: rows from a forwarder of this node, tokens from
            # a column peer, or room in a forwarder's ring.
            if tsum(r_pending.to(tl.int32), axis=0) > 0:
                first = tmin(tl.where(r_pending, locs, BLOCK_LOCAL), axis=0)
                peer = node * D + first
                observed = lane(r_consumed, locs, first)
                expected = lane(r_expected, locs, first)
            elif tsum(f_pending.to(tl.int32), axis=0) > 0:
                first = tmin(tl.where(f_pending, nodes, BLOCK_NODES), axis=0)
                peer = first * D + local
                observed = lane(f_consumed, nodes, first)
                expected = lane(f_expected, nodes, first)
            else:
                peer = tl.maximum(s_wait, 0) * D + local
                observed = s_next - s_begin
                expected = s_end - s_begin
            ok = idle(
                ok,
                stop,
                epoch,
                deadline,
                clock_addr,
                host + HOST_ERROR,
                ERR_TIMEOUT,
                rank,
                peer,
                ranks,
                PHASE,
                c,
                observed,
                expected,
                BLOCK_RANKS,
                USE_GLOBALTIMER,
            )
    quiet(TRANSPORT)  # every put of this program is complete before the kernel ends


class DispatchPlan:
    """The dispatch launch of one call geometry on one Buffer.

    Fixed per plan: the call layout (`layout`, a `regions.CallLayout`: slot layout, ring
    capacities), channels, chunks, local experts, top-k width and id dtype, scale columns, whether
    handle entries are written (non-cached) and padded (worst case), whether roles are fused into
    one program per channel (the interpreter) and the program shape.
    """

    def __init__(
        self,
        ctx,
        memory,
        layout,
        *,
        rdma_chunk: int,
        nvl_chunk: int,
        experts_per_rank: int,
        num_topk: int,
        topk_itemsize: int,
        num_scales: int,
        write_handle: bool,
        worst: bool,
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
        self._num_topk = num_topk
        self._write_handle = write_handle
        self._tail = (
            ctx.peer_bases,
            memory.rdma_routes,
            memory.rdma_base,
            ctx.rank,
        )
        self._static = (
            layout.num_channels,
            experts_per_rank,
            layout.rdma_capacity,
            layout.nvl_capacity,
            rdma_chunk,
            nvl_chunk,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
        )
        self._rank_mask = ctx.rank_mask
        row_words = slot.row_bytes // 4
        self._kernel = KernelLaunch(
            _dispatch_kernel,
            wrap=memory.device_wrapper,
            NUM_RANKS=ctx.num_ranks,
            RANKS_PER_NODE=signals.ranks_per_node,
            X_WORDS=row_words,
            NUM_TOPK=num_topk,
            NUM_SCALES=num_scales,
            HAS_TOPK=num_topk > 0,
            HAS_SCALES=num_scales > 0,
            TOPK_IDX_TY=tl.int32 if topk_itemsize == 4 else tl.int64,
            TOPK_BYTES=num_topk * topk_itemsize,
            SLOT_BYTES=slot.num_bytes,
            OFF_SCALES=slot.scales,
            OFF_TOPK=slot.topk_idx,
            OFF_WEIGHTS=slot.topk_weights,
            OFF_META=slot.meta,
            NVL_DATA=ctx.data_offset,
            RDMA_TAILS=signals.rdma_tails,
            RDMA_HEADS=signals.rdma_heads,
            RDMA_INBOX=layout.rdma_inbox,
            RDMA_MSG_BYTES=layout.rdma_msg_bytes,
            RDMA_RING=layout.rdma_ring,
            RDMA_STAGING=layout.rdma_staging,
            NVL_TAILS=signals.nvl_tails,
            NVL_HEADS=signals.nvl_heads,
            NVL_RING=layout.nvl_ring,
            WRITE_HANDLE=write_handle,
            WORST=worst,
            FUSED=fused,
            HOST_ERROR=protocol.HOST_ERROR,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=protocol.PHASE_DISPATCH,
            TILE=tile,
            BLOCK_W=min(pow2(max(row_words, slot.meta // 4)), max(16, tile_words // tile)),
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_NODES=pow2(signals.num_nodes),
            BLOCK_LOCAL=pow2(signals.ranks_per_node),
            BLOCK_CHANNELS=pow2(layout.num_channels),
            BLOCK_TOPK=pow2(max(num_topk, 1)),
            BLOCK_SCALES=pow2(max(num_scales, 1)),
            TRANSPORT=memory.rdma_transport,
            FORCE_PUT=memory.rdma_force_put,
            USE_GLOBALTIMER=ctx.use_globaltimer,
            PREFETCH=prefetch,
            PUT_BLOCK=1024,
            num_warps=num_warps,
            # Roles of all ranks wait on each other: every program must be resident (a cooperative
            # launch fails loudly when the grid cannot be, instead of hanging).
            launch_cooperative_grid=not fused,
        )

    def launch(
        self,
        stream,
        x,
        scales,
        topk_idx,
        topk_weights,
        is_token_in_rank,
        recv_rdma_channel_prefix_matrix,
        recv_rdma_rank_prefix_sum,
        recv_gbl_channel_prefix_matrix,
        recv_gbl_rank_prefix_sum,
        send_rdma_head,
        send_nvl_head,
        recv_src_meta,
        recv_x,
        recv_scales,
        recv_topk_idx,
        recv_topk_weights,
    ) -> None:
        """The data kernel on `stream`.

        `x`: `[N, row bytes]` rows of any dtype (16-byte aligned start and row stride, checked by
        the Buffer); `scales`: int32 view of the FP8 scales (any strides) or None; the handle
        entries written (`send_rdma_head`, `send_nvl_head`, `recv_src_meta` as an int32 `[X, 2]`
        view) are None for a cached dispatch; `recv_scales` an int32 view or None.
        """
        has_topk = self._num_topk > 0
        dummy = is_token_in_rank  # a valid pointer for arguments a constexpr switched off
        write = self._write_handle
        self._kernel.launch(
            self._grid,
            stream,
            x.data_ptr(),
            x.stride(0) * x.element_size() // 4,
            scales if scales is not None else dummy,
            scales.stride(0) if scales is not None else 0,
            scales.stride(1) if scales is not None else 0,
            topk_idx if has_topk else dummy,
            topk_weights if has_topk else dummy,
            is_token_in_rank,
            self._rank_mask,
            recv_rdma_channel_prefix_matrix,
            recv_rdma_rank_prefix_sum,
            recv_gbl_channel_prefix_matrix,
            recv_gbl_rank_prefix_sum,
            send_rdma_head if write else dummy,
            send_nvl_head if write else dummy,
            recv_src_meta if write else dummy,
            recv_x.data_ptr(),
            recv_scales.data_ptr() if recv_scales is not None else 0,
            recv_topk_idx.data_ptr() if has_topk else 0,
            recv_topk_weights.data_ptr() if has_topk else 0,
            recv_x.shape[0],
            send_nvl_head.shape[0] if write else 0,
            *self._tail,
            x.shape[0],
            *self._static,
        )
