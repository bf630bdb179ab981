"""Intranode dispatch: move every token row to each rank that hosts one of its experts.

Problem: rank r holds `x [N, H]`; rank j must receive the rows with `is_token_in_rank[t, j]`,
ordered
by source rank, then token, plus their source index, top-k ids rebased to j's local experts (others
-1), top-k weights (0 where the id is -1) and FP8 scales.

Algorithm (one persistent launch of `2C` programs, C = num_channels; a cached dispatch's launch
first opens its call itself, `notify.open_call_in_launch`, a non-cached one follows its counting
notify):
* programs `[0, C)` are senders. Sender c walks its channel's contiguous token range in chunks of
  `chunk` tokens (each chunk's `is_token_in_rank` flags load while the previous chunk is sent).
  Per chunk it computes each row's position in the channel's stream to every destination, waits
  until the destination queue has room, writes `send_head`, copies each row once from HBM into
  registers and stores it to every destination: straight into this rank's own output rows (no
  queue), or into slot `position % capacity` of queue (c, r) in the peer's buffer. It publishes
  the new tail to the peer one round late, once the next round's prefix sums are done (the last
  round's after the loop).
* programs `[C, 2C)` are receivers. Receiver c polls the tails of all its source queues and copies
  whatever has arrived, never blocking on one source, into the output rows
  `rank_prefix[s-1][r] + recv_channel_prefix[s][c] + i` (the rows of x as flat spans of words:
  consecutive slots to consecutive rows), then publishes its head back to the sender.
  Because receivers never wait on a particular source and each chunk fits a queue, the ring cannot
  deadlock. Senders have lower program ids than receivers, so the interpreter (which runs programs
  one after another) works whenever queues hold a whole channel.
* worst-case mode: receivers also write the padding rows `[M, num_worst_tokens)` (top-k -1, weight
0).

Sync protocol: data stores, barrier, release of `tail = epoch << 32 | count` at system scope (GPU
scope when every rank shares this GPU: `PEER_SCOPE`, `common/sync.memory_scope`); receivers
acquire tails, copy, barrier, release heads. Every wait ends at the call's deadline with
an error record (see `sync.py`).

Example:
    R=2, rank 0: x=[a, b, c], is_token_in_rank=[[1, 1], [0, 1], [1, 0]]; rank 1: x=[d], [[1, 1]]
    -> rank 0 receives [a, c, d] (src_idx [0, 2, 0]); rank 1 receives [a, b, d] (src_idx [0, 1, 0]);
       rank_prefix_matrix = [[2, 2], [3, 3]].
"""

import triton
import triton.language as tl

from ... import protocol
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from ..common.sync import (
    STOP_ALL,
    load_acquire,
    memory_scope,
    open_call,
    past_deadline,
    report_error,
    store_release,
    wait_for_peers,
)
from ..common.tiles import (
    _load_block,
    column,
    copy_ring_rows,
    cumsum_rows,
    lane,
    row_block,
)
from .blocks import received_blocks
from .notify import open_call_in_launch

MAX_TILE = 64  # sender rows per step; the in-tile prefix sum is a [TILE, TILE, R] reduction


@triton.jit
def _store_to_destinations(
    vals,
    words,
    dst_rows,
    deliver,
    ranks,
    ROW_WORDS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    NUM_RANKS: tl.constexpr,
):
    """Store one `[TILE, BLOCK_W]` block of rows to every destination that receives them.

    dst_rows: `[TILE, R]` byte address of each row's destination row; deliver: `[TILE, R]` flags.
    Up to 4 ranks the loop is unrolled and the compiler keeps every destination's row addresses in
    registers across blocks (no barrier in the copy loop). With 8 ranks those addresses spill (255
    registers plus a 168-288 byte stack in the sm_90 build), so they are re-derived per block.
    """
    if NUM_RANKS <= 4:
        for dst in tl.static_range(NUM_RANKS):
            _store_to_destination(vals, words, dst_rows, deliver, ranks, dst, ROW_WORDS, BLOCK_W)
    else:
        for dst in range(NUM_RANKS):
            _store_to_destination(vals, words, dst_rows, deliver, ranks, dst, ROW_WORDS, BLOCK_W)


@triton.jit
def _store_to_destination(
    vals, words, dst_rows, deliver, ranks, dst, ROW_WORDS: tl.constexpr, BLOCK_W: tl.constexpr
):
    row_mask = column(deliver.to(tl.int32), ranks, dst) > 0
    m = row_mask[:, None] & (words[None, :] < ROW_WORDS)
    tl.store(row_block(column(dst_rows, ranks, dst), words, tl.int32, BLOCK_W), vals, mask=m)


@triton.jit
def _publish_tails(tails, tag, sent, lanes, PEER_SCOPE: tl.constexpr):
    """Release stream position `sent` (epoch-tagged) to the queues of `lanes`, once every thread's
    stores before this call are done."""
    tl.debug_barrier()
    tl.atomic_xchg(tails, tag + sent.to(tl.int64), mask=lanes, sem="release", scope=PEER_SCOPE)


@triton.jit
def _round_flags(
    is_token_in_rank_ptr, t0, end, chunk, rows_in_tile, ranks, live, NUM_RANKS: tl.constexpr
):
    """`is_token_in_rank` of the sender round starting at token t0, `[TILE, R]` int32 (0 past
    the round, the channel, or for masked ranks)."""
    rows = t0 + rows_in_tile
    valid = (rows_in_tile < chunk) & (rows < end)
    return tl.load(
        is_token_in_rank_ptr + rows[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
        mask=valid[:, None] & live[None, :],
        other=0,
    ).to(tl.int32)


@triton.jit
def _copy_fields(
    src_rows_src,
    src_rows_topk,
    src_rows_w,
    src_rows_s,
    dst_rows_src,
    dst_rows_topk,
    dst_rows_w,
    dst_rows_s,
    mask,
    NUM_TOPK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    TOPK_IDX_TY: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    HAS_SRC_IDX: tl.constexpr,
):
    """Copy the per-row fields of whole slots between two structure-of-arrays views (receiver
    side; the caller copies the rows of x as spans).

    All arguments `*_rows_*` are `[TILE]` int64 byte addresses of row starts.
    """
    if HAS_SRC_IDX:
        src_idx = tl.load(
            src_rows_src.to(tl.pointer_type(tl.int32)), mask=mask, cache_modifier=".cg"
        )
        tl.store(dst_rows_src.to(tl.pointer_type(tl.int32)), src_idx, mask=mask)
    if HAS_TOPK:
        ks = tl.arange(0, BLOCK_TOPK)
        mk = mask[:, None] & (ks[None, :] < NUM_TOPK)
        idx = tl.load(
            src_rows_topk.to(tl.pointer_type(TOPK_IDX_TY))[:, None] + ks[None, :],
            mask=mk,
            cache_modifier=".cg",
        )
        tl.store(
            dst_rows_topk.to(tl.pointer_type(TOPK_IDX_TY))[:, None] + ks[None, :], idx, mask=mk
        )
        w = tl.load(
            src_rows_w.to(tl.pointer_type(tl.float32))[:, None] + ks[None, :],
            mask=mk,
            cache_modifier=".cg",
        )
        tl.store(dst_rows_w.to(tl.pointer_type(tl.float32))[:, None] + ks[None, :], w, mask=mk)
    if HAS_SCALES:
        ss = tl.arange(0, BLOCK_SCALES)
        ms = mask[:, None] & (ss[None, :] < NUM_SCALES)
        s = tl.load(
            src_rows_s.to(tl.pointer_type(tl.int32))[:, None] + ss[None, :],
            mask=ms,
            cache_modifier=".cg",
        )
        tl.store(dst_rows_s.to(tl.pointer_type(tl.int32))[:, None] + ss[None, :], s, mask=ms)


@named_kernel(
    "intranode",
    "dispatch",
    do_not_specialize=[
        "rank",
        "num_tokens",
        "num_recv_rows",
        "x_row_stride",
        "scales_stride_row",
        "scales_stride_col",
        "layout_key",
        "refuse",
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
    rank_prefix_matrix_ptr,
    recv_channel_prefix_matrix_ptr,
    send_head_ptr,
    rank_mask_ptr,
    recv_x_addr,
    recv_src_idx_addr,
    recv_topk_idx_addr,
    recv_topk_weights_addr,
    recv_scales_addr,
    num_recv_rows,
    peer_bases_ptr,
    rank,
    num_tokens,
    num_channels,
    experts_per_rank,
    queue_x,
    queue_src_idx,
    queue_topk_idx,
    queue_topk_weights,
    queue_scales,
    capacity,
    chunk,
    host_addr,
    clock_addr,
    timeout_ns,
    layout_key,
    refuse,
    NUM_RANKS: tl.constexpr,
    ROW_WORDS: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    TOPK_IDX_TY: tl.constexpr,
    TOPK_BYTES: tl.constexpr,
    WORST: tl.constexpr,
    TAILS: tl.constexpr,
    HEADS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
    PREFETCH: tl.constexpr,
    WRITE_HANDLE: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.where(pid < num_channels, pid, pid - num_channels)
    # Loads that need no opened call are issued before the opening, whose waits then hide their
    # latency: where each source's rows land (channel c of each source), and a sender's first
    # round of flags (every rank lane; masked ranks are cleared once `live` is known).
    lanes = tl.arange(0, BLOCK_RANKS)
    block_begin, block_end, chan_begin, chan_end = received_blocks(
        rank_prefix_matrix_ptr,
        recv_channel_prefix_matrix_ptr,
        lanes,
        rank,
        c,
        num_channels,
        NUM_RANKS,
    )
    rows_in_tile = tl.arange(0, TILE)
    tokens_per_channel = tl.cdiv(num_tokens, num_channels)
    begin = tl.minimum(c * tokens_per_channel, num_tokens)
    end = tl.minimum(begin + tokens_per_channel, num_tokens)
    next_flags = _round_flags(
        is_token_in_rank_ptr,
        begin,
        end,
        chunk,
        rows_in_tile,
        lanes,
        (lanes < NUM_RANKS) & (pid < num_channels),
        NUM_RANKS,
    )
    if WRITE_HANDLE:
        # The counting notify ahead of this launch opened the call.
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
    else:
        # A cached dispatch counts nothing: it opens its call itself, with no notify launch.
        host, stop, ok, ranks, live, peer_bases, my_base, tag, deadline = open_call_in_launch(
            peer_bases_ptr,
            rank_mask_ptr,
            rank,
            layout_key,
            num_tokens,
            refuse,
            capacity,
            num_channels,
            host_addr,
            clock_addr,
            timeout_ns,
            NUM_RANKS,
            INBOX_STRIDE,
            HEADS,
            BLOCK_RANKS,
            BLOCK_CHANNELS,
            USE_GLOBALTIMER,
            PEER_SCOPE,
        )
    rank_ok = ranks < NUM_RANKS
    ks = tl.arange(0, BLOCK_TOPK)
    ss = tl.arange(0, BLOCK_SCALES)

    # Per-row strides shared by the output tensors and the queue arrays.
    ROW_BYTES: tl.constexpr = ROW_WORDS * 4
    WEIGHT_BYTES: tl.constexpr = NUM_TOPK * 4
    SCALE_BYTES: tl.constexpr = NUM_SCALES * 4

    if pid < num_channels:
        # ------------------------------------------------------------------ sender of channel c
        is_self = ranks == rank
        # This rank's own rows go straight to its outputs, after earlier channels' rows.
        own_first = lane(block_begin + chan_begin, ranks, rank)
        slot0 = ((c * NUM_RANKS + rank) * capacity).to(tl.int64)
        base_x = tl.where(is_self, recv_x_addr, peer_bases + queue_x + slot0 * ROW_BYTES)
        base_src = tl.where(is_self, recv_src_idx_addr, peer_bases + queue_src_idx + slot0 * 4)
        base_topk = tl.where(
            is_self, recv_topk_idx_addr, peer_bases + queue_topk_idx + slot0 * TOPK_BYTES
        )
        base_w = tl.where(
            is_self, recv_topk_weights_addr, peer_bases + queue_topk_weights + slot0 * WEIGHT_BYTES
        )
        base_s = tl.where(
            is_self, recv_scales_addr, peer_bases + queue_scales + slot0 * SCALE_BYTES
        )
        heads = (my_base + HEADS + (c * NUM_RANKS + ranks) * 8).to(tl.pointer_type(tl.int64))
        tails = (peer_bases + TAILS + (c * NUM_RANKS + rank) * 8).to(tl.pointer_type(tl.int64))
        is_peer = live & (ranks != rank)
        sent = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
        head_seen = tl.zeros([BLOCK_RANKS], dtype=tl.int64)
        next_flags = tl.where(live[None, :], next_flags, 0)
        # Lanes whose tail the previous round advanced and that are not yet published.
        unpublished = ranks < 0
        for t0 in range(begin, end, chunk):
            # The next round's flags load while this round runs: one load latency less per round.
            flags = next_flags
            next_flags = _round_flags(
                is_token_in_rank_ptr, t0 + chunk, end, chunk, rows_in_tile, ranks, live, NUM_RANKS
            )
            if ok:
                rows = t0 + rows_in_tile
                valid = (rows_in_tile < chunk) & (rows < end)
                position = sent[None, :] + cumsum_rows(
                    flags, TILE, False
                )  # [TILE, R] stream position
                count = tl.sum(flags, axis=0)
                new_sent = sent + count
                # Room for this chunk in every destination queue (heads carry the epoch).
                need = tag + tl.maximum(new_sent - capacity, 0).to(tl.int64)
                slot = tl.where(is_self[None, :], own_first + position, position % capacity).to(
                    tl.int64
                )
                deliver = (flags > 0) & (~is_self[None, :] | (slot < num_recv_rows))
                any_dest = tl.sum(deliver.to(tl.int32), axis=1) > 0
                src_x = x_addr + rows.to(tl.int64) * x_row_stride * 4
                dst_rows = base_x[None, :] + slot * ROW_BYTES  # [TILE, R] destination rows
                # The previous round is published only now: its stores drained while this round's
                # prefix sums ran, so the release's fence no longer holds every thread on them.
                # FP8 dispatch 335 -> 351 GB/s on one H200 shared by 2 ranks. The fence also waits
                # for loads in flight, so this round's first block is loaded after it (loaded
                # before it, BF16 lost 1 %).
                _publish_tails(tails, tag, sent, unpublished, PEER_SCOPE)
                if PREFETCH:
                    # Source rows do not depend on room in the queues: in flight from here.
                    words = tl.arange(0, BLOCK_W)
                    vals = _load_block(src_x, words, any_dest, ROW_WORDS, BLOCK_W, "")
                unpublished = is_peer & (count > 0)
                poll = unpublished & (head_seen < need)
                if tl.sum(poll.to(tl.int32), axis=0) > 0:
                    head_seen, ok = wait_for_peers(
                        heads,
                        need,
                        poll,
                        head_seen,
                        tag,
                        deadline,
                        clock_addr,
                        host + HOST_ERROR,
                        stop,
                        ERR_TIMEOUT,
                        rank,
                        ranks,
                        PHASE,
                        c,
                        BLOCK_RANKS,
                        USE_GLOBALTIMER,
                        PEER_SCOPE,
                    )
                if ok:
                    if WRITE_HANDLE:
                        tl.store(
                            send_head_ptr + rows[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
                            tl.where(flags > 0, position, -1),
                            mask=valid[:, None] & rank_ok[None, :],
                        )
                    # The per-row fields while the first block of rows is in flight: their loads
                    # wait once, not after the copy.
                    if HAS_TOPK:
                        idx = tl.load(
                            topk_idx_ptr + rows[:, None].to(tl.int64) * NUM_TOPK + ks[None, :],
                            mask=valid[:, None] & (ks[None, :] < NUM_TOPK),
                            other=-1,
                        )
                        weights = tl.load(
                            topk_weights_ptr + rows[:, None].to(tl.int64) * NUM_TOPK + ks[None, :],
                            mask=valid[:, None] & (ks[None, :] < NUM_TOPK),
                            other=0.0,
                        )
                    if HAS_SCALES:
                        scales = tl.load(
                            scales_ptr
                            + rows[:, None].to(tl.int64) * scales_stride_row
                            + ss[None, :] * scales_stride_col,
                            mask=valid[:, None] & (ss[None, :] < NUM_SCALES),
                        )
                    for dst in tl.static_range(NUM_RANKS):
                        row_mask = column(deliver.to(tl.int32), ranks, dst) > 0
                        dst_slot = column(slot, ranks, dst)
                        if WRITE_HANDLE:
                            src_ptrs = (lane(base_src, ranks, dst) + dst_slot * 4).to(
                                tl.pointer_type(tl.int32)
                            )
                            tl.store(src_ptrs, rows, mask=row_mask)
                        if HAS_TOPK:
                            local = idx - dst * experts_per_rank
                            mine = (local >= 0) & (local < experts_per_rank) & (idx >= 0)
                            topk_rows = (lane(base_topk, ranks, dst) + dst_slot * TOPK_BYTES).to(
                                tl.pointer_type(TOPK_IDX_TY)
                            )
                            w_rows = (lane(base_w, ranks, dst) + dst_slot * WEIGHT_BYTES).to(
                                tl.pointer_type(tl.float32)
                            )
                            mk = row_mask[:, None] & (ks[None, :] < NUM_TOPK)
                            tl.store(
                                topk_rows[:, None] + ks[None, :], tl.where(mine, local, -1), mask=mk
                            )
                            tl.store(
                                w_rows[:, None] + ks[None, :], tl.where(mine, weights, 0.0), mask=mk
                            )
                        if HAS_SCALES:
                            s_rows = (lane(base_s, ranks, dst) + dst_slot * SCALE_BYTES).to(
                                tl.pointer_type(tl.int32)
                            )
                            tl.store(
                                s_rows[:, None] + ss[None, :],
                                scales,
                                mask=row_mask[:, None] & (ss[None, :] < NUM_SCALES),
                            )
                    if PREFETCH:
                        for w0 in range(BLOCK_W, ROW_WORDS + BLOCK_W, BLOCK_W):
                            next_words = w0 + tl.arange(0, BLOCK_W)
                            next_vals = _load_block(
                                src_x, next_words, any_dest, ROW_WORDS, BLOCK_W, ""
                            )
                            _store_to_destinations(
                                vals, words, dst_rows, deliver, ranks, ROW_WORDS, BLOCK_W, NUM_RANKS
                            )
                            vals = next_vals
                            words = next_words
                    else:
                        for w0 in range(0, ROW_WORDS, BLOCK_W):
                            words = w0 + tl.arange(0, BLOCK_W)
                            vals = _load_block(src_x, words, any_dest, ROW_WORDS, BLOCK_W, "")
                            _store_to_destinations(
                                vals, words, dst_rows, deliver, ranks, ROW_WORDS, BLOCK_W, NUM_RANKS
                            )
                    sent = new_sent
                else:
                    unpublished = ranks < 0
        _publish_tails(tails, tag, sent, unpublished, PEER_SCOPE)  # the last round's
    else:
        # ---------------------------------------------------------------- receiver of channel c
        if WORST:
            # Padding rows [M, num_recv_rows): no source, top-k -1, weight 0; split across
            # receivers.
            num_recv = lane(block_end, ranks, NUM_RANKS - 1)
            pad_per_channel = tl.cdiv(tl.maximum(num_recv_rows - num_recv, 0), num_channels)
            pad_begin = num_recv + c * pad_per_channel
            pad_end = tl.minimum(pad_begin + pad_per_channel, num_recv_rows)
            for r0 in range(pad_begin, pad_end, TILE):
                prow = (r0 + rows_in_tile).to(tl.int64)
                pmask = prow < pad_end
                tl.store(
                    (recv_src_idx_addr + prow * 4).to(tl.pointer_type(tl.int32)), -1, mask=pmask
                )
                if HAS_TOPK:
                    mk = pmask[:, None] & (ks[None, :] < NUM_TOPK)
                    topk_rows = (recv_topk_idx_addr + prow * TOPK_BYTES).to(
                        tl.pointer_type(TOPK_IDX_TY)
                    )
                    w_rows = (recv_topk_weights_addr + prow * WEIGHT_BYTES).to(
                        tl.pointer_type(tl.float32)
                    )
                    tl.store(topk_rows[:, None] + ks[None, :], -1, mask=mk)
                    tl.store(w_rows[:, None] + ks[None, :], 0.0, mask=mk)
        is_peer = live & (ranks != rank)
        expected = tl.where(is_peer, chan_end - chan_begin, 0)
        out_first = block_begin + chan_begin
        consumed = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
        tails = (my_base + TAILS + (c * NUM_RANKS + ranks) * 8).to(tl.pointer_type(tl.int64))
        remaining = tl.sum(expected, axis=0)
        while (remaining > 0) & ok:
            pending = consumed < expected
            seen = load_acquire(tails, pending, PEER_SCOPE)
            available = tl.where(pending & (seen >= tag), (seen - tag).to(tl.int32) - consumed, 0)
            if tl.max(available, axis=0) > 0:
                src = tl.argmax(available, axis=0)
                n = tl.minimum(lane(available, ranks, src), TILE)
                start = lane(consumed, ranks, src)
                in_chunk = rows_in_tile < n
                slot = ((c * NUM_RANKS + src) * capacity + (start + rows_in_tile) % capacity).to(
                    tl.int64
                )
                first_out = lane(out_first, ranks, src) + start
                out_row = (first_out + rows_in_tile).to(tl.int64)
                in_chunk = in_chunk & (out_row < num_recv_rows)
                # Consecutive slots (up to the wrap) into consecutive output rows.
                copy_ring_rows(
                    recv_x_addr + first_out.to(tl.int64) * ROW_BYTES,
                    my_base + queue_x + ((c * NUM_RANKS + src) * capacity).to(tl.int64) * ROW_BYTES,
                    start,
                    tl.maximum(tl.minimum(n, num_recv_rows - first_out), 0),
                    capacity,
                    ROW_WORDS,
                    TILE * BLOCK_W,
                    ".cg",
                    PREFETCH,
                    False,
                )
                _copy_fields(
                    my_base + queue_src_idx + slot * 4,
                    my_base + queue_topk_idx + slot * TOPK_BYTES,
                    my_base + queue_topk_weights + slot * WEIGHT_BYTES,
                    my_base + queue_scales + slot * SCALE_BYTES,
                    recv_src_idx_addr + out_row * 4,
                    recv_topk_idx_addr + out_row * TOPK_BYTES,
                    recv_topk_weights_addr + out_row * WEIGHT_BYTES,
                    recv_scales_addr + out_row * SCALE_BYTES,
                    in_chunk,
                    NUM_TOPK,
                    NUM_SCALES,
                    HAS_TOPK,
                    HAS_SCALES,
                    TOPK_IDX_TY,
                    BLOCK_TOPK,
                    BLOCK_SCALES,
                    WRITE_HANDLE,
                )
                consumed = tl.where(ranks == src, consumed + n, consumed)
                remaining -= n
                # Release the slots back to the sender once every thread has read them.
                tl.debug_barrier()
                head_addr = lane(peer_bases, ranks, src) + HEADS + (c * NUM_RANKS + rank) * 8
                store_release(
                    head_addr.to(tl.pointer_type(tl.int64)),
                    tag + (start + n).to(tl.int64),
                    PEER_SCOPE,
                )
            elif past_deadline(deadline, clock_addr, USE_GLOBALTIMER):
                ok = ok & False
                report_error(
                    host + HOST_ERROR,
                    stop,
                    STOP_ALL,
                    ERR_TIMEOUT,
                    rank,
                    consumed < expected,
                    ranks,
                    PHASE,
                    c,
                    consumed,
                    expected,
                    BLOCK_RANKS,
                )


class DispatchPlan:
    """The dispatch launch of one call geometry on one Buffer.

    Fixed per plan: the queue layout (`queues`, an `IntranodeQueues`), channels, send chunk,
    local experts, row words, top-k width and id dtype, scale columns, whether handle entries are
    written (non-cached) and padded (worst case), and the program shape (`num_warps`, `tile_words`:
    register budget of one copy step in 4-byte words, `prefetch`: overlap each step's loads with
    the previous step's stores).
    """

    def __init__(
        self,
        ctx,
        queues,
        *,
        num_channels: int,
        chunk: int,
        experts_per_rank: int,
        row_words: int,
        num_topk: int,
        topk_itemsize: int,
        num_scales: int,
        write_handle: bool,
        worst: bool,
        num_warps: int,
        tile_words: int,
        prefetch: bool,
        layout_key: int,
    ):
        signal = protocol.signal_layout(ctx.num_ranks)
        self._ctx = ctx
        self.num_channels = num_channels
        chunk = min(chunk, MAX_TILE)
        tile = pow2(chunk)
        q = ctx.data_offset
        self._row_words = row_words
        self._num_topk = num_topk
        self._write_handle = write_handle
        self._scale_bytes = 4 * num_scales
        self._tail = (ctx.peer_bases, ctx.rank)
        self._static = (
            num_channels,
            experts_per_rank,
            q + queues.x,
            q + queues.src_idx,
            q + queues.topk_idx,
            q + queues.topk_weights,
            q + queues.scales,
            queues.capacity,
            chunk,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
            layout_key,
        )
        topk_ty = tl.int32 if topk_itemsize == 4 else tl.int64
        self._kernel = KernelLaunch(
            _dispatch_kernel,
            NUM_RANKS=ctx.num_ranks,
            ROW_WORDS=row_words,
            NUM_TOPK=num_topk,
            NUM_SCALES=num_scales,
            HAS_TOPK=num_topk > 0,
            HAS_SCALES=num_scales > 0,
            TOPK_IDX_TY=topk_ty,
            TOPK_BYTES=num_topk * topk_itemsize,
            WORST=worst,
            TAILS=signal.tails,
            HEADS=signal.heads,
            INBOX_STRIDE=signal.inbox_stride,
            HOST_ERROR=protocol.HOST_ERROR,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=protocol.PHASE_DISPATCH,
            TILE=tile,
            # `tile_words` bounds the [tile, block_w] register tile (8192 words = 32 KB per
            # program).
            BLOCK_W=min(pow2(row_words), max(16, tile_words // tile)),
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_CHANNELS=pow2(num_channels),
            BLOCK_TOPK=pow2(max(num_topk, 1)),
            BLOCK_SCALES=pow2(max(num_scales, 1)),
            USE_GLOBALTIMER=ctx.use_globaltimer,
            # Every rank on this GPU: its queue signals at GPU scope (common/sync.memory_scope).
            PEER_SCOPE=memory_scope(ctx.all_ranks_on_gpu, False),
            PREFETCH=prefetch,
            WRITE_HANDLE=write_handle,
            num_warps=num_warps,
            # Senders and receivers of all ranks wait on each other: every program must be resident.
            # A cooperative launch fails loudly when the grid cannot be, instead of hanging.
            launch_cooperative_grid=True,
        )

    def launch(
        self,
        stream,
        x,
        scales,
        topk_idx,
        topk_weights,
        is_token_in_rank,
        rank_prefix_matrix,
        recv_channel_prefix_matrix,
        send_head,
        recv_x,
        recv_src_idx,
        recv_topk_idx,
        recv_topk_weights,
        recv_scales,
        refuse: int,
    ) -> None:
        """`2 * num_channels` programs on `stream`.

        `x`: `[N, row bytes]` rows of any dtype (16-byte aligned start and row stride, checked by
        the Buffer); `scales`: int32 view of the FP8 scales (any strides) or None; `send_head` /
        `recv_src_idx` None for a cached dispatch (no handle entries written); outputs as the
        dispatch returns them, `recv_scales` an int32 view or None. `refuse` (a cached dispatch,
        which opens its call itself): as `NotifyPlan.launch`'s.
        """
        has_topk = self._num_topk > 0
        dummy = is_token_in_rank  # a valid pointer for arguments a constexpr switched off
        self._kernel.launch(
            (2 * self.num_channels,),
            stream,
            x.data_ptr(),
            x.stride(0) * x.element_size() // 4,
            scales if scales is not None else dummy,
            scales.stride(0) if scales is not None else 0,
            scales.stride(1) if scales is not None else 0,
            topk_idx if has_topk else dummy,
            topk_weights if has_topk else dummy,
            is_token_in_rank,
            rank_prefix_matrix,
            recv_channel_prefix_matrix,
            send_head if self._write_handle else dummy,
            self._ctx.rank_mask,
            recv_x.data_ptr(),
            recv_src_idx.data_ptr() if self._write_handle else 0,
            recv_topk_idx.data_ptr() if has_topk else 0,
            recv_topk_weights.data_ptr() if has_topk else 0,
            recv_scales.data_ptr() if recv_scales is not None else 0,
            recv_x.shape[0],
            *self._tail,
            x.shape[0],
            *self._static,
            refuse,
        )
