"""Intranode call opening: the counting notify of a dispatch, and the opening folded into the data
launch of a cached dispatch or a combine.

Problem: before rows move, every rank must learn how many rows it receives from each source (and,
per channel, where they land), the host must learn the total to allocate outputs, and every sender
must know that its peers stopped reading the previous call's queues.

Algorithm of the counting notify (one program, ahead of a non-cached dispatch):
1. Advance this rank's epoch (device memory, so CUDA-graph replays advance it too).
2. Build this rank's channel prefix matrix `[R, C]` from `is_token_in_rank`.
3. Send every rank (itself included) one inbox message (`_post_openings`): its rows per
   destination (counted from `is_token_in_rank`), the channel prefix row for that rank and that
   rank's slice of `num_tokens_per_expert`, then the header: layout key, token count, refusal.
   Also publish head `(epoch, 0)` of every channel queue this rank receives into, telling senders
   that this rank's previous kernels are done.
4. Wait for all R messages of this epoch (`_check_openings`); check the layout keys agree (a rank
   called with another hidden size, top-k or config is reported instead of deadlocking the data
   kernel) and that no rank refused the call (`refuse` > 0: rows one of its queues would need
   beyond `capacity`).
5. Write `rank_prefix_matrix`, `recv_channel_prefix_matrix` and, into the host block, the received
   row count and per-expert counts, then publish `ready = ready_token`. The token is chosen by the
   host for this call, so a late write of an earlier call (a worst-case dispatch the host did not
   wait for, or a graph replay) can never pass for this call's.

A cached dispatch or a combine counts nothing, so a separate notify launch would only do steps 1,
3 and 4, and cost a launch and a kernel boundary (about 4 us of a 262 us BF16 dispatch on an H200).
Their data launches open the call themselves (`open_call_in_launch`): every program counts itself
in on a ticket word and the last one advances the epoch (step 1), program 0 posts the headers and
heads (step 3), and every program waits for and checks the messages (step 4) before touching a
queue.

Sync protocol: message payload stores, barrier, flag release (peer scope: `PEER_SCOPE`);
receivers acquire the flags.
Buffer regions: signal region (epoch, ticket, inbox, heads) and the host block; see `protocol.py`.

Example:
    R=2, rank 0 sends 3 tokens to rank 0 and 2 to rank 1; rank 1 sends 1 and 4
    -> rank_prefix_matrix = [[3, 2], [4, 6]]; rank 0 receives 4 rows, rank 1 receives 6.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import protocol
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from ..common.sync import (
    STOP_ALL,
    STOP_OFFSET,
    call_lanes,
    load_uniform,
    memory_scope,
    now_ns,
    report_error,
    store_release,
    wait_all_at_least,
)
from ..common.tiles import cumsum_rows

INBOX = tl.constexpr(protocol.signal_layout(1).inbox)  # the same for every rank count
TICKET_OFFSET = tl.constexpr(protocol.TICKET_OFFSET)
PAYLOAD = tl.constexpr(protocol.INBOX_HEADER_SLOTS * 8)
MAX_CHANNELS = tl.constexpr(protocol.MAX_CHANNELS)
HOST_READY = tl.constexpr(protocol.HOST_READY)
HOST_NUM_RECV = tl.constexpr(protocol.HOST_NUM_RECV)
HOST_ERROR = tl.constexpr(protocol.HOST_ERROR)
HOST_EXPERT_COUNTS = tl.constexpr(protocol.HOST_EXPERT_COUNTS)
HOST_OVERFLOW = tl.constexpr(protocol.HOST_OVERFLOW)
ERR_TIMEOUT = tl.constexpr(protocol.ERR_TIMEOUT)
ERR_LAYOUT_MISMATCH = tl.constexpr(protocol.ERR_LAYOUT_MISMATCH)
ERR_REFUSED = tl.constexpr(protocol.ERR_REFUSED)
PHASE_NOTIFY = tl.constexpr(protocol.PHASE_NOTIFY)


@triton.jit
def _post_openings(
    peer_bases_ptr,
    rank_mask_ptr,
    rank,
    epoch,
    layout_key,
    num_tokens,
    refuse,
    num_channels,
    NUM_RANKS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """Step 3 (one program): to every unmasked rank, this epoch's message header (layout key,
    token count, refusal) and, in its region, head `(epoch, 0)` of every queue it sends into this
    rank; then the message flag `epoch`, released after every store this program made before
    (a counting notify's payloads included)."""
    chans = tl.arange(0, BLOCK_CHANNELS)
    parity = epoch % 2
    for dst in range(0, NUM_RANKS):
        if tl.load(rank_mask_ptr + dst) == 0:
            dst_base = tl.load(peer_bases_ptr + dst)
            msg = (dst_base + INBOX + (parity * NUM_RANKS + rank) * INBOX_STRIDE).to(
                tl.pointer_type(tl.int64)
            )
            tl.store(msg + 1, layout_key)
            tl.store(msg + 2, num_tokens)
            tl.store(msg + 3, refuse)
            if dst != rank:
                heads = (dst_base + HEADS).to(tl.pointer_type(tl.int64))
                tl.store(
                    heads + chans * NUM_RANKS + rank,
                    (epoch << 32) + chans * 0,
                    mask=chans < num_channels,
                )
            tl.debug_barrier()
            store_release(msg, epoch, PEER_SCOPE)


@triton.jit
def _check_openings(
    host,
    stop,
    my_base,
    rank,
    epoch,
    layout_key,
    capacity,
    ranks,
    live,
    deadline,
    clock_addr,
    NUM_RANKS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """Step 4: wait for every live rank's message of `epoch`, then compare layout keys and look for
    refusals; a failure is recorded (notify phase) and stops the call. Returns (ok, the `[R]` inbox
    message addresses)."""
    inbox = my_base + INBOX + ((epoch % 2) * NUM_RANKS + ranks) * INBOX_STRIDE
    flags = wait_all_at_least(
        inbox.to(tl.pointer_type(tl.int64)),
        epoch + ranks * 0,
        live,
        deadline,
        clock_addr,
        USE_GLOBALTIMER,
        PEER_SCOPE,
    )
    missing = live & (flags < epoch)
    ok = tl.sum(missing.to(tl.int32), axis=0) == 0
    if not ok:
        report_error(
            host + HOST_ERROR,
            stop,
            STOP_ALL,
            ERR_TIMEOUT,
            rank,
            missing,
            ranks,
            PHASE_NOTIFY,
            -1,
            flags,
            epoch,
            BLOCK_RANKS,
        )
    else:
        keys = tl.load(
            (inbox + 8).to(tl.pointer_type(tl.int64)), mask=live, other=layout_key, volatile=True
        )
        refusals = tl.load(
            (inbox + 24).to(tl.pointer_type(tl.int64)), mask=live, other=0, volatile=True
        )
        differ = live & (keys != layout_key)
        refused = live & (refusals > 0)
        if tl.sum(differ.to(tl.int32), axis=0) > 0:
            ok = False
            report_error(
                host + HOST_ERROR,
                stop,
                STOP_ALL,
                ERR_LAYOUT_MISMATCH,
                rank,
                differ,
                ranks,
                PHASE_NOTIFY,
                -1,
                keys,
                layout_key,
                BLOCK_RANKS,
            )
        elif tl.sum(refused.to(tl.int32), axis=0) > 0:
            ok = False
            report_error(
                host + HOST_ERROR,
                stop,
                epoch,
                ERR_REFUSED,
                rank,
                refused,
                ranks,
                PHASE_NOTIFY,
                -1,
                refusals,
                capacity,
                BLOCK_RANKS,
            )
    return ok, inbox


@triton.jit
def open_call_in_launch(
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
    NUM_RANKS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """`common.sync.open_call` for a data launch with no notify ahead of it: the launch opens its
    call itself (steps 1, 3 and 4 of the module docstring) and returns what `open_call` returns.

    The epoch: every program reads it, then counts itself in on the ticket word (acquire-release),
    and the program that completes the count resets the ticket and stores the epoch + 1. Every
    read precedes its program's count, and the store follows the last count, so every program
    of the launch reads the same epoch. Both reads are single atomics whose values the program
    shares (`load_uniform`): the branch on the ticket is taken by all of a program's threads.
    """
    host, stop, ranks, live, peer_bases, my_base = call_lanes(
        host_addr, rank_mask_ptr, peer_bases_ptr, rank, NUM_RANKS, BLOCK_RANKS
    )
    epoch_ptr = my_base.to(tl.pointer_type(tl.int64))
    ticket_ptr = (my_base + TICKET_OFFSET).to(tl.pointer_type(tl.int64))
    epoch = load_uniform(epoch_ptr) + 1
    if tl.program_id(0) == 0:
        # Posted before counting in: the peers' wait for this message then holds one atomic
        # round trip less. Nothing here needs the count, and no program of this launch reads the
        # epoch after this (each read it above, before its own count).
        _post_openings(
            peer_bases_ptr,
            rank_mask_ptr,
            rank,
            epoch,
            layout_key,
            num_tokens,
            refuse,
            num_channels,
            NUM_RANKS,
            INBOX_STRIDE,
            HEADS,
            BLOCK_CHANNELS,
            PEER_SCOPE,
        )
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        tl.store(ticket_ptr, 0)
        tl.store(epoch_ptr, epoch)
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    # A failed buffer or a refused call does no work. Nor does it wait: in the interpreter the
    # programs run one after another, and each would wait out its own deadline for a stalled peer.
    ok = load_uniform(stop) < epoch
    if ok:
        ok, _ = _check_openings(
            host,
            stop,
            my_base,
            rank,
            epoch,
            layout_key,
            capacity,
            ranks,
            live,
            deadline,
            clock_addr,
            NUM_RANKS,
            INBOX_STRIDE,
            BLOCK_RANKS,
            USE_GLOBALTIMER,
            PEER_SCOPE,
        )
    return host, stop, ok, ranks, live, peer_bases, my_base, epoch << 32, deadline


@named_kernel(
    "intranode",
    "notify",
    do_not_specialize=[
        "rank",
        "layout_key",
        "num_tokens",
        "num_worst_tokens",
        "refuse",
        "capacity",
        "ready_token",
    ],
)
def _notify_kernel(
    peer_bases_ptr,
    rank,
    layout_key,
    refuse,
    capacity,
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
    rank_prefix_matrix_ptr,
    channel_prefix_matrix_ptr,
    recv_channel_prefix_matrix_ptr,
    NUM_RANKS: tl.constexpr,
    INBOX_STRIDE: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    host = host_addr.to(tl.pointer_type(tl.int64))
    ranks = tl.arange(0, BLOCK_RANKS)
    rank_ok = ranks < NUM_RANKS
    # Masked ranks get no message and are not waited for; their counts read as zero.
    live = rank_ok & (tl.load(rank_mask_ptr + ranks, mask=rank_ok, other=1) == 0)
    chans = tl.arange(0, BLOCK_CHANNELS)
    chan_ok = chans < num_channels
    my_base = tl.load(peer_bases_ptr + rank)
    epoch_ptr = my_base.to(tl.pointer_type(tl.int64))
    stop = (my_base + STOP_OFFSET).to(tl.pointer_type(tl.int64))
    epoch = tl.load(epoch_ptr, volatile=True) + 1
    tl.store(epoch_ptr, epoch)
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    parity = epoch % 2

    # 2. Channel prefix matrix of this rank's tokens: [j][c] = tokens of channels <= c going to j.
    channel_prefix = tl.zeros([BLOCK_RANKS, BLOCK_CHANNELS], dtype=tl.int32)
    tokens_per_channel = tl.cdiv(num_tokens, num_channels)
    running = tl.zeros([BLOCK_RANKS], dtype=tl.int32)
    for c in range(0, num_channels):
        begin = tl.minimum(c * tokens_per_channel, num_tokens)
        end = tl.minimum(begin + tokens_per_channel, num_tokens)
        for t0 in range(begin, end, BLOCK_TOKENS):
            rows = t0 + tl.arange(0, BLOCK_TOKENS)
            flags = tl.load(
                is_token_in_rank_ptr + rows[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
                mask=(rows[:, None] < end) & live[None, :],
                other=0,
            )
            running += tl.sum(flags.to(tl.int32), axis=0)
        channel_prefix = tl.where(chans[None, :] == c, running[:, None], channel_prefix)
    tl.store(
        channel_prefix_matrix_ptr + ranks[:, None] * num_channels + chans[None, :],
        channel_prefix,
        mask=rank_ok[:, None] & chan_ok[None, :],
    )

    # 3. The counts first (each destination's payload), then every rank's message header, heads
    # and flag (`_post_openings`, which orders these stores before the flag).
    experts = tl.arange(0, BLOCK_EXPERTS)
    for dst in range(0, NUM_RANKS):
        if tl.load(rank_mask_ptr + dst) == 0:
            payload = (
                tl.load(peer_bases_ptr + dst)
                + INBOX
                + (parity * NUM_RANKS + rank) * INBOX_STRIDE
                + PAYLOAD
            ).to(tl.pointer_type(tl.int32))
            # Rows per destination as the senders will really send them (masked ranks excluded),
            # so the receivers' expectations cannot disagree with the data kernel.
            tl.store(payload + ranks, running, mask=rank_ok)
            row = tl.sum(tl.where(ranks[:, None] == dst, channel_prefix, 0), axis=0)
            tl.store(payload + NUM_RANKS + chans, row, mask=chan_ok)
            expert_counts = tl.load(
                num_tokens_per_expert_ptr + dst * experts_per_rank + experts,
                mask=experts < experts_per_rank,
            )
            tl.store(
                payload + NUM_RANKS + MAX_CHANNELS + experts,
                expert_counts,
                mask=experts < experts_per_rank,
            )
    _post_openings(
        peer_bases_ptr,
        rank_mask_ptr,
        rank,
        epoch,
        layout_key,
        num_tokens,
        refuse,
        num_channels,
        NUM_RANKS,
        INBOX_STRIDE,
        HEADS,
        BLOCK_CHANNELS,
        PEER_SCOPE,
    )

    # 4. Wait for every rank's message of this epoch and compare layout keys.
    ok, inbox = _check_openings(
        host,
        stop,
        my_base,
        rank,
        epoch,
        layout_key,
        capacity,
        ranks,
        live,
        deadline,
        clock_addr,
        NUM_RANKS,
        INBOX_STRIDE,
        BLOCK_RANKS,
        USE_GLOBALTIMER,
        PEER_SCOPE,
    )

    # 5. Prefix matrices and host-visible counts.
    if ok:
        payloads = inbox + PAYLOAD  # [R] int32 payload addresses, one per source
        counts = tl.load(
            payloads[:, None].to(tl.pointer_type(tl.int32)) + ranks[None, :],
            mask=live[:, None] & rank_ok[None, :],
            other=0,
            volatile=True,
        )  # [source, destination]
        rank_prefix = cumsum_rows(counts, BLOCK_RANKS, True)
        tl.store(
            rank_prefix_matrix_ptr + ranks[:, None] * NUM_RANKS + ranks[None, :],
            rank_prefix,
            mask=rank_ok[:, None] & rank_ok[None, :],
        )
        num_recv = tl.sum(
            tl.sum(
                tl.where(
                    (ranks[:, None] == NUM_RANKS - 1) & (ranks[None, :] == rank), rank_prefix, 0
                ),
                axis=1,
            ),
            axis=0,
        )
        # Exclusive channel offsets: the source's inclusive prefix shifted by one channel.
        recv_channel_prefix = tl.load(
            payloads[:, None].to(tl.pointer_type(tl.int32)) + NUM_RANKS + chans[None, :] - 1,
            mask=live[:, None] & chan_ok[None, :] & (chans[None, :] > 0),
            other=0,
            volatile=True,
        )
        tl.store(
            recv_channel_prefix_matrix_ptr + ranks[:, None] * num_channels + chans[None, :],
            recv_channel_prefix,
            mask=rank_ok[:, None] & chan_ok[None, :],
        )
        recv_per_expert = tl.sum(
            tl.load(
                payloads[:, None].to(tl.pointer_type(tl.int32))
                + NUM_RANKS
                + MAX_CHANNELS
                + experts[None, :],
                mask=live[:, None] & (experts[None, :] < experts_per_rank),
                other=0,
                volatile=True,
            ),
            axis=0,
        )
        tl.store(
            host + HOST_EXPERT_COUNTS + experts,
            recv_per_expert.to(tl.int64),
            mask=experts < experts_per_rank,
        )
        tl.store(host + HOST_NUM_RECV, num_recv.to(tl.int64))
        if (num_worst_tokens > 0) & (num_recv > num_worst_tokens):
            # The data kernel drops the rows beyond num_worst_tokens; the host reports it.
            tl.store(host + HOST_OVERFLOW, num_recv.to(tl.int64))
        tl.debug_barrier()
        store_release(host + HOST_READY, ready_token)


@dataclass(frozen=True)
class NotifyCounts:
    """What a counting notify (non-cached dispatch) reads and writes.

    Reads `num_tokens_per_expert` int32 `[E]` and `is_token_in_rank` bool `[N, R]`; writes the
    handle's `rank_prefix_matrix` `[R, R]`, `channel_prefix_matrix` and
    `recv_channel_prefix_matrix` `[R, C]`, and the host block's counts.
    """

    num_tokens: int
    num_worst_tokens: int
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor


class NotifyPlan:
    """The counting notify launch of one non-cached dispatch geometry on one Buffer (`ctx`: its
    `LaunchContext`; `experts_per_rank` local experts). `layout_key` fingerprints the geometry:
    ranks compare it. `capacity` is the queue capacity a refusal is measured against.
    """

    def __init__(
        self, ctx, num_channels: int, experts_per_rank: int, layout_key: int, capacity: int
    ):
        signal = protocol.signal_layout(ctx.num_ranks)
        self._head = (ctx.peer_bases, ctx.rank, layout_key)
        self._capacity = capacity
        self._middle = (num_channels, ctx.rank_mask, ctx.host_addr, ctx.clock_addr, ctx.timeout_ns)
        self._experts_per_rank = experts_per_rank
        self._kernel = KernelLaunch(
            _notify_kernel,
            NUM_RANKS=ctx.num_ranks,
            INBOX_STRIDE=signal.inbox_stride,
            HEADS=signal.heads,
            BLOCK_RANKS=pow2(ctx.num_ranks),
            BLOCK_CHANNELS=pow2(num_channels),
            BLOCK_EXPERTS=pow2(max(experts_per_rank, 1)),
            BLOCK_TOKENS=128,
            USE_GLOBALTIMER=ctx.use_globaltimer,
            # Every rank on this GPU: its queue signals at GPU scope (common/sync.memory_scope).
            PEER_SCOPE=memory_scope(ctx.all_ranks_on_gpu, False),
            num_warps=4,
        )

    def launch(self, stream, refuse: int, ready_token: int, counts: NotifyCounts) -> None:
        """One program on `stream`. `refuse` > 0 makes every rank fail the call with an error record
        naming this rank (it cannot run it: `refuse` rows would be needed where queues hold
        `capacity`). `ready_token` is what the kernel writes to the host's ready slot last."""
        self._kernel.launch(
            (1,),
            stream,
            *self._head,
            refuse,
            self._capacity,
            ready_token,
            *self._middle,
            counts.num_tokens,
            counts.num_worst_tokens,
            self._experts_per_rank,
            counts.num_tokens_per_expert,
            counts.is_token_in_rank,
            counts.rank_prefix_matrix,
            counts.channel_prefix_matrix,
            counts.recv_channel_prefix_matrix,
        )
