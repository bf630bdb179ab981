"""Low-latency combine: each expert output row back to its token, summed with the top-k weights.

Problem: after an LL dispatch with handle h, local expert e of rank r holds `x[e] [R*T, H]` bf16,
row i answering row i of the dispatch. Token t of rank s must become
`bf16(sum_k w[t, k] * y(topk_idx[t, k], t))` in fp32, over the k whose expert is selected and
whose owner is not masked (reference §13.3), rows optionally sent as LogFMT-10 (§14.10).

Algorithm (one persistent launch; `ROLE` as in dispatch, whose fused launch every program runs
as a sender, then as a receiver):
* senders (programs `[0, S)`) own rows, not blocks. The handle's layout ranges list blocks `b = e *
  R + s` (rows `[begin, begin + count)` of expert e came from rank s); numbered block after block,
  all received rows are `0 .. N-1` (a prefix over the counts says which block holds row i), and
  program pid takes rows `pid, pid + S, ...`, ROWS at a time. Each row goes to slot `g * T + t` of
  set p on rank s, g = r * L + e the expert's global id and t its token (`src_info`): plain stores
  where s is mapped, else a put from this rank's send region (where zero-copy rows already are, BF16
  rows are staged at the same place, LogFMT rows in a per-program ring). Rows for masked ranks are
  not sent. Once all its rows are stored (and its puts complete: `quiet`), the program adds 1 per
  row to the arrival counter of the row's block (`arrivals[p, b]`, this rank's memory; acq_rel at
  the peer scope, system or GPU (`PEER_SCOPE`, `common/sync.memory_scope`): it publishes the
  program's rows and acquires those of the block's earlier arrivals). The arrival that completes a
  block resets its counter to 0 for the next call of set p and sets signal g on rank s to `epoch <<
  32 | 1`; the signal is skipped for a masked rank or a stopped buffer, whose rows still count, so
  every counter returns to 0. Empty blocks are signalled at the start by program `b % S`, like every
  block of an unmasked rank.
* receivers (programs `[0, Q)`) own tokens `rpid, rpid + Q, ...`, up to BLOCK_T at a time:
  one wait for the signals of all those tokens' experts (masked owners are skipped; in shrink mode
  an owner that times out is masked), then per token and chunk of RECV_CHUNK_G 128-channel groups
  the K rows are loaded together and accumulated in ascending k, `acc = acc + w * y` in fp32,
  rounded once to bf16. Tokens with no valid entry give zeros.
Senders never wait, and a program receives only after it has sent (see dispatch for why the
waits end, and for the interpreter's two launches).

Why rows: at DeepEP's decode shape (128 tokens, top-8 of 288 experts, EP2) a rank returns about
1024 rows of 14 KB in 288 blocks of 3.5 rows on average. Owning blocks, each of 64 senders ran
about 4.5 blocks one after another, each a chain of table loads, row copies and a system-scope
release; owning rows, a sender copies its rows back to back and pays one release for all of
them, and a receiver one wait for all its tokens instead of one per token.

Example: R=2, L=1, token 0 of rank 0 selected experts [0, 1] with weights [0.5, 2.0]; expert 0
(rank 0) returns 1.0 for it and expert 1 (rank 1) returns 3.0 -> out[0] = 0.5 + 6.0 = 6.5.
Senders, S=2 on rank 1 with blocks (e=0, s=0) of 3 rows and (0, 1) of none: program 0 sends flat
rows 0 and 2, program 1 row 1 and signals the empty block 1 (1 % S = 1) on rank 1; whichever
program counts the block's third arrival sets signal 1 on rank 0.
"""

import torch
import triton
import triton.language as tl

from ... import protocol
from ...transport import device
from ..common.casting import round_to
from ..common.codecs import logfmt_decode, logfmt_encode, logfmt_load, logfmt_store
from ..common.launch import pow2
from ..common.naming import named_kernel
from ..common.sync import now_ns, release_next_launch, wait_previous_launch
from ..common.tiles import copy_rows, discard_rows, lane
from .regions import LowLatencyRegions
from .sync import (
    ROLE_BOTH,
    ROLE_RECV,
    ROLE_SEND,
    RolePlan,
    open_launch,
    stopped,
    unmasked,
    wait_signals_or_give_up,
)


@triton.jit
def _block_of(rows, ends):
    """(block b, its first flat row) `[len(rows)]` of each of `rows` in the flat numbering whose
    blocks end at `ends` (inclusive prefix of the counts): every block before b ends at or before
    the row (empty blocks included), b itself after it."""
    before = ends[None, :] <= rows[:, None]
    b = tl.sum(before.to(tl.int32), axis=1)
    return b, tl.max(tl.where(before, ends[None, :], 0), axis=1)


@triton.jit
def _per_group(values, GROUPS: tl.constexpr):
    """`[ROWS]` -> `[ROWS * GROUPS]`: each row's value repeated for each of its group rows."""
    ROWS: tl.constexpr = values.shape[0]
    return tl.reshape(tl.broadcast_to(values[:, None], (ROWS, GROUPS)), (ROWS * GROUPS,))


@triton.jit
def _signal_blocks(
    b,
    todo,
    ok,
    mask_ptr,
    routes_ptr,
    rank,
    signals,
    value,
    L: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """Set signal `rank * L + e` of rank s to `value` for each `todo` lane of the blocks
    `b = e * R + s`, unless s is masked or the buffer stopped (`ok` false)."""
    s = b % NUM_RANKS
    live = unmasked(mask_ptr, s, todo & ok)
    pe, delta, direct = device.open_peer(routes_ptr, rank, s, TRANSPORT, FORCE_PUT)
    sigs = signals + tl.cast(rank * L + b // NUM_RANKS, tl.int64) * 8
    device.signal_lanes(
        sigs.to(tl.pointer_type(tl.int64)),
        value,
        pe,
        delta,
        direct,
        live,
        device.SIGNAL_SET,
        TRANSPORT,
        PEER_SCOPE,
    )


@named_kernel("ll", "combine", do_not_specialize=["rank", "num_tokens", "parity"])
def _combine_kernel(
    x_addr,
    topk_idx_ptr,
    topk_weights_ptr,
    src_info_ptr,
    layout_range_ptr,
    out_ptr,
    wait_stats_ptr,
    num_tokens,
    parity,
    mask_ptr,
    workspace_ptr,
    arrivals_ptr,
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
    USE_LOGFMT: tl.constexpr,
    ZERO_COPY: tl.constexpr,
    SIGNALS0: tl.constexpr,
    SIGNALS_STRIDE: tl.constexpr,
    RECV0: tl.constexpr,
    RECV_STRIDE: tl.constexpr,
    SEND0: tl.constexpr,
    SEND_STRIDE: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    STAGE_ROWS: tl.constexpr,
    NUM_SENDERS: tl.constexpr,
    NUM_RECEIVERS: tl.constexpr,
    ROLE: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    SHRINK: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_SHRUNK: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SCAN: tl.constexpr,
    CHUNK_G: tl.constexpr,
    RECV_CHUNK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_LINES: tl.constexpr,
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
    SLOTS: tl.constexpr = NUM_RANKS * MAX_TOKENS
    ROW_BYTES: tl.constexpr = 2 * HIDDEN
    ALIGNED: tl.constexpr = SLOT_BYTES % 16 == 0
    # A fused call returns after its receivers: until then x is the caller's, and this rank's own
    # rows are read there instead of being copied into its receive slots and read again (at EP2
    # half the rows; a third of the combine's memory traffic on a GPU that two ranks share).
    # LogFMT rows go through the wire format on every path, and a hooked call's x may be reused
    # once its send phase has returned.
    READ_OWN: tl.constexpr = (ROLE == ROLE_BOTH) & (USE_LOGFMT == 0)
    ws = workspace_ptr
    host = host_addr.to(tl.pointer_type(tl.int64))
    tag, ok = open_launch(ws, parity, ROLE)
    signals = rdma_base + SIGNALS0 + parity * SIGNALS_STRIDE
    recv = rdma_base + RECV0 + parity * RECV_STRIDE
    send = rdma_base + SEND0 + parity * SEND_STRIDE

    if ROLE != ROLE_RECV:  # noqa: SIM102 (constexpr, then runtime)
        if pid < NUM_SENDERS:
            # -------------------------------------------------------------------- sender: rows
            # Blocks b = e * R + s (the handle's layout ranges, row-major) and where their rows fall
            # when all received rows are numbered block after block.
            blocks = tl.arange(0, BLOCK_B)
            in_range = blocks < NUM_EXPERTS
            packed = tl.load(layout_range_ptr + blocks, mask=in_range, other=0)
            sent_block = in_range
            if READ_OWN:
                # This rank's own rows stay in x, where its receivers read them.
                sent_block = sent_block & (blocks % NUM_RANKS != rank)
            counts = tl.where(sent_block, (packed & 0xFFFFFFFF).to(tl.int32), 0)
            # Only the ends stay in registers through the loops (begin and count are reloaded per
            # tile from the cached table): keeping starts and per-block row offsets as well took 50
            # more registers per thread at E = 288 (sm_90 AOT).
            ends = tl.cumsum(counts, axis=0)
            total = tl.sum(counts, axis=0)
            # Empty blocks still get their signal, as every block of an unmasked rank does.
            _signal_blocks(
                blocks,
                sent_block & (counts == 0) & (blocks % NUM_SENDERS == pid),
                ok,
                mask_ptr,
                routes_ptr,
                rank,
                signals,
                tag + 1,
                L,
                NUM_RANKS,
                TRANSPORT,
                FORCE_PUT,
                PEER_SCOPE,
            )
            mine = (total - pid + NUM_SENDERS - 1) // NUM_SENDERS  # rows pid, pid + S, ... < total
            tile = tl.arange(0, ROWS)
            staged = pid * 0  # LogFMT rows staged in this program's ring since it was last drained
            put_rows = pid * 0  # rows this program sent by put: completed before they are counted
            for n0 in range(0, mine, ROWS):
                n = n0 + tile
                flat = pid + n * NUM_SENDERS
                b, start = _block_of(flat, ends)
                b = tl.where(n < mine, b, 0)
                e = b // NUM_RANKS
                s = b % NUM_RANKS
                live = unmasked(mask_ptr, s, (n < mine) & ok)  # masked ranks get nothing
                # Flat row i of block b is row `begin + i - start` of expert e.
                block_range = tl.load(layout_range_ptr + b, mask=live, other=0)
                begin = block_range >> 32
                row = tl.cast(e, tl.int64) * SLOTS + begin + flat - start
                t = tl.load(src_info_ptr + row, mask=live, other=0)
                # A token that selected expert e twice has two adjacent rows in the block (dispatch
                # keeps k order), both bound for slot (g, t): only the later one is sent, so the
                # slot does not depend on which program stores last. Both rows are still counted
                # below.
                later = live & (flat + 1 - start < (block_range & 0xFFFFFFFF).to(tl.int32))
                repeated = later & (tl.load(src_info_ptr + row + 1, mask=later, other=-1) == t)
                live = live & ~repeated
                pe, delta, direct = device.open_peer(routes_ptr, rank, s, TRANSPORT, FORCE_PUT)
                slot = recv + (tl.cast(rank * L + e, tl.int64) * MAX_TOKENS + t) * SLOT_BYTES
                put = live & ~direct
                by_put = tl.sum(put.to(tl.int32), axis=0)
                put_rows += by_put
                if USE_LOGFMT:
                    # A ring of STAGE_ROWS staging rows per program: before it is reused, the puts
                    # that read it must be complete.
                    tl.static_assert(STAGE_ROWS >= ROWS, "a LogFMT tile must fit the staging ring")
                    if staged + by_put > STAGE_ROWS:
                        device.quiet(TRANSPORT)
                        staged = pid * 0
                    ring = staged + tl.cumsum(put.to(tl.int32), axis=0) - 1
                    stage = send + tl.cast(pid * STAGE_ROWS + ring, tl.int64) * SLOT_BYTES
                    staged += by_put
                    dst = tl.where(direct, slot + delta, stage)
                    # CHUNK_G groups of each row per step; group g of tile row r is group row
                    # r * CHUNK_G + g.
                    for c0 in range(0, G, CHUNK_G):
                        groups = c0 + tl.arange(0, ROWS * CHUNK_G) % CHUNK_G
                        in_row = _per_group(live, CHUNK_G) & (groups < G)
                        xp = (_per_group(x_addr + row * ROW_BYTES, CHUNK_G) + groups * 256).to(
                            tl.pointer_type(tl.bfloat16)
                        )[:, None] + tl.arange(0, 128)[None, :]
                        wire, meta = logfmt_encode(
                            tl.load(xp, mask=in_row[:, None], other=0.0), INTERPRETED
                        )
                        logfmt_store(_per_group(dst, CHUNK_G), groups, in_row, wire, meta, HIDDEN)
                    put_source = stage
                    PUT_WORDS: tl.constexpr = SLOT_BYTES // 4
                else:
                    # Zero-copy rows (and staged ones) sit in the send region at their place in x.
                    staged_rows = send + row * ROW_BYTES
                    source = staged_rows if ZERO_COPY else x_addr + row * ROW_BYTES
                    copy_rows(
                        source,
                        tl.where(direct, slot + delta, staged_rows),
                        (live & direct) if ZERO_COPY else live,
                        ROW_BYTES // 4,
                        BLOCK_W,
                        "",
                        # The loads of a row's next block go out before this block's stores: without
                        # that, each of a BF16 row's four blocks was a round trip of its own (ncu:
                        # the copy's stores, waiting on their loads, held 25% of the stall samples).
                        True,
                        ALIGNED,
                    )
                    put_source = staged_rows
                    PUT_WORDS: tl.constexpr = ROW_BYTES // 4
                # Each pick is a block reduction: none where every row of the tile went by stores.
                if by_put > 0:
                    for r in tl.static_range(ROWS):
                        if lane(put.to(tl.int32), tile, r) > 0:
                            device.put_nbi_block(
                                lane(slot, tile, r).to(tl.pointer_type(tl.int32)),
                                lane(put_source, tile, r).to(tl.pointer_type(tl.int32)),
                                PUT_WORDS,
                                lane(pe, tile, r),
                                lane(delta, tile, r),
                                False,
                                TRANSPORT,
                                BLOCK_W,
                            )
            tl.debug_barrier()  # every thread's rows are stored before any of them is counted
            if put_rows > 0:
                device.quiet(TRANSPORT)  # the rows put are delivered before they are counted
            # Arrivals: one per row, in this program's order again; the last arrival of a block
            # signals it.
            arrivals = arrivals_ptr + parity * NUM_EXPERTS
            lanes = tl.arange(0, BLOCK_N)
            for n0 in range(0, mine, BLOCK_N):
                n = n0 + lanes
                arrived = n < mine
                b, _ = _block_of(pid + n * NUM_SENDERS, ends)
                b = tl.where(arrived, b, 0)
                count = (tl.load(layout_range_ptr + b, mask=arrived, other=0) & 0xFFFFFFFF).to(
                    tl.int32
                )
                # Publishes this program's rows (peer scope: they went to peers) and acquires the
                # rows of the block's earlier arrivals, which the signal below then publishes.
                before = tl.atomic_add(
                    arrivals + b, 1, mask=arrived, sem="acq_rel", scope=PEER_SCOPE
                )
                complete = arrived & (before + 1 == count)
                tl.store(arrivals + b, 0, mask=complete)  # the next call of this set starts from 0
                _signal_blocks(
                    b,
                    complete,
                    ok,
                    mask_ptr,
                    routes_ptr,
                    rank,
                    signals,
                    tag + 1,
                    L,
                    NUM_RANKS,
                    TRANSPORT,
                    FORCE_PUT,
                    PEER_SCOPE,
                )
    if ROLE != ROLE_SEND:  # noqa: SIM102 (constexpr, then runtime)
        if pid < NUM_RECEIVERS:
            # -------------------------------------------------------------------- receiver: tokens
            rpid = pid
            # Timed from here: in the fused launch the program has sent its share by now.
            deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
            Q: tl.constexpr = NUM_RECEIVERS + (NUM_RECEIVERS == 0)
            mine = (num_tokens - rpid + Q - 1) // Q  # tokens rpid, rpid + Q, ... < num_tokens
            # Lanes `j * BLOCK_K + k`: entry k of the batch's token j.
            entries = tl.arange(0, BLOCK_T * BLOCK_K)
            batch = tl.arange(0, BLOCK_T)
            ks = tl.arange(0, BLOCK_K)
            for n0 in range(0, mine, BLOCK_T):
                # A fatal error elsewhere in this launch (or an earlier one) stops every further
                # wait.
                ok = ok & (stopped(ws) == 0)
                if ok:
                    k = entries % BLOCK_K
                    n = n0 + entries // BLOCK_K
                    flat = (rpid + n * Q) * NUM_TOPK + k
                    in_batch = (n < mine) & (k < NUM_TOPK)
                    idx = tl.load(topk_idx_ptr + flat, mask=in_batch, other=-1).to(tl.int32)
                    weights = tl.load(topk_weights_ptr + flat, mask=in_batch, other=0.0)
                    owner = tl.where(idx >= 0, idx // L, 0)
                    valid = (idx >= 0) & (idx < NUM_EXPERTS)
                    valid = unmasked(mask_ptr, owner, valid)
                    token = rpid + n * Q  # each lane's token
                    # Address of each entry's row (0: none): slot (g, t) of this set's receive
                    # region, or with READ_OWN, for this rank's own experts, the row in x (the
                    # send region when zero-copy) that dispatch placed at `begin + nth` of the
                    # expert's block from this rank, nth the pairs before (t, k) selecting it
                    # (the dispatch senders' count).
                    rows = (
                        recv + (tl.maximum(idx, 0).to(tl.int64) * MAX_TOKENS + token) * SLOT_BYTES
                    )
                    remote = valid
                    if READ_OWN:
                        own = valid & (owner == rank)
                        remote = valid & ~own
                        local = tl.where(own, idx - rank * L, 0)
                        block_range = tl.load(
                            layout_range_ptr + local * NUM_RANKS + rank, mask=own, other=0
                        )
                        # Per lane, one sum of two counts: the pairs selecting its expert before
                        # (t, k) (low 24 bits), and those later in the same token (from bit 24).
                        counted = tl.zeros([BLOCK_T * BLOCK_K], dtype=tl.int32)
                        token_end = (token + 1) * NUM_TOPK
                        positions0 = tl.arange(0, SCAN)
                        for p0 in range(0, num_tokens * NUM_TOPK, SCAN):
                            positions = p0 + positions0
                            ids = tl.load(
                                topk_idx_ptr + positions,
                                mask=positions < num_tokens * NUM_TOPK,
                                other=-1,
                            ).to(tl.int32)
                            same = ids[None, :] == idx[:, None]
                            before = same & (positions[None, :] < flat[:, None])
                            later = (
                                same
                                & (positions[None, :] > flat[:, None])
                                & (positions[None, :] < token_end[:, None])
                            )
                            counted += tl.sum(
                                before.to(tl.int32) + later.to(tl.int32) * (1 << 24), axis=1
                            )
                        nth = counted & 0xFFFFFF
                        rows_in_block = (block_range & 0xFFFFFFFF).to(tl.int32)
                        # A pair beyond the block's rows was not dispatched: it adds nothing. A
                        # token that selected the expert several times reads the row of its last
                        # pair each time, as through the slot (g, t), which the sender fills from
                        # that row (rows of one token are adjacent in k order; the last present).
                        own = own & (nth < rows_in_block)
                        last = tl.minimum(nth + (counted >> 24), rows_in_block - 1)
                        own_rows = (send if ZERO_COPY else x_addr) + (
                            tl.cast(local, tl.int64) * SLOTS + (block_range >> 32) + last
                        ) * ROW_BYTES
                        rows = tl.where(own, own_rows, rows)
                        valid = own | remote
                    sigs = (signals + tl.maximum(idx, 0).to(tl.int64) * 8).to(
                        tl.pointer_type(tl.int64)
                    )
                    # One wait for the whole batch: the signals of every token's experts.
                    values, late, ok = wait_signals_or_give_up(
                        sigs,
                        remote,
                        remote,
                        owner,
                        tl.full([BLOCK_T * BLOCK_K], -1, tl.int32),
                        -1,
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
                        BLOCK_T * BLOCK_K,
                        USE_GLOBALTIMER,
                        HAS_WAIT_STATS,
                        PEER_SCOPE,
                    )
                    valid = valid & ~late
                    # Rows received in this rank's slots (not those read in x): dead once summed.
                    dead = tl.reshape(tl.where(valid & remote, rows, 0), (BLOCK_T, BLOCK_K))
                    rows = tl.reshape(tl.where(valid, rows, 0), (BLOCK_T, BLOCK_K))
                    weights = tl.reshape(tl.where(valid, weights, 0.0), (BLOCK_T, BLOCK_K))
                    chunk = tl.arange(0, RECV_CHUNK_G)
                    cols = tl.arange(0, 128)
                    for j in range(0, tl.minimum(mine - n0, BLOCK_T)):
                        t = rpid + (n0 + j) * Q
                        slots = tl.sum(tl.where(batch[:, None] == j, rows, 0), axis=0)
                        w = tl.sum(tl.where(batch[:, None] == j, weights, 0.0), axis=0)
                        out_row = (out_ptr + tl.cast(t, tl.int64) * HIDDEN).to(
                            tl.pointer_type(tl.bfloat16)
                        )
                        for c0 in range(0, G, RECV_CHUNK_G):
                            groups = c0 + chunk
                            offsets = groups[:, None] * 128 + cols[None, :]
                            in_row = (groups < G)[:, None] & (cols[None, :] >= 0)
                            acc = tl.zeros([RECV_CHUNK_G, 128], dtype=tl.float32)
                            # BF16: the K entries unrolled; masked, not branched, loads, so the
                            # compiler may issue the K loads of a chunk together. LogFMT: one entry
                            # per trip (unrolled, its K sets of region pointers and decodes took 216
                            # registers: one program per SM). An unused entry adds 0 * 0 = +0.0,
                            # which leaves acc unchanged (acc starts at +0.0, and a sum is -0.0 only
                            # of two -0.0s): bit-exact with the reference.
                            UNROLL: tl.constexpr = 1 if USE_LOGFMT else NUM_TOPK
                            for k0 in range(0, NUM_TOPK, UNROLL):
                                for u in tl.static_range(UNROLL):
                                    kk = k0 + u
                                    slot = lane(slots, ks, kk)
                                    if USE_LOGFMT:
                                        wire, meta = logfmt_load(
                                            slot + groups * 0,
                                            groups,
                                            (groups < G) & (slot != 0),
                                            HIDDEN,
                                        )
                                        y = logfmt_decode(wire, meta, INTERPRETED)
                                    else:
                                        yp = slot.to(tl.pointer_type(tl.bfloat16)) + offsets
                                        # Alignment is lost in the lane pick, and 16-byte
                                        # vectors need it.
                                        if ALIGNED:
                                            yp = tl.max_contiguous(
                                                tl.multiple_of(yp, [16, 16]), [1, 128]
                                            )
                                        y = tl.load(
                                            yp,
                                            mask=in_row & (slot != 0),
                                            other=0.0,
                                            cache_modifier=".cg",
                                        ).to(tl.float32)
                                    acc = acc + lane(w, ks, kk) * y
                            tl.store(
                                out_row + offsets,
                                round_to(acc, tl.bfloat16, INTERPRETED),
                                mask=in_row,
                            )
                        if (USE_LOGFMT == 0) & (INTERPRETED == 0):
                            # The token's received rows are dead once every thread has summed
                            # its part: no write-back for them (`tiles.discard_rows`).
                            tl.debug_barrier()
                            gone = tl.sum(tl.where(batch[:, None] == j, dead, 0), axis=0)
                            discard_rows(gone, gone != 0, ROW_BYTES, BLOCK_LINES)
    release_next_launch(EARLY_LAUNCH)


# Groups x entries a BF16 combine receiver loads per step: 16 groups at top-8. Every step picks each
# entry's row and weight again (block reductions); 16 groups per step instead of 8 took the receive
# phase from 10.5-12.2 to 9.4-10.4 us (2 ranks sharing an H200, 2026-12-02-h200-llrecv-*-b4ab6a3).
_BF16_RECV_ELEMENTS = 128


class CombinePlan(RolePlan):
    """The LL combine launches of one geometry on one Buffer (see `dispatch.DispatchPlan`);
    `arrivals`: int32, >= 2E entries (one per buffer set and block), zero before the first launch,
    and every launch leaves them at 0."""

    def __init__(
        self,
        memory,
        ctx,
        regions: LowLatencyRegions,
        *,
        num_topk: int,
        use_logfmt: bool,
        zero_copy: bool,
        grids: dict,
        shrink: bool,
        has_wait_stats: bool,
        num_warps: int,
        mask: torch.Tensor,
        workspace: torch.Tensor,
        arrivals: torch.Tensor,
    ):
        max_senders = max(senders for senders, _ in grids.values())
        max_receivers = max(receivers for _, receivers in grids.values())
        block_k = pow2(num_topk)
        block_g = max(pow2(regions.num_groups), 4)
        # A receiver's tokens in one wait (all of them while T / Q <= 16).
        block_t = min(16, pow2(-(-regions.max_tokens // max(1, max_receivers))))
        super().__init__(
            _combine_kernel,
            memory,
            ctx,
            regions,
            grids,
            shrink,
            protocol.PHASE_LL_COMBINE,
            (mask, workspace, arrivals),
            NUM_TOPK=num_topk,
            USE_LOGFMT=use_logfmt,
            ZERO_COPY=zero_copy,
            STAGE_ROWS=max(1, regions.send_stride // regions.slot_bytes // max_senders),
            HAS_WAIT_STATS=has_wait_stats,
            # Registers: at most 128 per thread (two programs of 8 warps per SM,
            # protocol.ll_register_cap). sm_90 AOT at DeepEP's shape: BF16 124 (zero-copy 116),
            # LogFMT 128 without spills; [8, 2048]-word sender tiles spill 120-136 bytes, and LogFMT
            # as whole-row [64, 128] tiles took 228 (one program per SM: two ranks sharing a GPU
            # could not hold both cooperative launches at once, and one rank's receivers spun until
            # the timeout).
            # Sender tiles: 8 BF16 rows copied as [8, BLOCK_W] words per step, the next block's
            # loads in flight during this one's stores; a LogFMT row is encoded CHUNK_G groups at
            # a time. [8, 512] and [8, 1024] blocks ran alike (combine kernel 34.7-35.2 us, 2 ranks
            # sharing an H200, 2026-12-02-h200-llw-*-9730c8e.json): the senders wait on their
            # loads (ncu: 27% of the kernel's stall samples at the copy's loads, EP1).
            ROWS=1 if use_logfmt else 8,
            BLOCK_W=min(1024, pow2(regions.hidden // 2)),
            # L2 lines of a BF16 row (`tiles.discard_rows`).
            BLOCK_LINES=pow2(2 * regions.hidden // 128 + 1),
            BLOCK_B=pow2(regions.num_experts),
            BLOCK_N=32,
            BLOCK_K=block_k,
            BLOCK_T=block_t,
            # Pairs per step of the scan that finds this rank's own rows (`READ_OWN`): at most
            # 8192 compared per step, as the dispatch's routing scan.
            SCAN=min(pow2(regions.max_tokens * num_topk), max(16, 8192 // (block_t * block_k))),
            # 128-channel groups per LogFMT step (sender and receiver), and per BF16 receiver
            # step, whose K masked loads the compiler issues together (K x 2 KB per group).
            CHUNK_G=min(block_g, max(1, 64 // block_k)),
            RECV_CHUNK_G=min(
                block_g, max(1, (64 if use_logfmt else _BF16_RECV_ELEMENTS) // block_k)
            ),
            num_warps=num_warps,
            # Sums in the reference's order with separate roundings, so results are bit-exact.
            enable_fp_fusion=False,
        )

    def launch(
        self,
        role: int,
        stream,
        parity: int,
        x: torch.Tensor,
        topk_idx,
        topk_weights,
        num_tokens: int,
        src_info,
        layout_range,
        out,
        wait_stats,
    ) -> None:
        """One launch on `stream`; `out`: `AddressedTensors` of (combined output,). The caller's
        tensors go as addresses too once the kernel is compiled (see `DispatchPlan.launch`)."""
        launch, inputs, (combined,) = self._kernels[role].choose(
            (topk_idx, topk_weights, src_info, layout_range, wait_stats), out
        )
        topk_idx, topk_weights, src_info, layout_range, wait = inputs
        launch(
            self._grid[role],
            stream,
            x.data_ptr(),
            topk_idx,
            topk_weights,
            src_info,
            layout_range,
            combined,
            wait if wait is not None else layout_range,
            num_tokens,
            parity,
        )
