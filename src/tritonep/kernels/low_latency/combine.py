"""Low-latency combine: each expert output row back to its token, summed with the top-k weights.

Problem: after an LL dispatch with handle h, local expert e of rank r holds `x[e] [R*T, H]` bf16,
row i answering row i of the dispatch. Token t of rank s must become
`bf16(sum_k w[t, k] * y(topk_idx[t, k], t))` in fp32, over the k whose expert is selected and
whose owner is not masked (reference §13.3), rows optionally sent as LogFMT-10 (§14.10).

Algorithm (one persistent launch; `ROLE` as in dispatch):
* senders (programs `[0, S)`) own blocks `(e, s)` of the handle's layout ranges: rows
  `[begin, begin + count)` of expert e came from rank s. Each row goes to slot `g * T + t` of set
  p on rank s, g = r * L + e the expert's global id and t its token (`src_info`): plain stores
  where s is mapped, else a put from this rank's send region (where zero-copy rows already are,
  BF16 rows are staged at the same place, LogFMT rows in a per-program ring). Then signal g on s
  is set to `epoch << 32 | 1`, after the rows. Blocks of masked ranks are skipped.
* receivers own tokens: wait for the signals of the token's experts (masked owners are skipped;
  in shrink mode an owner that times out is masked), then accumulate in ascending k
  `acc = acc + w * y` in fp32 and round once to bf16. Tokens with no valid entry give zeros.

Example: R=2, L=1, token 0 of rank 0 selected experts [0, 1] with weights [0.5, 2.0]; expert 0
(rank 0) returns 1.0 for it and expert 1 (rank 1) returns 3.0 -> out[0] = 0.5 + 6.0 = 6.5.
"""

import torch
import triton.language as tl

from ... import protocol
from ...transport import device
from ..common.casting import round_to
from ..common.codecs import logfmt_decode, logfmt_encode, logfmt_load, logfmt_store
from ..common.launch import pow2
from ..common.naming import named_kernel
from ..common.sync import now_ns
from ..common.tiles import copy_rows, lane
from .dispatch import group_tile
from .regions import LowLatencyRegions
from .sync import (
    ROLE_RECV,
    WS_STOP,
    RolePlan,
    finish_launch,
    give_up_on,
    open_launch,
    wait_signals,
)


@named_kernel("ll", "combine", do_not_specialize=["rank", "num_tokens", "parity"])
def _combine_kernel(
    x_addr,
    topk_idx_ptr,
    topk_weights_ptr,
    src_info_ptr,
    layout_range_ptr,
    mask_ptr,
    out_ptr,
    wait_stats_ptr,
    workspace_ptr,
    routes_ptr,
    rdma_base,
    rank,
    num_tokens,
    parity,
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
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    L: tl.constexpr = NUM_EXPERTS // NUM_RANKS
    G: tl.constexpr = (HIDDEN + 127) // 128
    SLOTS: tl.constexpr = NUM_RANKS * MAX_TOKENS
    ROW_BYTES: tl.constexpr = 2 * HIDDEN
    ALIGNED: tl.constexpr = SLOT_BYTES % 16 == 0
    ws = workspace_ptr
    host = host_addr.to(tl.pointer_type(tl.int64))
    epoch, tag, ok = open_launch(ws, parity, ROLE)
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    signals = rdma_base + SIGNALS0 + parity * SIGNALS_STRIDE
    recv = rdma_base + RECV0 + parity * RECV_STRIDE
    send = rdma_base + SEND0 + parity * SEND_STRIDE
    groups = tl.arange(0, BLOCK_G)

    if (ROLE != ROLE_RECV) & (pid < NUM_SENDERS):
        # ------------------------------------------------------------- sender: (expert, rank)
        # blocks
        rows_in_tile = tl.arange(0, ROWS)
        staged = pid * 0  # LogFMT rows this program staged (its ring position)
        for b in range(pid, L * NUM_RANKS, NUM_SENDERS):
            e = b // NUM_RANKS
            s = b % NUM_RANKS
            if ok & (tl.load(mask_ptr + s) == 0):
                pe, delta, direct = device.open_peer(routes_ptr, rank, s, TRANSPORT, FORCE_PUT)
                packed = tl.load(layout_range_ptr + b)
                begin = (packed >> 32).to(tl.int32)
                count = (packed & 0xFFFFFFFF).to(tl.int32)
                g = rank * L + e
                if USE_LOGFMT:
                    for j in range(0, count):
                        row = tl.cast(e * SLOTS + begin + j, tl.int64)
                        t = tl.load(src_info_ptr + row)
                        slot = recv + tl.cast(g * MAX_TOKENS + t, tl.int64) * SLOT_BYTES
                        xp, xm = group_tile(x_addr + row * ROW_BYTES, BLOCK_G, G, tl.bfloat16)
                        wire, meta = logfmt_encode(tl.load(xp, mask=xm, other=0.0), INTERPRETED)
                        if direct:
                            logfmt_store(
                                slot + delta + groups * 0, groups, groups < G, wire, meta, HIDDEN
                            )
                        else:
                            # A ring of STAGE_ROWS staging rows per program: before one is reused,
                            # the
                            # put that read it must be complete.
                            if (staged % STAGE_ROWS == 0) & (staged > 0):
                                device.quiet(TRANSPORT)
                            stage = (
                                send
                                + tl.cast(pid * STAGE_ROWS + staged % STAGE_ROWS, tl.int64)
                                * SLOT_BYTES
                            )
                            logfmt_store(stage + groups * 0, groups, groups < G, wire, meta, HIDDEN)
                            device.put_nbi_block(
                                slot.to(tl.pointer_type(tl.int32)),
                                stage.to(tl.pointer_type(tl.int32)),
                                SLOT_BYTES // 4,
                                pe,
                                delta,
                                direct,
                                TRANSPORT,
                                BLOCK_W,
                            )
                            staged += 1
                else:
                    for j0 in range(0, count, ROWS):
                        j = j0 + rows_in_tile
                        row_ok = j < count
                        row = tl.cast(e * SLOTS + begin + j, tl.int64)
                        t = tl.load(src_info_ptr + row, mask=row_ok, other=0)
                        slot = recv + tl.cast(g * MAX_TOKENS + t, tl.int64) * SLOT_BYTES
                        # Zero-copy rows (and staged ones) sit in the send region at their place in
                        # x.
                        staged_rows = send + row * ROW_BYTES
                        source = staged_rows if ZERO_COPY else x_addr + row * ROW_BYTES
                        if direct:
                            copy_rows(
                                source,
                                slot + delta,
                                row_ok,
                                ROW_BYTES // 4,
                                BLOCK_W,
                                "",
                                False,
                                ALIGNED,
                            )
                        else:
                            if not ZERO_COPY:
                                copy_rows(
                                    source,
                                    staged_rows,
                                    row_ok,
                                    ROW_BYTES // 4,
                                    BLOCK_W,
                                    "",
                                    False,
                                    True,
                                )
                            for r in tl.static_range(ROWS):
                                if lane(row_ok.to(tl.int32), rows_in_tile, r) > 0:
                                    device.put_nbi_block(
                                        lane(slot, rows_in_tile, r).to(tl.pointer_type(tl.int32)),
                                        lane(staged_rows, rows_in_tile, r).to(
                                            tl.pointer_type(tl.int32)
                                        ),
                                        ROW_BYTES // 4,
                                        pe,
                                        delta,
                                        direct,
                                        TRANSPORT,
                                        BLOCK_W,
                                    )
                if direct:
                    pass
                else:
                    device.quiet(
                        TRANSPORT
                    )  # the signal must not overtake rows put by this block's threads
                sig = (signals + g * 8).to(tl.pointer_type(tl.int64))
                device.signal_op(sig, tag + 1, pe, delta, direct, device.SIGNAL_SET, TRANSPORT)
    else:
        # -------------------------------------------------------------------- receiver: tokens
        rpid = pid - NUM_SENDERS
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < NUM_TOPK
        for t in range(rpid, num_tokens, NUM_RECEIVERS + (NUM_RECEIVERS == 0)):
            # A fatal error elsewhere in this launch (or an earlier one) stops every further wait.
            ok = ok & (tl.load(ws + WS_STOP, volatile=True) == 0)
            if ok:
                idx = tl.load(topk_idx_ptr + t * NUM_TOPK + ks, mask=k_ok, other=-1).to(tl.int32)
                weights = tl.load(topk_weights_ptr + t * NUM_TOPK + ks, mask=k_ok, other=0.0)
                owner = tl.where(idx >= 0, idx // L, 0)
                valid = (idx >= 0) & (idx < NUM_EXPERTS)
                valid = valid & (tl.load(mask_ptr + owner, mask=valid, other=1) == 0)
                sigs = (signals + tl.maximum(idx, 0).to(tl.int64) * 8).to(tl.pointer_type(tl.int64))
                values, late, waited = wait_signals(
                    sigs, valid, tag + 1, deadline, clock_addr, USE_GLOBALTIMER
                )
                late = late & valid
                if tl.sum(late.to(tl.int32), axis=0) > 0:
                    give_up_on(
                        late,
                        owner,
                        mask_ptr,
                        ws,
                        host,
                        rank,
                        (values - tag).to(tl.int32),
                        1,
                        PHASE,
                        -1,
                        SHRINK,
                        HOST_ERROR,
                        HOST_SHRUNK,
                        ERR_TIMEOUT,
                        BLOCK_K,
                    )
                    ok = ok & SHRINK  # without shrink mode the error record stops this call
                if HAS_WAIT_STATS:
                    tl.atomic_add(wait_stats_ptr + owner, waited, mask=valid, sem="relaxed")
                valid = valid & ~late
                acc = tl.zeros([BLOCK_G, 128], dtype=tl.float32)
                for k in tl.static_range(NUM_TOPK):
                    if lane(valid.to(tl.int32), ks, k) > 0:
                        e = lane(idx, ks, k)
                        w = tl.sum(tl.where(ks == k, weights, 0.0), axis=0)
                        slot = recv + tl.cast(e * MAX_TOKENS + t, tl.int64) * SLOT_BYTES
                        if USE_LOGFMT:
                            wire, meta = logfmt_load(slot + groups * 0, groups, groups < G, HIDDEN)
                            y = logfmt_decode(wire, meta, INTERPRETED)
                        else:
                            yp, ym = group_tile(slot, BLOCK_G, G, tl.bfloat16)
                            y = tl.load(yp, mask=ym, other=0.0, cache_modifier=".cg").to(tl.float32)
                        acc = acc + w * y
                op, om = group_tile(
                    out_ptr + tl.cast(t, tl.int64) * HIDDEN, BLOCK_G, G, tl.bfloat16
                )
                tl.store(op, round_to(acc, tl.bfloat16, INTERPRETED), mask=om)
    finish_launch(ws, parity, epoch, ROLE)


class CombinePlan(RolePlan):
    """The LL combine launches of one geometry on one Buffer (see `dispatch.DispatchPlan`)."""

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
    ):
        max_senders = max(senders for senders, _ in grids.values())
        super().__init__(
            _combine_kernel,
            memory,
            ctx,
            regions,
            grids,
            shrink,
            protocol.PHASE_LL_COMBINE,
            NUM_TOPK=num_topk,
            USE_LOGFMT=use_logfmt,
            ZERO_COPY=zero_copy,
            STAGE_ROWS=max(1, regions.send_stride // regions.slot_bytes // max_senders),
            HAS_WAIT_STATS=has_wait_stats,
            ROWS=4,
            BLOCK_G=max(pow2(regions.num_groups), 4),
            BLOCK_K=pow2(num_topk),
            BLOCK_W=min(2048, pow2(regions.hidden // 2)),
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
        src_info,
        layout_range,
        mask,
        out,
        wait_stats,
        workspace,
    ) -> None:
        head = (
            x.data_ptr(),
            topk_idx,
            topk_weights,
            src_info,
            layout_range,
            mask,
            out,
            wait_stats if wait_stats is not None else layout_range,
            workspace,
        )
        self._launch(role, stream, head, topk_idx.shape[0], parity)
