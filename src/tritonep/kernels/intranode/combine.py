"""Intranode combine: sum every returned copy of a token back on the rank that dispatched it.

Problem: after a dispatch with handle h, rank j holds `x_j [X, H]` (row i = its i-th received row);
token t of rank r must become `bias0[t] + bias1[t] + sum_{j : is_token_in_rank[t, j]} x_j[row of t]`
in fp32, rounded once, and likewise for the top-k weights (no bias).

Algorithm (one persistent launch of `2C` programs, channels as in dispatch, which first opens its
call itself: `notify.open_call_in_launch`, no notify launch):
* programs `[0, C)` are senders. Rank j's sender c owns, for every destination r != j, the
  contiguous rows of x that came from (source r, channel c); it pushes them, `chunk` rows at a time
  and each chunk as one flat span of words (two where the queue wraps), into queue (c, j) of rank
  r, choosing among destinations whichever has rows left and room, so it
  never blocks on one destination while another could progress.
* programs `[C, 2C)` are receivers. Receiver c walks its channel's tokens in tiles; `send_head[t,
j]`
  (written by dispatch) is token t's position in the stream from rank j, so the copy from j sits in
  queue slot `position % capacity` — or, for j == r, directly in local x. It waits until each
  source's tail covers the tile, sums bias then ranks in ascending order in fp32, stores, and
  returns the slots to the senders by publishing heads.

Sync protocol: as in dispatch (epoch-tagged tails and heads, release/acquire at the peer scope).

Example:
    R=2, rank 0 token t went to both ranks; rank 0 returns 1.0 and rank 1 returns 2.0 for it
    -> combined_x[t] = 3.0 on rank 0 (plus bias[t] if given).
"""

import torch
import triton.language as tl

from ... import _env, protocol
from ..common.casting import round_to
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from ..common.sync import (
    STOP_ALL,
    load_acquire,
    memory_scope,
    past_deadline,
    report_error,
    store_release,
    wait_for_peers,
)
from ..common.tiles import column, copy_ring_rows, lane, row_block
from .blocks import received_blocks
from .notify import open_call_in_launch


@named_kernel(
    "intranode", "combine", do_not_specialize=["rank", "num_tokens", "layout_key", "refuse"]
)
def _combine_kernel(
    x_addr,
    topk_weights_addr,
    bias0_ptr,
    bias1_ptr,
    rank_prefix_matrix_ptr,
    recv_channel_prefix_matrix_ptr,
    send_head_ptr,
    out_ptr,
    out_weights_ptr,
    rank_mask_ptr,
    peer_bases_ptr,
    rank,
    num_tokens,
    num_channels,
    queue_x,
    queue_topk_weights,
    capacity,
    chunk,
    host_addr,
    clock_addr,
    timeout_ns,
    layout_key,
    refuse,
    NUM_RANKS: tl.constexpr,
    HIDDEN: tl.constexpr,
    DTYPE: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BIAS0: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    TAILS: tl.constexpr,
    HEADS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PREFETCH: tl.constexpr,
    RECV_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    # A combine counts nothing: it opens its call itself, with no notify launch ahead of it.
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
    is_peer = live & (ranks != rank)
    rows_in_tile = tl.arange(0, TILE)
    ks = tl.arange(0, BLOCK_TOPK)
    ROW_BYTES: tl.constexpr = HIDDEN * DTYPE.primitive_bitwidth // 8
    WEIGHT_BYTES: tl.constexpr = NUM_TOPK * 4

    c = tl.where(pid < num_channels, pid, pid - num_channels)
    # Where the dispatch put the rows from each source (channel c of each source) in x.
    block_begin, block_end, chan_begin, chan_end = received_blocks(
        rank_prefix_matrix_ptr,
        recv_channel_prefix_matrix_ptr,
        ranks,
        rank,
        c,
        num_channels,
        NUM_RANKS,
    )
    if pid < num_channels:
        # ------------------------------------------------------------------ sender of channel c
        first_row = block_begin + chan_begin  # rows of x that came from (rank d, channel c)
        total = tl.where(is_peer, chan_end - chan_begin, 0)
        sent = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
        head_seen = tl.zeros([BLOCK_RANKS], dtype=tl.int64) + tag
        heads = (my_base + HEADS + (c * NUM_RANKS + ranks) * 8).to(tl.pointer_type(tl.int64))
        slot0 = ((c * NUM_RANKS + rank) * capacity).to(tl.int64)
        remaining = tl.sum(total, axis=0)
        while (remaining > 0) & ok:
            pending = sent < total
            # Re-read the heads of destinations whose queues looked full.
            stale = pending & ((head_seen - tag).to(tl.int32) + capacity <= sent)
            polled = load_acquire(heads, stale, PEER_SCOPE)
            head_seen = tl.where(stale & (polled > head_seen), polled, head_seen)
            room = tl.where(head_seen >= tag, (head_seen - tag).to(tl.int32) + capacity - sent, 0)
            ready = tl.where(pending, tl.minimum(total - sent, room), 0)
            if tl.max(ready, axis=0) > 0:
                dst = tl.argmax(ready, axis=0)
                n = tl.minimum(tl.minimum(lane(ready, ranks, dst), chunk), TILE)
                start = lane(sent, ranks, dst)
                in_chunk = rows_in_tile < n
                first_src = (lane(first_row, ranks, dst) + start).to(tl.int64)
                src_row = first_src + rows_in_tile
                slot = slot0 + ((start + rows_in_tile) % capacity).to(tl.int64)
                dst_base = lane(peer_bases, ranks, dst)
                # The chunk's rows are consecutive in x and (up to the wrap) in the queue: flat
                # spans, no masked rows (V1's chunk 10 would fill 10 of 16 tile rows).
                copy_ring_rows(
                    x_addr + first_src * ROW_BYTES,
                    dst_base + queue_x + slot0 * ROW_BYTES,
                    start,
                    n,
                    capacity,
                    ROW_BYTES // 4,
                    TILE * BLOCK_H,
                    "",
                    PREFETCH,
                    True,
                )
                if HAS_WEIGHTS:
                    mk = in_chunk[:, None] & (ks[None, :] < NUM_TOPK)
                    src_w = (topk_weights_addr + src_row * WEIGHT_BYTES).to(
                        tl.pointer_type(tl.float32)
                    )
                    dst_w = (dst_base + queue_topk_weights + slot * WEIGHT_BYTES).to(
                        tl.pointer_type(tl.float32)
                    )
                    tl.store(
                        dst_w[:, None] + ks[None, :],
                        tl.load(src_w[:, None] + ks[None, :], mask=mk),
                        mask=mk,
                    )
                sent = tl.where(ranks == dst, sent + n, sent)
                remaining -= n
                tl.debug_barrier()
                tail_addr = dst_base + TAILS + (c * NUM_RANKS + rank) * 8
                store_release(
                    tail_addr.to(tl.pointer_type(tl.int64)),
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
                    pending & (ready == 0),
                    ranks,
                    PHASE,
                    c,
                    (head_seen - tag).to(tl.int32),
                    sent - capacity + 1,
                    BLOCK_RANKS,
                )
    else:
        # ---------------------------------------------------------------- receiver of channel c
        tokens_per_channel = tl.cdiv(num_tokens, num_channels)
        begin = tl.minimum(c * tokens_per_channel, num_tokens)
        end = tl.minimum(begin + tokens_per_channel, num_tokens)
        own_first = lane(block_begin + chan_begin, ranks, rank)
        is_self = ranks == rank
        # Where the copy from each source lives: local x for this rank, queue (c, s) otherwise.
        base_x = tl.where(
            is_self,
            x_addr + own_first.to(tl.int64) * ROW_BYTES,
            my_base + queue_x + ((c * NUM_RANKS + ranks) * capacity).to(tl.int64) * ROW_BYTES,
        )
        base_w = tl.where(
            is_self,
            topk_weights_addr + own_first.to(tl.int64) * WEIGHT_BYTES,
            my_base
            + queue_topk_weights
            + ((c * NUM_RANKS + ranks) * capacity).to(tl.int64) * WEIGHT_BYTES,
        )
        tails = (my_base + TAILS + (c * NUM_RANKS + ranks) * 8).to(tl.pointer_type(tl.int64))
        tail_seen = tl.zeros([BLOCK_RANKS], dtype=tl.int64)
        hs = tl.arange(0, BLOCK_H)
        for t0 in range(begin, end, TILE):
            if ok:
                rows = t0 + rows_in_tile
                valid = rows < end
                position = tl.load(
                    send_head_ptr + rows[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
                    mask=valid[:, None] & live[None, :],
                    other=-1,
                )
                need = tag + (tl.max(position, axis=0) + 1).to(tl.int64)  # [R]
                poll = is_peer & (need > tag) & (tail_seen < need)
                if tl.sum(poll.to(tl.int32), axis=0) > 0:
                    tail_seen, ok = wait_for_peers(
                        tails,
                        need,
                        poll,
                        tail_seen,
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
                    slot = tl.where(is_self[None, :], position, position % capacity).to(tl.int64)
                    for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=RECV_STAGES):
                        cols = h0 + hs
                        col_ok = cols < HIDDEN
                        m2 = valid[:, None] & col_ok[None, :]
                        acc = tl.zeros([TILE, BLOCK_H], dtype=tl.float32)
                        if HAS_BIAS0:
                            acc += tl.load(
                                bias0_ptr + rows[:, None].to(tl.int64) * HIDDEN + cols[None, :],
                                mask=m2,
                                other=0.0,
                            ).to(tl.float32)
                        if HAS_BIAS1:
                            acc += tl.load(
                                bias1_ptr + rows[:, None].to(tl.int64) * HIDDEN + cols[None, :],
                                mask=m2,
                                other=0.0,
                            ).to(tl.float32)
                        for src in tl.static_range(NUM_RANKS):
                            pos = column(position, ranks, src)
                            row_addr = (
                                lane(base_x, ranks, src) + column(slot, ranks, src) * ROW_BYTES
                            )
                            m = (valid & (pos >= 0))[:, None] & col_ok[None, :]
                            vals = tl.load(
                                row_block(row_addr, cols, DTYPE, BLOCK_H),
                                mask=m,
                                other=0.0,
                                cache_modifier=".cg",
                            )
                            acc += vals.to(tl.float32)
                        tl.store(
                            out_ptr + rows[:, None].to(tl.int64) * HIDDEN + cols[None, :],
                            round_to(acc, DTYPE, INTERPRETED),
                            mask=m2,
                        )
                    if HAS_WEIGHTS:
                        wacc = tl.zeros([TILE, BLOCK_TOPK], dtype=tl.float32)
                        for src in tl.static_range(NUM_RANKS):
                            pos = column(position, ranks, src)
                            w_rows = (
                                lane(base_w, ranks, src) + column(slot, ranks, src) * WEIGHT_BYTES
                            ).to(tl.pointer_type(tl.float32))
                            m = (valid & (pos >= 0))[:, None] & (ks[None, :] < NUM_TOPK)
                            wacc += tl.load(
                                w_rows[:, None] + ks[None, :],
                                mask=m,
                                other=0.0,
                                cache_modifier=".cg",
                            )
                        tl.store(
                            out_weights_ptr + rows[:, None].to(tl.int64) * NUM_TOPK + ks[None, :],
                            wacc,
                            mask=valid[:, None] & (ks[None, :] < NUM_TOPK),
                        )
                    # Hand the consumed slots back to their senders.
                    tl.debug_barrier()
                    head_addr = peer_bases + HEADS + (c * NUM_RANKS + rank) * 8
                    tl.atomic_xchg(
                        head_addr.to(tl.pointer_type(tl.int64)),
                        need,
                        mask=is_peer & (need > tag),
                        sem="release",
                        scope=PEER_SCOPE,
                    )


# Shared memory the receivers' pipelined loads may take.
_RECV_PIPELINE_BYTES = 192 * 1024
_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class CombinePlan:
    """The combine launch of one call geometry on one Buffer.

    Fixed per plan: queue layout (`queues`), channels, send chunk, receiver `tile` (tokens reduced
    per step, at most the queue capacity), hidden size and dtype, top-k width, which biases are
    given, and the program shape (`tile_words` bounds the `[tile, BLOCK_H]` fp32 accumulator;
    `receiver_stages` > 1 runs the receivers' loads through Triton's software pipeline, that many
    stages deep in shared memory (`cp.async`), where they fit).
    """

    def __init__(
        self,
        ctx,
        queues,
        *,
        num_channels: int,
        chunk: int,
        tile: int,
        hidden: int,
        dtype: torch.dtype,
        num_topk: int,
        has_bias: tuple[bool, bool],
        num_warps: int,
        tile_words: int,
        prefetch: bool,
        receiver_stages: int,
        layout_key: int,
    ):
        signal = protocol.signal_layout(ctx.num_ranks)
        q = ctx.data_offset
        self._ctx = ctx
        self.num_channels = num_channels
        self._has_weights = num_topk > 0
        self._static = (ctx.peer_bases, ctx.rank)
        self._queues = (
            num_channels,
            q + queues.x,
            q + queues.topk_weights,
            queues.capacity,
            chunk,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
            layout_key,
        )
        block_h = min(pow2(hidden), max(16, tile_words // tile))
        # A receiver step loads one [tile, block_h] block per source and bias; its pipeline keeps
        # stages - 1 steps of them in shared memory, which must stay within an SM's 227 KB.
        step_bytes = (ctx.num_ranks + sum(has_bias)) * tile * block_h * dtype.itemsize
        fits = (receiver_stages - 1) * step_bytes <= _RECV_PIPELINE_BYTES
        recv_stages = receiver_stages if fits else 1
        self._kernel = KernelLaunch(
            _combine_kernel,
            NUM_RANKS=ctx.num_ranks,
            HIDDEN=hidden,
            DTYPE=_DTYPES[dtype],
            NUM_TOPK=num_topk,
            HAS_WEIGHTS=num_topk > 0,
            HAS_BIAS0=has_bias[0],
            HAS_BIAS1=has_bias[1],
            TAILS=signal.tails,
            HEADS=signal.heads,
            INBOX_STRIDE=signal.inbox_stride,
            HOST_ERROR=protocol.HOST_ERROR,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=protocol.PHASE_COMBINE,
            TILE=tile,
            BLOCK_H=block_h,
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_CHANNELS=pow2(num_channels),
            BLOCK_TOPK=pow2(max(num_topk, 1)),
            USE_GLOBALTIMER=ctx.use_globaltimer,
            # Every rank on this GPU: its queue signals at GPU scope (common/sync.memory_scope).
            PEER_SCOPE=memory_scope(ctx.all_ranks_on_gpu, False),
            INTERPRETED=_env.interpret_enabled(),
            PREFETCH=prefetch,
            RECV_STAGES=recv_stages,
            num_warps=num_warps,
            # Senders and receivers of all ranks wait on each other: every program must be resident.
            # A cooperative launch fails loudly when the grid cannot be, instead of hanging.
            launch_cooperative_grid=True,
        )

    def launch(
        self,
        stream,
        x,
        topk_weights,
        bias0,
        bias1,
        rank_prefix_matrix,
        recv_channel_prefix_matrix,
        send_head,
        out,
        out_weights,
        refuse: int,
    ) -> None:
        """`2 * num_channels` programs on `stream`; `out [N, H]` / `out_weights [N, K]` are
        filled. The launch opens its call itself (`notify.open_call_in_launch`; `refuse` as
        `NotifyPlan.launch`'s)."""
        self._kernel.launch(
            (2 * self.num_channels,),
            stream,
            x.data_ptr(),
            topk_weights.data_ptr() if self._has_weights else 0,
            bias0 if bias0 is not None else out,
            bias1 if bias1 is not None else out,
            rank_prefix_matrix,
            recv_channel_prefix_matrix,
            send_head,
            out,
            out_weights if self._has_weights else out,
            self._ctx.rank_mask,
            *self._static,
            send_head.shape[0],
            *self._queues,
            refuse,
        )
