"""Device helpers shared by the internode data kernels: ring addressing, puts of slot ranges,
polling of epoch-tagged counters, the per-launch failure path, and `direct` (fast helper calls in
the interpreter).

Every counter is `epoch << 32 | count` (see `regions.py`); a value below the call's tag belongs to
an earlier call and reads as count 0 (the notify handshake guarantees that the earlier call is over
on the peer that owns the ring).
"""

import triton
import triton.language as tl

from ... import _env
from ...transport import device
from ..common import casting, sync, tiles
from ..common.sync import STOP_ALL


class _Direct:
    """Interpreter only: a `@triton.jit` helper called as its rewritten Python function.

    Triton's interpreter re-patches `triton.language` on every device-function call
    (`InterpretedFunction.__call__` -> `_patch_lang`: `inspect.getmembers` over four modules),
    about 250 us per call on the CI machine, while the kernel that runs the helper has patched the
    very same modules already. The internode kernels call small helpers thousands of times per
    launch (measured: 43% of a cached dispatch's time went to that patching), so they call them
    through this wrapper, which skips the redundant patching. Compiled kernels see the helper
    itself (`direct` returns it unchanged), so GPU code is untouched.
    """

    __slots__ = ("fn", "_call")

    def __init__(self, fn):
        self.fn = fn
        self._call = None

    def __call__(self, *args, **kwargs):
        call = self._call
        if call is None:
            call = self._call = self.fn.rewrite()
        return call(*args, **kwargs)


def direct(fn):
    """`fn` (a `@triton.jit` helper) as the internode kernels call it: see `_Direct`. Unchanged
    when compiling, and on interpreters without `rewrite` (then calls simply cost more)."""
    if _env.interpret_enabled() and callable(getattr(fn, "rewrite", None)):
        return _Direct(fn)
    return fn


def helper(fn):
    """`@triton.jit` for the internode kernels' own helpers, called through `direct`."""
    return direct(triton.jit(fn))


# Triton's reductions are `@jit` functions of its standard library: each call is a device-function
# call in the interpreter. Shared helpers of other modules likewise.
tsum = direct(tl.sum)
tmax = direct(tl.max)
tmin = direct(tl.min)
targmax = direct(tl.argmax)
tcumsum = direct(tl.cumsum)
row_block = direct(tiles.row_block)
now_ns = direct(sync.now_ns)
deadline_passed = direct(sync.deadline_passed)
past_deadline = direct(sync.past_deadline)
load_uniform = direct(sync.load_uniform)
open_call = direct(sync.open_call)
report_error = direct(sync.report_error)
open_peer = direct(device.open_peer)
put_nbi_block = direct(device.put_nbi_block)
signal_op = direct(device.signal_op)
quiet = direct(device.quiet)
round_to = direct(casting.round_to)


@helper
def lane(vector, lanes, j):
    """`vector[j]` of a `[lanes]` vector (`tiles.lane` over `tsum`)."""
    return tsum(tl.where(lanes == j, vector, 0), axis=0)


@helper
def column(matrix, lanes, j):
    """`matrix[:, j]` of a `[rows, lanes]` tile (`tiles.column` over `tsum`)."""
    return tsum(tl.where(lanes[None, :] == j, matrix, 0), axis=1)


@helper
def cumsum_rows(matrix, ROWS: tl.constexpr, INCLUSIVE: tl.constexpr):
    """Prefix sums down the rows of a small `[ROWS, lanes]` integer tile (`tiles.cumsum_rows`,
    a masked reduction instead of `tcumsum(axis=0)`, whose lowering fails in triton 3.6 for some
    tile layouts)."""
    rows = tl.arange(0, ROWS)
    below = rows[:, None] >= rows[None, :] if INCLUSIVE else rows[:, None] > rows[None, :]
    return tsum(tl.where(below[:, :, None], matrix[None, :, :], 0), axis=1)


@helper
def peer_lanes(
    rank,
    rank_mask_ptr,
    NUM_RANKS: tl.constexpr,
    RANKS_PER_NODE: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
):
    """Where rank (n, l) sits and which of its peers are live (not masked by this rank).

    Returns (n, l, node lanes n', local lanes l', node_live `[BLOCK_LOCAL]`: node peers (n, l')
    live, col_live `[BLOCK_NODES]`: column peers (n', l) live).
    """
    D: tl.constexpr = RANKS_PER_NODE
    node = rank // D
    local = rank % D
    nodes = tl.arange(0, BLOCK_NODES)
    node_ok = nodes < NUM_RANKS // D
    locs = tl.arange(0, BLOCK_LOCAL)
    loc_ok = locs < D
    node_live = loc_ok & (tl.load(rank_mask_ptr + node * D + locs, mask=loc_ok, other=1) == 0)
    col_live = node_ok & (tl.load(rank_mask_ptr + nodes * D + local, mask=node_ok, other=1) == 0)
    return node, local, nodes, locs, node_live, col_live


@helper
def channel_roles(num_channels, FUSED: tl.constexpr):
    """(channel c, sends, forwards) of this program of a data kernel: on the GPU program c plays
    the two end roles of channel c (`sends`) and program C + c its forwarder (`forwards`); FUSED
    (the interpreter), program c plays all three."""
    pid = tl.program_id(0)
    if FUSED:
        c = pid
        sends = pid >= 0
        forwards = pid >= 0
    else:
        c = pid % num_channels
        sends = pid < num_channels
        forwards = pid >= num_channels
    return c, sends, forwards


@helper
def channel_tokens(c, num_tokens, num_channels):
    """`[begin, end)`: the tokens of channel c (a contiguous range of this rank's tokens)."""
    tokens_per_channel = tl.cdiv(num_tokens, num_channels)
    begin = tl.minimum(c * tokens_per_channel, num_tokens)
    return begin, tl.minimum(begin + tokens_per_channel, num_tokens)


@helper
def received_rows(
    gbl_channel_prefix_ptr,
    gbl_rank_prefix_sum_ptr,
    c,
    num_channels,
    NUM_RANKS: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
):
    """(starts, ends) `[BLOCK_RANKS]`: the rows of this rank's receive buffer that came from each
    source rank in channel c (handle entries `recv_gbl_channel_prefix_matrix` and
    `recv_gbl_rank_prefix_sum`; 0 beyond NUM_RANKS)."""
    ranks = tl.arange(0, BLOCK_RANKS)
    rank_ok = ranks < NUM_RANKS
    starts = tl.load(gbl_channel_prefix_ptr + ranks * num_channels + c, mask=rank_ok, other=0)
    last = c + 1 >= num_channels
    ends = tl.where(
        last,
        tl.load(gbl_rank_prefix_sum_ptr + ranks, mask=rank_ok, other=0),
        tl.load(
            gbl_channel_prefix_ptr + ranks * num_channels + c + 1,
            mask=rank_ok & ~last,
            other=0,
        ),
    )
    return starts, ends


@helper
def forwarded_tokens(
    rdma_channel_prefix_ptr,
    rdma_rank_prefix_sum_ptr,
    c,
    num_channels,
    live,
    NUM_NODES: tl.constexpr,
    BLOCK_NODES: tl.constexpr,
):
    """What this rank forwards in channel c, per column peer (n', l) (handle entries
    `recv_rdma_channel_prefix_matrix`, `recv_rdma_rank_prefix_sum`).

    Returns (tokens of (n', c), 0 where `live` is not set; their first row in `send_nvl_head`).
    """
    nodes = tl.arange(0, BLOCK_NODES)
    node_ok = nodes < NUM_NODES
    total = tl.load(rdma_channel_prefix_ptr + nodes * num_channels + c, mask=node_ok, other=0)
    before = tl.load(
        rdma_channel_prefix_ptr + nodes * num_channels + tl.maximum(c - 1, 0),
        mask=node_ok & (c > 0),
        other=0,
    )
    node_first = tl.load(
        rdma_rank_prefix_sum_ptr + tl.maximum(nodes - 1, 0),
        mask=node_ok & (nodes > 0),
        other=0,
    )
    return tl.where(live, total - before, 0), node_first + before


@helper
def wait_at_least(ptrs, targets, mask, deadline, clock_addr, USE_GLOBALTIMER: tl.constexpr):
    """`sync.wait_all_at_least` (spin until every masked `*ptrs >= targets` or the deadline; returns
    the last values, unmasked lanes read as their target) with the clock read inline: in the
    interpreter a spin iteration then costs no device-function call."""
    values = tl.where(mask, tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys"), targets)
    pending = tsum((values < targets).to(tl.int32), axis=0)
    late = pending < 0
    while (pending > 0) & ~late:
        if USE_GLOBALTIMER:
            late = deadline_passed(tl.extra.cuda.globaltimer(), deadline, USE_GLOBALTIMER)
        else:
            late = tl.load(clock_addr.to(tl.pointer_type(tl.int64)), volatile=True) > deadline
        values = tl.where(
            mask, tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys"), targets
        )  # acquires what the signal publishes
        pending = tsum((values < targets).to(tl.int32), axis=0)
    return values


@helper
def copy_rows(
    src_rows,
    dst_rows,
    mask,
    ROW_WORDS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CACHE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """`tiles.copy_rows` (copy `ROW_WORDS` 4-byte words of each masked row between 16-byte aligned
    row addresses, optionally loading block i+1 before storing block i) written without nested
    device-function calls, for the interpreter's sake (see `_Direct`)."""
    words = tl.arange(0, BLOCK_W)
    src = src_rows.to(tl.pointer_type(tl.int32))[:, None] + words[None, :]
    dst = dst_rows.to(tl.pointer_type(tl.int32))[:, None] + words[None, :]
    src = tl.max_contiguous(tl.multiple_of(src, [16, 16]), [1, BLOCK_W])
    dst = tl.max_contiguous(tl.multiple_of(dst, [16, 16]), [1, BLOCK_W])
    if PREFETCH:
        m = mask[:, None] & (words[None, :] < ROW_WORDS)
        vals = tl.load(src, mask=m, cache_modifier=CACHE)
        for w0 in range(BLOCK_W, ROW_WORDS + BLOCK_W, BLOCK_W):
            next_m = mask[:, None] & (words[None, :] + w0 < ROW_WORDS)
            next_vals = tl.load(src + w0, mask=next_m, cache_modifier=CACHE)
            tl.store(dst + (w0 - BLOCK_W), vals, mask=m)
            vals = next_vals
            m = next_m
    else:
        for w0 in range(0, ROW_WORDS, BLOCK_W):
            m = mask[:, None] & (words[None, :] + w0 < ROW_WORDS)
            tl.store(dst + w0, tl.load(src + w0, mask=m, cache_modifier=CACHE), mask=m)


@helper
def poll(ptrs, seen, mask):
    """`seen` with the masked lanes raised to a fresh acquire-read of `ptrs` (never lowered)."""
    polled = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
    return tl.where(mask & (polled > seen), polled, seen)


@helper
def publish_slots(
    ring,
    staging,
    tail,
    first,
    count,
    capacity,
    tag,
    pe,
    delta,
    direct,
    SLOT_BYTES: tl.constexpr,
    TRANSPORT: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    """Publish slots `[first, first + count)` (ring positions, taken modulo `capacity`) of the
    peer's ring `ring`: put them from the same slots of this rank's staging ring `staging` (one put,
    or two when the range wraps) unless this program stored them straight into the ring
    (`direct`), then set the peer's tail signal `tail` to `tag + first + count`, ordered after the
    slots by the device layer. Addresses are local symmetric ones. Block scope: every thread calls
    it."""
    if not direct:
        q0 = first % capacity
        head = tl.minimum(count, capacity - q0)
        put_nbi_block(
            (ring + q0.to(tl.int64) * SLOT_BYTES).to(tl.pointer_type(tl.int32)),
            (staging + q0.to(tl.int64) * SLOT_BYTES).to(tl.pointer_type(tl.int32)),
            head * (SLOT_BYTES // 4),
            pe,
            delta,
            direct,
            TRANSPORT,
            PUT_BLOCK,
        )
        if count > head:
            put_nbi_block(
                ring.to(tl.pointer_type(tl.int32)),
                staging.to(tl.pointer_type(tl.int32)),
                (count - head) * (SLOT_BYTES // 4),
                pe,
                delta,
                direct,
                TRANSPORT,
                PUT_BLOCK,
            )
    signal_op(
        tail.to(tl.pointer_type(tl.int64)),
        tag + (first + count).to(tl.int64),
        pe,
        delta,
        direct,
        device.SIGNAL_SET,
        TRANSPORT,
    )


@helper
def signal_peer(
    routes_ptr, rank, peer, sig, value, TRANSPORT: tl.constexpr, FORCE_PUT: tl.constexpr
):
    """Set the 64-bit signal `sig` (local symmetric address) of RDMA peer `peer` to `value`, ordered
    after everything this program stored or put to that peer before."""
    pe, delta, is_direct = open_peer(routes_ptr, rank, peer, TRANSPORT, FORCE_PUT)
    signal_op(
        sig.to(tl.pointer_type(tl.int64)), value, pe, delta, is_direct, device.SIGNAL_SET, TRANSPORT
    )


@helper
def idle(
    ok,
    stop,
    epoch,
    deadline,
    clock_addr,
    host_error_ptr,
    code,
    rank,
    peer,
    ranks,
    phase,
    channel,
    observed,
    expected,
    BLOCK_RANKS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    """A loop iteration that moved nothing: give up if the buffer failed elsewhere (stop word) or
    the deadline passed (then record a timeout naming `peer`). Returns the new `ok`."""
    if load_uniform(stop) >= epoch:
        ok = ok & False  # another program of this rank (or an earlier call) failed: stop here
    elif past_deadline(deadline, clock_addr, USE_GLOBALTIMER):
        ok = ok & False
        report_error(
            host_error_ptr,
            stop,
            STOP_ALL,
            code,
            rank,
            ranks == peer,
            ranks,
            phase,
            channel,
            observed,
            expected,
            BLOCK_RANKS,
        )
    return ok
