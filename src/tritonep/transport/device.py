"""The one device layer for talking to peers: plain stores where a peer is mapped, NVSHMEM puts
elsewhere.

Problem: the low-latency and internode kernels send to peers of three kinds: peers whose memory
is mapped into this process (same node, or ranks sharing one GPU), peers reachable only through
NVSHMEM (another node), and, on the CPU, peers emulated by `/dev/shm` mappings because the
Triton interpreter can run neither extern calls nor inline PTX. A kernel must be written once.

Design: every call takes the same arguments on every path. A kernel first calls `open_peer`,
which returns `(pe, delta, direct)` for one peer from the heap's route table (see
`transport/nvshmem.py`): `direct` says plain stores reach the peer, `delta` moves a pointer into
this rank's heap to the same offset of the peer's heap as this process sees it, `pe` is the
peer's NVSHMEM PE. Pointers handed to the calls are always *local symmetric addresses* (pointers
into this rank's own heap), as NVSHMEM wants them. The `TRANSPORT` constexpr picks what the put
path compiles to:

| TRANSPORT | compiled to | put path | used when |
|---|---|---|---|
| `STORES` | PTX without NVSHMEM | none: every peer must be mapped | one node, not forced |
| `NVSHMEM` | PTX linked with `libnvshmem_device.bc` | NVSHMEM device calls | other nodes, or forced |
| `EMULATED` | nothing (interpreter) | stores through each rank's `/dev/shm` file | the CPU backend |

`FORCE_PUT` (constexpr) sends every peer, this rank included, down the put path, so the NVSHMEM
calls run on one host between peers that are in fact mapped; with `EMULATED` it routes every peer
through the emulation mapping.

Semantics (the same on every path, so a kernel that works over stores also works over a network):
- `put_nbi_block`: block-scope non-blocking put; complete only after `quiet` (or a signal that
  follows it: `put_signal_nbi_block`, `signal_op`).
- `put_signal_nbi_block`, `signal_op`, `signal_lanes`: the signal update is ordered after everything this program
  stored or put to that peer before the call: whoever sees the signal sees the data. Over stores a
  `tl.debug_barrier()` then a release atomic at system scope by one thread (the protocol of
  `kernels/sync.py`); over NVSHMEM the library's put-with-signal, or `nvshmem_fence` then
  `nvshmemx_signal_op`. Signal words are 64-bit and only ever grow (epoch-tagged values), so a
  waiter compares with `>=`.
- `atomic_add`, `atomic_fetch_add`: 64-bit, *not* ordered after earlier data (like NVSHMEM's
  AMOs); call `fence` first when they publish something.
- `fence`: orders this program's earlier stores/puts to each peer before its later ones.
  `quiet`: completes them (source buffers may be reused). Over stores both are a system-scope
  fence in every thread and a block barrier.
- `wait_until`: a LOCAL spin (acquire loads at system scope) on a signal word of this rank's heap,
  bounded by a deadline like every wait in tritonep; never `nvshmem_signal_wait_until`, which
  cannot time out. This is also how DeepEP waits for RDMA-written counters.

NVSHMEM op codes come from NVSHMEM's own headers (`device_host_transport/`): `NVSHMEM_SIGNAL_SET`
= 9, `NVSHMEM_SIGNAL_ADD` = 10 (torch 2.11's docstrings say 0 and 5). Over peer memory NVSHMEM
treats every code but 9 as an add, so a wrong code passes on one node and fails over a network.

Measured (one H200, 2 rank processes under MPS at 50% each, torch 2.11, triton 3.6, NVSHMEM 3.4.5,
`scripts/nvshmem_check.py`): every case of `tests/collective/nvshmem_cases.py` passes on the store
path, on NVSHMEM-linked kernels storing to mapped peers, and on the forced put path; a 64-byte
put-with-signal round trip takes 2.27 us over stores and 2.54 us through NVSHMEM (mean of 9999).

Constraints:
- Thread-level NVSHMEM calls (signal op, AMOs) run in thread 0 only: Triton executes scalar code
  in every thread, which would repeat an add 32 x num_warps times. Thread 0 is found with inline
  PTX (`%tid.x`) and `atomic_fetch_add` broadcasts its result with a block reduction.
  Block-scope calls (`nvshmemx_*_block`) are made by all threads, as NVSHMEM requires: never call
  them under a condition that differs between threads of a program.
- `fence`/`quiet` call NVSHMEM in every thread: which thread posted a block put, and which queue a
  thread uses, is NVSHMEM's business (per-CTA or per-warp QP mapping), and redundant fences are
  harmless.
- `EMULATED` code is plain Python in the interpreter, which runs one program at a time in program
  order on x86 (TSO): its fences are no-ops and puts complete at once, so CPU tests check the call
  sequence, addressing and routing, not reordering.
- Kernels compiled with `TRANSPORT=NVSHMEM` must be launched through
  `transport.nvshmem.NvshmemKernel(kernel)` (links the device library, initialises the module).
"""

import triton
import triton.language as tl
from triton.language import core

from ..kernels.common.sync import SYSTEM_SCOPE, load_acquire, past_deadline
from ..kernels.common.tiles import lane

STORES = tl.constexpr(0)
NVSHMEM = tl.constexpr(1)
EMULATED = tl.constexpr(2)

SIGNAL_SET = tl.constexpr(9)  # NVSHMEM_SIGNAL_SET, device_host_transport/nvshmem_common_transport.h
SIGNAL_ADD = tl.constexpr(10)  # NVSHMEM_SIGNAL_ADD, same header

ROUTE_COLUMNS = tl.constexpr(3)  # route table row: [mapped base or 0, put-path base, NVSHMEM PE]
_BROADCAST_LANES = tl.constexpr(
    1024
)  # >= threads of any program (32 warps), so no lane is replicated


# --------------------------------------------------------------------------- NVSHMEM device symbols
# `libnvshmem_device.bc` symbols with their C signatures; the library is linked at launch
# (`NvshmemKernel`), hence no library name or path here. Void functions are declared as returning
# int32 and their result is ignored, as torch's own wrappers do.
def _nvshmem_call(symbol, args, arg_types, ret_type, _semantic):
    return core.extern_elementwise(
        "",
        "",
        args,
        {tuple(core.dtype(t) for t in arg_types): (symbol, core.dtype(ret_type))},
        is_pure=False,
        _semantic=_semantic,
    )


@core.extern
def _putmem_nbi_block(dst, src, nbytes, pe, _semantic=None):
    # void nvshmemx_putmem_nbi_block(void *dest, const void *source, size_t bytes, int pe)
    return _nvshmem_call(
        "nvshmemx_putmem_nbi_block",
        [dst, src, nbytes, pe],
        ("int64", "int64", "int64", "int32"),
        "int32",
        _semantic,
    )


@core.extern
def _putmem_signal_nbi_block(dst, src, nbytes, sig, value, op, pe, _semantic=None):
    # void nvshmemx_putmem_signal_nbi_block(void *dest, const void *source, size_t bytes,
    #                                       uint64_t *sig_addr, uint64_t signal, int sig_op, int pe)
    return _nvshmem_call(
        "nvshmemx_putmem_signal_nbi_block",
        [dst, src, nbytes, sig, value, op, pe],
        ("int64", "int64", "int64", "int64", "uint64", "int32", "int32"),
        "int32",
        _semantic,
    )


@core.extern
def _signal_op(sig, value, op, pe, _semantic=None):
    # void nvshmemx_signal_op(uint64_t *sig_addr, uint64_t signal, int sig_op, int pe)
    return _nvshmem_call(
        "nvshmemx_signal_op",
        [sig, value, op, pe],
        ("int64", "uint64", "int32", "int32"),
        "int32",
        _semantic,
    )


@core.extern
def _uint64_atomic_add(target, value, pe, _semantic=None):
    # void nvshmem_uint64_atomic_add(uint64_t *dest, uint64_t value, int pe): NVSHMEM has no int64
    # variant; two's-complement addition makes the unsigned one exact for signed values.
    return _nvshmem_call(
        "nvshmem_uint64_atomic_add",
        [target, value, pe],
        ("int64", "uint64", "int32"),
        "int32",
        _semantic,
    )


@core.extern
def _uint64_atomic_fetch_add(target, value, pe, _semantic=None):
    # uint64_t nvshmem_uint64_atomic_fetch_add(uint64_t *dest, uint64_t value, int pe)
    return _nvshmem_call(
        "nvshmem_uint64_atomic_fetch_add",
        [target, value, pe],
        ("int64", "uint64", "int32"),
        "uint64",
        _semantic,
    )


@core.extern
def _nvshmem_fence(_semantic=None):
    return _nvshmem_call("nvshmem_fence", [], (), "int32", _semantic)


@core.extern
def _nvshmem_quiet(_semantic=None):
    return _nvshmem_call("nvshmem_quiet", [], (), "int32", _semantic)


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _thread_id():
    """`%tid.x` (compiled paths only: the interpreter runs no PTX)."""
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _fence_sys():
    """`fence.acq_rel.sys` in every thread (compiled paths only). The dummy output keeps Triton
    from dropping an asm statement that returns nothing."""
    tl.inline_asm_elementwise(
        "fence.acq_rel.sys;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _u64(value):
    return tl.cast(value, tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _bytes(ptr, nelems):
    return tl.cast(nelems, tl.int64) * ptr.dtype.element_ty.primitive_bitwidth // 8


@triton.jit
def _copy(dst, src, nelems, BLOCK: tl.constexpr):
    """`dst[0:nelems] = src[0:nelems]`, BLOCK elements per step."""
    offsets = tl.arange(0, BLOCK)
    for start in range(0, nelems, BLOCK):
        index = start + offsets
        inside = index < nelems
        tl.store(dst + index, tl.load(src + index, mask=inside), mask=inside)


@triton.jit
def _signal_mapped(sig, value, SIG_OP: tl.constexpr, mask=None, SCOPE: tl.constexpr = SYSTEM_SCOPE):
    """Signal through a mapping (`sig` one pointer, or lanes under `mask`): every store of this
    program before it becomes visible first (at `SCOPE`: `sync.memory_scope`)."""
    tl.static_assert(
        (SIG_OP == SIGNAL_SET) | (SIG_OP == SIGNAL_ADD), "SIG_OP must be SIGNAL_SET or SIGNAL_ADD"
    )
    # The other threads' stores, ordered at block scope before the signalling threads' release,
    # which publishes them.
    tl.debug_barrier()
    if SIG_OP == SIGNAL_SET:
        tl.atomic_xchg(sig, value, mask=mask, sem="release", scope=SCOPE)
    else:
        tl.atomic_add(sig, value, mask=mask, sem="release", scope=SCOPE)


# -------------------------------------------------------------------------------- public calls
@triton.jit
def open_peer(route_ptr, rank, peer, TRANSPORT: tl.constexpr, FORCE_PUT: tl.constexpr):
    """How this rank reaches group rank `peer`: `(pe, delta, direct)`.

    `route_ptr` is the heap's `route_table_dev` (int64 `[R, 3]`), `rank` this rank. `direct`
    (bool): plain stores reach the peer; `delta` (int64 bytes): add to a local symmetric address
    to get the address that stores use (the peer's heap when direct, the emulated heap on the
    `EMULATED` put path, 0 on the NVSHMEM put path); `pe` (int32): the peer's NVSHMEM PE.

    Example: 2 nodes x 1 rank under `EMULATED`, rank 0 opening peer 1 -> direct False, delta =
    (rank 1's file as mapped here) - (rank 0's file), pe 1.
    """
    tl.static_assert(not ((TRANSPORT == STORES) & FORCE_PUT), "FORCE_PUT needs a put transport")
    row = route_ptr + ROUTE_COLUMNS * peer
    mapped = tl.load(row)
    my_base = tl.load(route_ptr + ROUTE_COLUMNS * rank + 1)
    pe = tl.load(row + 2).to(tl.int32)
    if FORCE_PUT:
        direct = mapped != mapped
    elif TRANSPORT == STORES:
        direct = mapped == mapped
    else:
        direct = mapped != 0
    delta = tl.where(direct, mapped, tl.load(row + 1)) - my_base
    return pe, delta, direct


@triton.jit
def peer_ptr(ptr, delta):
    """`ptr` (into this rank's heap) moved by `delta` bytes: the same offset in the peer's heap."""
    return (ptr.to(tl.int64) + delta).to(ptr.dtype)


@triton.jit
def store(ptr, value, delta, mask=None):
    """Plain store of `value` at local symmetric address `ptr` of a DIRECT peer (`open_peer`).

    Unordered, like any store: follow with `signal_op` / `fence`. For other peers, stage the data in
    this rank's heap and `put_nbi_block` it.
    """
    tl.store(peer_ptr(ptr, delta), value, mask=mask)


@triton.jit
def put_nbi_block(
    dst, src, nelems, pe, delta, direct, TRANSPORT: tl.constexpr, BLOCK: tl.constexpr
):
    """Copy `src[0:nelems]` (this rank's memory) to `dst[0:nelems]` of the peer (`dst` a local
    symmetric address, same element type). Block scope: every thread of the program calls it with
    the same arguments. Non-blocking: complete after `quiet` or a following signal."""
    if TRANSPORT == NVSHMEM:
        if direct:
            _copy(peer_ptr(dst, delta), src, nelems, BLOCK)
        else:
            tl.debug_barrier()  # src written by other threads of this program is read by the copy
            _putmem_nbi_block(dst.to(tl.int64), src.to(tl.int64), _bytes(dst, nelems), pe)
    else:
        _copy(peer_ptr(dst, delta), src, nelems, BLOCK)


@triton.jit
def put_signal_nbi_block(
    dst,
    src,
    nelems,
    sig,
    value,
    pe,
    delta,
    direct,
    SIG_OP: tl.constexpr,
    TRANSPORT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`put_nbi_block`, then update the peer's 64-bit signal `sig` (local symmetric address) with
    `value` (`SIG_OP` = `SIGNAL_SET` or `SIGNAL_ADD`) once the data is visible there."""
    if TRANSPORT == NVSHMEM:
        if direct:
            _copy(peer_ptr(dst, delta), src, nelems, BLOCK)
            _signal_mapped(peer_ptr(sig, delta), value, SIG_OP)
        else:
            tl.static_assert(
                (SIG_OP == SIGNAL_SET) | (SIG_OP == SIGNAL_ADD),
                "SIG_OP must be SIGNAL_SET or SIGNAL_ADD",
            )
            tl.debug_barrier()  # src written by other threads of this program is read by the copy
            _putmem_signal_nbi_block(
                dst.to(tl.int64),
                src.to(tl.int64),
                _bytes(dst, nelems),
                sig.to(tl.int64),
                _u64(value),
                SIG_OP,
                pe,
            )
    else:
        _copy(peer_ptr(dst, delta), src, nelems, BLOCK)
        _signal_mapped(peer_ptr(sig, delta), value, SIG_OP)


@triton.jit
def signal_op(sig, value, pe, delta, direct, SIG_OP: tl.constexpr, TRANSPORT: tl.constexpr):
    """Set or add `value` to the peer's 64-bit signal `sig`, ordered after everything this program
    stored or put to that peer before. Call from every thread (one thread performs it)."""
    if TRANSPORT == NVSHMEM:
        if direct:
            _signal_mapped(peer_ptr(sig, delta), value, SIG_OP)
        else:
            tl.static_assert(
                (SIG_OP == SIGNAL_SET) | (SIG_OP == SIGNAL_ADD),
                "SIG_OP must be SIGNAL_SET or SIGNAL_ADD",
            )
            tl.debug_barrier()  # every thread's part of earlier puts was issued
            if _thread_id() == 0:
                _nvshmem_fence()  # earlier puts to `pe` land before the signal
                _signal_op(sig.to(tl.int64), _u64(value), SIG_OP, pe)
    else:
        _signal_mapped(peer_ptr(sig, delta), value, SIG_OP)


@triton.jit
def signal_lanes(
    sigs,
    value,
    pe,
    delta,
    direct,
    live,
    SIG_OP: tl.constexpr,
    TRANSPORT: tl.constexpr,
    SCOPE: tl.constexpr = SYSTEM_SCOPE,
):
    """`signal_op` on every `live` lane of `sigs` (`[N]` local symmetric `*int64`), each lane with
    its own peer (`pe`, `delta`, `direct`: lanes of a vector `open_peer`) and `value` (one for all
    lanes, or one per lane).

    Mapped lanes take one masked release atomic together (one ordering wait instead of one per
    signal), at `SCOPE` (`sync.memory_scope`); lanes on the NVSHMEM put path one fenced
    `signal_op` each.
    """
    if TRANSPORT == NVSHMEM:
        _signal_mapped(peer_ptr(sigs, delta), value, SIG_OP, live & direct, SCOPE)
        lanes = tl.arange(0, sigs.shape[0])
        values = tl.zeros(sigs.shape, dtype=tl.int64) + value
        todo = live & ~direct
        while tl.max(todo.to(tl.int32), axis=0) > 0:
            j = tl.min(tl.where(todo, lanes, sigs.shape[0]), axis=0)
            sig = lane(sigs.to(tl.int64), lanes, j).to(tl.pointer_type(tl.int64))
            signal_op(sig, lane(values, lanes, j), lane(pe, lanes, j), 0, False, SIG_OP, TRANSPORT)
            todo = todo & (lanes != j)
    else:
        _signal_mapped(peer_ptr(sigs, delta), value, SIG_OP, live, SCOPE)


@triton.jit
def atomic_add(ptr, value, pe, delta, direct, TRANSPORT: tl.constexpr):
    """`*ptr += value` at the peer (64-bit, `ptr` a local symmetric `*int64`), unordered."""
    if TRANSPORT == NVSHMEM:
        if direct:
            tl.atomic_add(
                peer_ptr(ptr, delta), tl.cast(value, tl.int64), sem="relaxed", scope="sys"
            )  # a count only
        else:
            if _thread_id() == 0:
                _uint64_atomic_add(ptr.to(tl.int64), _u64(value), pe)
    else:
        tl.atomic_add(
            peer_ptr(ptr, delta), tl.cast(value, tl.int64), sem="relaxed", scope="sys"
        )  # a count only


@triton.jit
def atomic_fetch_add(ptr, value, pe, delta, direct, TRANSPORT: tl.constexpr):
    """`old = *ptr; *ptr += value` at the peer (64-bit), unordered; returns `old` to every
    thread."""
    if TRANSPORT == NVSHMEM:
        if direct:
            old = tl.atomic_add(
                peer_ptr(ptr, delta), tl.cast(value, tl.int64), sem="relaxed", scope="sys"
            )  # count
        else:
            fetched = tl.full([], 0, tl.int64)
            if _thread_id() == 0:
                fetched = _uint64_atomic_fetch_add(ptr.to(tl.int64), _u64(value), pe).to(
                    tl.int64, bitcast=True
                )
            # Only thread 0 holds the value: the lane-0 element of any layout lives in thread 0.
            old = lane(
                tl.full([_BROADCAST_LANES], 0, tl.int64) + fetched,
                tl.arange(0, _BROADCAST_LANES),
                0,
            )
    else:
        old = tl.atomic_add(
            peer_ptr(ptr, delta), tl.cast(value, tl.int64), sem="relaxed", scope="sys"
        )  # count
    return old


@triton.jit
def fence(TRANSPORT: tl.constexpr):
    """Order this program's earlier stores and puts to each peer before its later ones."""
    if TRANSPORT == NVSHMEM:
        _nvshmem_fence()  # also a system-scope fence of this thread's own stores
        tl.debug_barrier()
    elif TRANSPORT == STORES:
        _fence_sys()
        tl.debug_barrier()


@triton.jit
def quiet(TRANSPORT: tl.constexpr):
    """Complete this program's earlier puts (their source buffers may then be reused)."""
    if TRANSPORT == NVSHMEM:
        _nvshmem_quiet()  # also a system-scope fence of this thread's own stores
        tl.debug_barrier()
    elif TRANSPORT == STORES:
        _fence_sys()
        tl.debug_barrier()


@triton.jit
def wait_until(sig, target, deadline, clock_addr, USE_GLOBALTIMER: tl.constexpr):
    """Spin until this rank's 64-bit signal `*sig >= target` or `deadline` (ns, `sync.now_ns`)
    passes; returns the last value read (the wait failed if it is `< target`). Every thread of the
    program leaves the loop at the same trip (`sync.past_deadline`)."""
    value = load_acquire(sig)
    while (value < target) & ~past_deadline(deadline, clock_addr, USE_GLOBALTIMER):
        value = load_acquire(sig)
    return value
