"""Low-latency dispatch: every (token, selected expert) pair to the expert's rank, for decoding.

Problem: rank r holds `x [N, H]` bf16 (N <= T) and `topk_idx [N, K]`. Local expert e of rank d
must receive one row per pair (t, k) with `topk_idx[t, k] == d * L + e` (duplicates included),
in blocks by ascending source rank and ascending token inside a block, optionally quantised to FP8
with per-128-channel scales (reference §13.2, §14.9), with counts, source indices and
`(begin << 32) | count` layout ranges. No host synchronisation.

Algorithm (one persistent launch; `ROLE` picks send, receive or both, see `sync.py`; in the fused
launch every program sends, then receives, so each phase has the whole grid):
* senders (programs `[0, S)`, S = min(T, the rank's share of the GPU)) own tokens `t = pid, pid + S,
  ...`. For its token a sender loads the row once and quantises it once, then sends it to each of
  its K experts e (skipping -1): into slot `(e_local * R + r) * T + j` of set p on the owner, where
  j counts the pairs before (t, k) in row-major order that select e, found by scanning topk_idx (so
  the block order is the token order, k order for a repeated expert: deterministic). The message
  (16-byte header holding the token index, then the payload) goes by plain stores where the owner is
  mapped, else it is staged once in this rank's staging slot of token t and put to every such owner.
  Pairs with j >= T are not sent (the receiver, which sees the count, reports them). The count
  signal of (e, r) must follow every row of e, which several programs write: each program, once its
  token's rows are written (stores, then a block barrier; puts, then `quiet`), adds its pairs to e's
  arrival counter (this rank's memory, per set and expert) with a release at the peer scope (system,
  or GPU when every rank shares this GPU: `PEER_SCOPE`, `common/sync.memory_scope`). The program
  that brings it to e's sent-pair count (every program counts those from topk_idx) has acquired
  every other program's release; it resets the counter to 0 for the next call of set p and sets the
  owner's signal `(e_local, r)` to `epoch << 32 | (count + 1)` with a release of its own, which is
  cumulative, so whoever sees the signal sees every row. Experts no pair selects get count 0 from
  program `e % S`; masked owners get nothing (their pairs are still counted, so the counters stay
  consistent when a rank is masked during a launch).
* receivers (programs `[0, Q)`) own local experts: expert `q + Q * i` is program q's, except
  that the experts of a last, partial round (L % Q of them) are each shared by Q // (L % Q)
  programs, which copy every such tile of its rows (one program per expert in shrink mode).
  A receiver waits for the R counts of its expert (masked sources are not waited for; in shrink
  mode a source that times out is masked), lays the blocks out in source order and copies every
  message into the outputs: data, scales (column-major), source token index.
Senders never wait (the last arrival signals; nobody waits for arrivals), and a program receives
only after it has sent. Every program of the fused launch is resident (a cooperative launch), so
its receivers' waits end; the interpreter, which runs programs one after another, gets the two
phases as two launches (modes/low_latency.py).

Why per token: with one program per expert (the previous design), a token selected by 8 experts
was loaded and quantised 8 times, and each program wrote its ~16 messages (128 tokens, top-8 of
288, 64 senders) one after another: 61 us for the FP8 dispatch kernel on H200. Per token the
row is read once and its K messages are independent stores in flight together, 16-byte vector
stores where slots are 16-byte aligned (FP8 rows used to compile to 1-byte stores).

Example: R=2, L=1 (E=2), T=4, rank 0: topk_idx = [[1], [0], [1]]; rank 1: [[1]]
    -> rank 1, expert 0 receives tokens [0, 2] of rank 0 then token 0 of rank 1:
       src_info [0, 2, 0], layout_range [(0 << 32) | 2, (2 << 32) | 1], recv_count [3].
"""

import torch
import triton
import triton.language as tl

from ... import protocol
from ...transport import device
from ..common.codecs import fp8_quantize, ue8m0_pack
from ..common.launch import pow2
from ..common.naming import named_kernel
from ..common.sync import now_ns, release_next_launch, wait_previous_launch
from ..common.tiles import copy_rows, lane
from .regions import HEADER_BYTES, LowLatencyRegions
from .sync import (
    ROLE_RECV,
    ROLE_SEND,
    RolePlan,
    open_launch,
    stopped,
    unmasked,
    wait_signals_or_give_up,
)

_HEADER = tl.constexpr(HEADER_BYTES)


@triton.jit
def _receiver_expert(
    round_,
    rpid,
    Q: tl.constexpr,
    FULL: tl.constexpr,
    PARTIAL: tl.constexpr,
    HELPERS: tl.constexpr,
):
    """(local expert, helper index, helpers of that expert) of receiver `rpid` in `round_` (lanes
    or a scalar): expert `rpid + Q * round_` alone in the FULL full rounds, then expert
    `FULL * Q + rpid % PARTIAL` of the partial round as its helper `rpid // PARTIAL` of HELPERS."""
    full = round_ < FULL
    return (
        tl.where(full, rpid + Q * round_, FULL * Q + rpid % PARTIAL),
        tl.where(full, 0, rpid // PARTIAL),
        tl.where(full, 1, HELPERS),
    )


@triton.jit
def group_tile(
    row_addr,
    BLOCK_G: tl.constexpr,
    G: tl.constexpr,
    ELEM_TY: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    """Pointers `[BLOCK_G, 128]` to the 128-channel groups of the row at `row_addr`, and their
    mask (constant along a group, so that it does not stop accesses from being vectorised).
    ALIGNED: the row starts 16-byte aligned; without that hint (given here: hints do not survive
    a call's return) a raw address's FP8 row compiles to 1-byte accesses."""
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, 128)
    ptrs = row_addr.to(tl.pointer_type(ELEM_TY)) + groups[:, None] * 128 + cols[None, :]
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 128])
    return ptrs, tl.broadcast_to((groups < G)[:, None], (BLOCK_G, 128))


@named_kernel("ll", "dispatch", do_not_specialize=["rank", "num_tokens", "parity"])
def _dispatch_kernel(
    x_ptr,
    topk_idx_ptr,
    recv_x_addr,
    recv_scales_ptr,
    src_info_ptr,
    layout_range_ptr,
    recv_count_ptr,
    cumulative_stats_ptr,
    wait_stats_ptr,
    num_tokens,
    parity,
    mask_ptr,
    workspace_ptr,
    counters_ptr,
    routes_ptr,
    rdma_base,
    rank,
    host_addr,
    clock_addr,
    timeout_ns,
    NUM_RANKS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    MAX_TOKENS: tl.constexpr,
    HIDDEN: tl.constexpr,
    NUM_TOPK: tl.constexpr,
    USE_FP8: tl.constexpr,
    ROUND_SCALE: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SIGNALS0: tl.constexpr,
    SIGNALS_STRIDE: tl.constexpr,
    RECV0: tl.constexpr,
    RECV_STRIDE: tl.constexpr,
    SEND0: tl.constexpr,
    SEND_STRIDE: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    NUM_SENDERS: tl.constexpr,
    NUM_RECEIVERS: tl.constexpr,
    ROLE: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    SHRINK: tl.constexpr,
    HAS_CUMULATIVE: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_SHRUNK: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_W: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    EARLY_LAUNCH: tl.constexpr,
):
    pid = tl.program_id(0)
    # A hook's launches are programmatic dependents of the kernel before them (`RolePlan`).
    wait_previous_launch(EARLY_LAUNCH)
    L: tl.constexpr = NUM_EXPERTS // NUM_RANKS
    G: tl.constexpr = (HIDDEN + 127) // 128
    SLOTS: tl.constexpr = NUM_RANKS * MAX_TOKENS  # rows per local expert in the outputs
    ALIGNED: tl.constexpr = SLOT_BYTES % 16 == 0
    PAYLOAD_BYTES: tl.constexpr = HIDDEN if USE_FP8 else 2 * HIDDEN
    MESSAGE_WORDS: tl.constexpr = (_HEADER + PAYLOAD_BYTES + (4 * G if USE_FP8 else 0)) // 4
    ws = workspace_ptr
    host = host_addr.to(tl.pointer_type(tl.int64))
    tag, ok = open_launch(ws, parity, ROLE)
    signals = rdma_base + SIGNALS0 + parity * SIGNALS_STRIDE
    recv = rdma_base + RECV0 + parity * RECV_STRIDE
    staging = rdma_base + SEND0 + parity * SEND_STRIDE

    if ROLE != ROLE_RECV:  # noqa: SIM102 (constexpr, then runtime)
        if pid < NUM_SENDERS:
            # ------------------------------------------------------------------- sender: tokens
            tl.static_assert(
                (NUM_SENDERS == 0) | (BLOCK_E * NUM_SENDERS >= NUM_EXPERTS),
                "BLOCK_E * NUM_SENDERS must cover every expert",
            )
            flat = tl.arange(0, CHUNK)
            num_pairs = num_tokens * NUM_TOPK
            arrivals = counters_ptr + parity * NUM_EXPERTS
            if ok:
                ks = tl.arange(0, BLOCK_K)
                for t in range(pid, num_tokens, NUM_SENDERS):
                    experts = tl.load(
                        topk_idx_ptr + t * NUM_TOPK + ks, mask=ks < NUM_TOPK, other=-1
                    )
                    # The row's load is issued before the routing scan, which does not need it:
                    # its latency hides behind the scan's.
                    xp, xm = group_tile(
                        x_ptr + tl.cast(t, tl.int64) * HIDDEN, BLOCK_G, G, tl.bfloat16
                    )
                    x = tl.load(xp, mask=xm, other=0.0)
                    valid = (ks < NUM_TOPK) & (experts >= 0) & (experts < NUM_EXPERTS)
                    # Every pair's route, slot and signal as lanes: the loops below pick one word
                    # per pair (`lane`, a block reduction) instead of reloading the expert id and
                    # its route, a chain of dependent loads per pair. The route and mask loads
                    # need only the expert ids: issued before the scan, they wait alongside it.
                    local = tl.where(valid, experts % L, 0)
                    pe, delta, direct = device.open_peer(
                        routes_ptr, rank, tl.where(valid, experts // L, 0), TRANSPORT, FORCE_PUT
                    )
                    # Pairs to masked owners are counted but not written: every program then agrees
                    # on each expert's total even if a receiver masks a rank in the middle of the
                    # launch, so the arrival counters always return to 0.
                    reachable = unmasked(mask_ptr, experts // L, valid)
                    # For each k: `total`, the pairs of the whole routing that select its expert,
                    # and `j`, those before (t, k) in row-major order (its slot in the expert's
                    # block, so the block lists tokens in ascending order, k order within a token).
                    total = tl.zeros([BLOCK_K], dtype=tl.int32)
                    j = tl.zeros([BLOCK_K], dtype=tl.int32)
                    here = t * NUM_TOPK + ks
                    for p0 in range(0, num_pairs, CHUNK):
                        positions = p0 + flat
                        ids = tl.load(
                            topk_idx_ptr + positions, mask=positions < num_pairs, other=-1
                        )
                        match = ids[None, :] == experts[:, None]
                        total += tl.sum(match.to(tl.int32), axis=1)
                        j += tl.sum(
                            (match & (positions[None, :] < here[:, None])).to(tl.int32), axis=1
                        )
                    # A block holds T rows: pairs beyond (a duplicated expert on most tokens) are
                    # not sent, and the receiver, which sees the count, reports them.
                    sent = valid & (j < MAX_TOKENS)
                    live = reachable & sent
                    if USE_FP8:
                        values, scale_inv = fp8_quantize(x, ROUND_SCALE, INTERPRETED)
                    slot_index = (local * NUM_RANKS + rank) * MAX_TOKENS + j
                    slots = recv + tl.cast(slot_index, tl.int64) * SLOT_BYTES
                    # The put path sends every pair of the token from one copy in this rank's
                    # staging slot of token t (this program's alone: one program per token), written
                    # with the first pair that needs it.
                    stage = staging + tl.cast(t, tl.int64) * SLOT_BYTES
                    by_put = live & ~direct
                    dst = tl.where(live & direct, slots + delta, 0)  # 0: nothing to write
                    if TRANSPORT != device.STORES:
                        first_put = tl.min(tl.where(by_put, ks, BLOCK_K), axis=0)
                        dst = tl.where(by_put & (ks == first_put), stage, dst)
                    for k in range(0, NUM_TOPK):
                        message = lane(dst, ks, k)
                        if message != 0:
                            tl.store(message.to(tl.pointer_type(tl.int32)), t)
                            payload = message + _HEADER
                            # Payloads start 16-byte aligned when slots do (regions.py).
                            if USE_FP8:
                                vp, vm = group_tile(payload, BLOCK_G, G, tl.float8e4nv, ALIGNED)
                                # Kept in L2 for the receiver on this GPU, which reads them next.
                                tl.store(vp, values, mask=vm, eviction_policy="evict_last")
                                groups = tl.arange(0, BLOCK_G)
                                tl.store(
                                    (payload + PAYLOAD_BYTES).to(tl.pointer_type(tl.float32))
                                    + groups,
                                    scale_inv,
                                    mask=groups < G,
                                )
                            else:
                                vp, vm = group_tile(payload, BLOCK_G, G, tl.bfloat16, ALIGNED)
                                tl.store(vp, x, mask=vm, eviction_policy="evict_last")
                    if TRANSPORT != device.STORES:  # noqa: SIM102 (constexpr, then runtime)
                        if first_put < BLOCK_K:
                            # The staged message, written by every thread, is read.
                            tl.debug_barrier()
                            by_put_i = by_put.to(tl.int32)
                            for k in range(first_put, NUM_TOPK):
                                if lane(by_put_i, ks, k) != 0:
                                    device.put_nbi_block(
                                        lane(slots, ks, k).to(tl.pointer_type(tl.int32)),
                                        stage.to(tl.pointer_type(tl.int32)),
                                        MESSAGE_WORDS,
                                        lane(pe, ks, k),
                                        lane(delta, ks, k),
                                        False,
                                        TRANSPORT,
                                        BLOCK_W,
                                    )
                            # This program's puts land before it counts them.
                            device.quiet(TRANSPORT)
                    # Every thread's stores, ordered at block scope before the arrivals below.
                    tl.debug_barrier()
                    # Arrivals: release at the peer scope, so a program that later sees an expert's
                    # last arrival (acquire) and signals has every counted row behind its release.
                    before = tl.atomic_add(
                        arrivals + experts, 1, mask=sent, sem="acq_rel", scope=PEER_SCOPE
                    )
                    last = sent & (before + 1 == tl.minimum(total, MAX_TOKENS))
                    # This program wrote the expert's last row: reset its counter for the next call
                    # of set p (no program of this launch touches it again) and publish the count,
                    # ordered after every row (release is cumulative). All such pairs of the token
                    # in one masked release.
                    tl.store(arrivals + experts, 0, mask=last)
                    sigs = signals + tl.cast((local * NUM_RANKS + rank) * 8, tl.int64)
                    device.signal_lanes(
                        sigs.to(tl.pointer_type(tl.int64)),
                        tag + total.to(tl.int64) + 1,
                        pe,
                        delta,
                        direct,
                        last & live,
                        device.SIGNAL_SET,
                        TRANSPORT,
                        PEER_SCOPE,
                    )
                # Experts e = pid + S * i that no pair selects still get their count 0 (unless
                # their owner is masked): from this program, which owns them by id. After its
                # tokens: their rows and counts are what receivers wait for, so they go first.
                mine = pid + NUM_SENDERS * tl.arange(0, BLOCK_E)
                hits = tl.zeros([BLOCK_E], dtype=tl.int32)
                for p0 in range(0, num_pairs, CHUNK):
                    positions = p0 + flat
                    ids = tl.load(topk_idx_ptr + positions, mask=positions < num_pairs, other=-1)
                    hits += tl.sum((ids[None, :] == mine[:, None]).to(tl.int32), axis=1)
                idle = unmasked(mask_ptr, mine // L, (mine < NUM_EXPERTS) & (hits == 0))
                idle_owner = tl.where(mine < NUM_EXPERTS, mine // L, 0)
                # (Names of their own: the token loop's routes have BLOCK_K lanes, not BLOCK_E.)
                idle_pe, idle_delta, idle_direct = device.open_peer(
                    routes_ptr, rank, idle_owner, TRANSPORT, FORCE_PUT
                )
                idle_sigs = signals + tl.cast(((mine % L) * NUM_RANKS + rank) * 8, tl.int64)
                device.signal_lanes(
                    idle_sigs.to(tl.pointer_type(tl.int64)),
                    tag + 1,
                    idle_pe,
                    idle_delta,
                    idle_direct,
                    idle,
                    device.SIGNAL_SET,
                    TRANSPORT,
                    PEER_SCOPE,
                )

    if ROLE != ROLE_SEND:  # noqa: SIM102 (constexpr, then runtime)
        if pid < NUM_RECEIVERS:
            # ---------------------------------------------------------- receiver: local experts
            rpid = pid
            # Timed from here: in the fused launch the program has sent its share by now.
            deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
            Q: tl.constexpr = NUM_RECEIVERS + (NUM_RECEIVERS == 0)
            # Rounds of experts: in each full round program q owns expert `round * Q + q`. The
            # experts of a last, partial round (M < Q of them) each get HELPERS programs, which
            # copy every HELPERS-th row tile of it: one program holding a second whole expert was
            # the launch's tail (2 ranks sharing an H200, 144 experts on 128 programs: 12-13 rows
            # against 7). In shrink mode an expert keeps one program: programs that wait for the
            # same source could disagree on whether it timed out, and with it on the layout.
            FULL: tl.constexpr = L // Q
            M: tl.constexpr = L - FULL * Q
            PARTIAL: tl.constexpr = M + (M == 0)
            HELPERS: tl.constexpr = 1 if SHRINK else Q // PARTIAL
            ROUNDS: tl.constexpr = FULL + (M > 0)
            tl.static_assert(BLOCK_X >= ROUNDS, "BLOCK_X must cover every round of experts")
            ranks = tl.arange(0, BLOCK_R)
            rank_ok = ranks < NUM_RANKS
            rows_in_tile = tl.arange(0, ROWS)
            # One wait for the counts of all this program's experts (lanes `round * BLOCK_R +
            # source`): waiting expert by expert, each wait was a round trip of its own before
            # the expert's copy could start.
            lanes = tl.arange(0, BLOCK_X * BLOCK_R)
            lane_round = lanes // BLOCK_R
            lane_expert, lane_helper, _ = _receiver_expert(
                lane_round, rpid, Q, FULL, PARTIAL, HELPERS
            )
            lane_rank = lanes % BLOCK_R
            # A fatal error elsewhere in this launch (or an earlier one) stops the wait.
            ok = ok & (stopped(ws) == 0)
            all_counts = tl.zeros([BLOCK_X, BLOCK_R], dtype=tl.int32)
            if ok:
                lane_ok = (lane_round < ROUNDS) & (lane_helper < HELPERS) & (lane_rank < NUM_RANKS)
                sigs = (signals + (lane_expert * NUM_RANKS + lane_rank) * 8).to(
                    tl.pointer_type(tl.int64)
                )
                live = unmasked(mask_ptr, lane_rank, lane_ok)
                values, late, ok = wait_signals_or_give_up(
                    sigs,
                    live,
                    lane_helper == 0,
                    lane_rank,
                    lane_expert,
                    L,
                    tag + 1,
                    tag,
                    deadline,
                    clock_addr,
                    ok,
                    mask_ptr,
                    ws,
                    host,
                    rank,
                    wait_stats_ptr,
                    PHASE,
                    SHRINK,
                    HOST_ERROR,
                    HOST_SHRUNK,
                    ERR_TIMEOUT,
                    BLOCK_X * BLOCK_R,
                    USE_GLOBALTIMER,
                    HAS_WAIT_STATS,
                    PEER_SCOPE,
                )
                all_counts = tl.reshape(
                    tl.where(live & ~late, (values - tag - 1).to(tl.int32), 0), [BLOCK_X, BLOCK_R]
                )
            for round_ in range(0, ROUNDS):
                e, helper, helpers = _receiver_expert(round_, rpid, Q, FULL, PARTIAL, HELPERS)
                if ok & (helper < helpers):
                    # This expert's row of the counts (a masked column sum keeps it in registers).
                    counts = tl.sum(
                        tl.where(tl.arange(0, BLOCK_X)[:, None] == round_, all_counts, 0), axis=0
                    )
                    kept = tl.minimum(counts, MAX_TOKENS)
                    total = tl.sum(kept, axis=0)
                    begin = tl.cumsum(kept, axis=0) - kept
                    if helper == 0:
                        tl.store(recv_count_ptr + e, total)
                        tl.store(
                            layout_range_ptr + e * NUM_RANKS + ranks,
                            (begin.to(tl.int64) << 32) | kept.to(tl.int64),
                            mask=rank_ok,
                        )
                        if HAS_CUMULATIVE:
                            tl.store(
                                cumulative_stats_ptr + e, tl.load(cumulative_stats_ptr + e) + total
                            )
                    # Row i of the expert came from the source whose block holds it: ROWS rows at a
                    # time, every `helpers`-th tile of them.
                    for i0 in range(helper * ROWS, total, helpers * ROWS):
                        i = i0 + rows_in_tile
                        row_ok = i < total
                        holds = (i[:, None] >= begin[None, :]) & (kept[None, :] > 0)
                        src = tl.maximum(tl.max(tl.where(holds, ranks[None, :], -1), axis=1), 0)
                        src_begin = tl.sum(
                            tl.where(ranks[None, :] == src[:, None], begin[None, :], 0), axis=1
                        )
                        slot = (
                            recv
                            + tl.cast((e * NUM_RANKS + src) * MAX_TOKENS + i - src_begin, tl.int64)
                            * SLOT_BYTES
                        )
                        out_row = tl.cast(e * SLOTS + i, tl.int64)
                        # Every load of the tile (header, scales, payload) is issued before its
                        # first store: a store that waits for its load holds back the loads after
                        # it, and three round trips per tile were most of a receiver's time (ncu:
                        # the header load and the scale store were the receiver's top stalls).
                        token = tl.load(slot.to(tl.pointer_type(tl.int32)), mask=row_ok)
                        if USE_FP8:
                            groups = tl.arange(0, BLOCK_G)
                            in_scale = row_ok[:, None] & (groups[None, :] < G)
                            scale_rows = (slot + _HEADER + PAYLOAD_BYTES).to(
                                tl.pointer_type(tl.float32)
                            )
                            scales = tl.load(
                                scale_rows[:, None] + groups[None, :],
                                mask=in_scale,
                                other=0.0,
                                cache_modifier=".cg",
                            )
                        copy_rows(
                            slot + _HEADER,
                            recv_x_addr + out_row * PAYLOAD_BYTES,
                            row_ok,
                            PAYLOAD_BYTES // 4,
                            BLOCK_W,
                            "",  # (evict_first: PTX takes no .cg beside it)
                            PAYLOAD_BYTES // 4 > BLOCK_W,  # a row of several blocks: pipelined
                            ALIGNED,
                            "evict_first",  # each received row is read once
                        )
                        tl.store(src_info_ptr + out_row, token, mask=row_ok)
                        if USE_FP8:
                            # Column-major outputs: element (e, g, i) of a contiguous [L, G', R*T]
                            # tensor.
                            if USE_UE8M0:
                                P: tl.constexpr = (G + 3) // 4
                                words = tl.reshape(
                                    ue8m0_pack(
                                        tl.reshape(scales, [ROWS * BLOCK_G]),
                                        tl.reshape(in_scale, [ROWS * BLOCK_G]),
                                    ),
                                    [ROWS, BLOCK_G // 4],
                                )
                                w = tl.arange(0, BLOCK_G // 4)
                                tl.store(
                                    recv_scales_ptr
                                    + tl.cast(e * P + w[None, :], tl.int64) * SLOTS
                                    + i[:, None],
                                    words,
                                    mask=row_ok[:, None] & (w[None, :] < P),
                                )
                            else:
                                tl.store(
                                    recv_scales_ptr
                                    + tl.cast(e * G + groups[None, :], tl.int64) * SLOTS
                                    + i[:, None],
                                    scales,
                                    mask=in_scale,
                                )
    release_next_launch(EARLY_LAUNCH)


class DispatchPlan(RolePlan):
    """The LL dispatch launches of one geometry on one Buffer (`regions`: its `LowLatencyRegions`).

    `launch(role, ...)`: `ROLE_BOTH` is the fused call (one cooperative grid whose programs send,
    then receive), `ROLE_SEND` / `ROLE_RECV` the two launches of a hooked call.
    """

    def __init__(
        self,
        memory,
        ctx,
        regions: LowLatencyRegions,
        *,
        num_topk: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        grids: dict,
        shrink: bool,
        has_cumulative: bool,
        has_wait_stats: bool,
        num_warps: int,
        mask: torch.Tensor,
        workspace: torch.Tensor,
        arrivals: torch.Tensor,
    ):
        # Each sender signals the idle experts among `pid + S * [0, BLOCK_E)`: enough lanes for
        # the smallest sender grid of the plan's roles.
        senders = min((senders for senders, _ in grids.values() if senders > 0), default=1)
        receivers = min((receivers for _, receivers in grids.values() if receivers > 0), default=1)
        block_e = pow2(-(-regions.num_experts // senders))
        block_k = pow2(num_topk)
        super().__init__(
            _dispatch_kernel,
            memory,
            ctx,
            regions,
            grids,
            shrink,
            protocol.PHASE_LL_DISPATCH,
            # Arrivals of (set p, expert e) at `p * E + e`: int32, >= 2E entries of this rank's
            # memory, zero before the first launch; every launch leaves them at 0.
            (mask, workspace, arrivals),
            NUM_TOPK=num_topk,
            USE_FP8=use_fp8,
            ROUND_SCALE=round_scale,
            USE_UE8M0=use_ue8m0,
            HAS_CUMULATIVE=has_cumulative,
            HAS_WAIT_STATS=has_wait_stats,
            # Routing scans compare [BLOCK_K or BLOCK_E, CHUNK] tiles: at most 8192 elements
            # (32 per thread with 8 warps).
            CHUNK=min(pow2(regions.max_tokens * num_topk), max(16, 8192 // max(block_k, block_e))),
            BLOCK_K=block_k,
            BLOCK_E=block_e,
            ROWS=4,
            BLOCK_G=max(pow2(regions.num_groups), 4),
            BLOCK_R=pow2(regions.num_ranks),
            # Local experts per receiver, for the smallest receiver grid of the plan's roles.
            BLOCK_X=pow2(-(-(regions.num_experts // regions.num_ranks) // receivers)),
            # Receiver copies: an FP8 payload (hidden / 4 words) in one [ROWS, BLOCK_W] block, a
            # BF16 one in blocks of 1024 words whose loads run one block ahead (the registers of
            # two blocks of 2048 without that).
            BLOCK_W=min(2048 if use_fp8 else 1024, pow2(regions.hidden // (4 if use_fp8 else 2))),
            num_warps=num_warps,
        )

    def launch(
        self,
        role: int,
        stream,
        parity: int,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_tokens: int,
        outputs,
        cumulative_stats,
        wait_stats,
    ) -> None:
        """One launch on `stream`; `outputs`: `AddressedTensors` of (recv_x, recv_scales or None,
        recv_count, src_info, layout_range). The caller's tensors go as addresses too once the
        kernel is compiled: the launcher then skips its pointer query per tensor."""
        launch, (x, topk_idx, cumulative, wait), outs = self._kernels[role].choose(
            (x, topk_idx, cumulative_stats, wait_stats), outputs
        )
        _, recv_scales, recv_count, src_info, layout_range = outs
        launch(
            self._grid[role],
            stream,
            x,
            topk_idx,
            outputs.addresses[0],  # recv_x as an address: FP8 or BF16 rows, one kernel parameter
            recv_scales if recv_scales is not None else recv_count,
            src_info,
            layout_range,
            recv_count,
            cumulative if cumulative is not None else recv_count,
            wait if wait is not None else layout_range,
            num_tokens,
            parity,
        )
