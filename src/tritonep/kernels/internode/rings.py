"""Device helpers shared by the internode data kernels: ring addressing, puts of slot ranges,
polling of epoch-tagged counters, and the per-launch failure path.

Every counter is `epoch << 32 | count` (see `regions.py`); a value below the call's tag belongs to
an earlier call and reads as count 0 (the notify handshake guarantees that the earlier call is over
on the peer that owns the ring).
"""

import triton
import triton.language as tl

from ...transport import device
from ..common.sync import STOP_ALL, load_acquire, now_ns, report_error


@triton.jit
def poll(ptrs, seen, mask):
    """`seen` with the masked lanes raised to a fresh acquire-read of `ptrs` (never lowered)."""
    polled = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
    return tl.where(mask & (polled > seen), polled, seen)


@triton.jit
def put_slots(
    ring,
    staging,
    first,
    count,
    capacity,
    pe,
    delta,
    direct,
    SLOT_BYTES: tl.constexpr,
    TRANSPORT: tl.constexpr,
    PUT_BLOCK: tl.constexpr,
):
    """Put slots `[first, first + count)` (ring positions, taken modulo `capacity`) of this rank's
    staging ring `staging` to the same slots of the peer's ring `ring` (both local symmetric
    addresses): one put, or two when the range wraps. Block scope: every thread calls it."""
    q0 = first % capacity
    head = tl.minimum(count, capacity - q0)
    device.put_nbi_block(
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
        device.put_nbi_block(
            ring.to(tl.pointer_type(tl.int32)),
            staging.to(tl.pointer_type(tl.int32)),
            (count - head) * (SLOT_BYTES // 4),
            pe,
            delta,
            direct,
            TRANSPORT,
            PUT_BLOCK,
        )


@triton.jit
def signal_peer(
    routes_ptr, rank, peer, sig, value, TRANSPORT: tl.constexpr, FORCE_PUT: tl.constexpr
):
    """Set the 64-bit signal `sig` (local symmetric address) of RDMA peer `peer` to `value`, ordered
    after everything this program stored or put to that peer before."""
    pe, delta, direct = device.open_peer(routes_ptr, rank, peer, TRANSPORT, FORCE_PUT)
    device.signal_op(
        sig.to(tl.pointer_type(tl.int64)), value, pe, delta, direct, device.SIGNAL_SET, TRANSPORT
    )


@triton.jit
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
    if tl.load(stop, volatile=True) >= epoch:
        ok = ok & False  # another program of this rank (or an earlier call) failed: stop here
    elif now_ns(clock_addr, USE_GLOBALTIMER) > deadline:
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


__all__ = ["idle", "load_acquire", "poll", "put_slots", "signal_peer"]
