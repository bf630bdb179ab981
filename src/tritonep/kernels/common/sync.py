"""Device-side signalling shared by every kernel: clocks, bounded waits, error records.

Protocol (works compiled and in the interpreter): a producer makes its stores visible with
`tl.debug_barrier()` and then publishes a counter with a release atomic at system scope; a consumer
spins on an acquire atomic at system scope (`ld.acquire.sys` once compiled). Every counter carries
the call's epoch in its upper 32 bits (see `protocol.py`).

Every wait is bounded: it gives up at `deadline` (nanoseconds), after which the caller writes an
error record into the host block and abandons its work; the host turns the record into an
`EPTimeoutError` naming rank, peer, phase and channel. On the GPU the clock is `%globaltimer`; in
the interpreter (no inline asm) it is a host cell that a background thread keeps current.

Uniform branches: a program's warps must all take the same side of every branch and leave every
loop together, because Triton puts block barriers (`bar.sync`) inside reductions and atomics. A
value that steers a branch must therefore be the same on every thread. Two kinds of value are not:
a plain `tl.load` of a word that another program may change meanwhile (each thread loads it for
itself, at a slightly different moment), and the clock (each warp reads `%globaltimer` on its
own). So such words are read with `load_uniform` or `load_acquire` (one thread loads, the program
shares its value), and a deadline is judged by `deadline_passed`, which ORs the verdict over all
threads.

Scope: system scope is what peers on other GPUs (NVLink, NVSHMEM) need. When every rank of a Buffer
runs on one GPU (ranks sharing it under MPS), all of their loads and stores are this GPU's, and GPU
scope orders them as well at less cost (`memory_scope`; the intranode and low-latency kernels
take it as `PEER_SCOPE`): a release at GPU scope need not wait for the system-wide
acknowledgement of every earlier store.

Divergence here is not a slow path but undefined behaviour: warps that leave a wait at different
trips pair the barriers wrongly and read garbage from shared memory. The low-latency dispatch
faulted on its timeout path before this rule was applied; with it, the GPU timeout test passes.
"""

import triton
import triton.language as tl

from ... import protocol
from .tiles import lane

STOP_OFFSET = tl.constexpr(protocol.STOP_OFFSET)
STOP_ALL = tl.constexpr(protocol.STOP_ALL)


@triton.jit
def now_ns(clock_addr, USE_GLOBALTIMER: tl.constexpr):
    """Current time in nanoseconds on the clock the waits use."""
    if USE_GLOBALTIMER:
        return tl.extra.cuda.globaltimer()
    else:
        return tl.load(clock_addr.to(tl.pointer_type(tl.int64)), volatile=True)


@triton.jit
def deadline_passed(now, deadline, USE_GLOBALTIMER: tl.constexpr):
    """`now > deadline`, the same verdict on every thread of the program: compiled, each thread's
    verdict is OR-ed over the block (`bar.red.or`, itself a block barrier, so every thread of the
    program must call this at the same point). The interpreter runs one thread per program."""
    late = now > deadline
    if USE_GLOBALTIMER:
        late = (
            tl.inline_asm_elementwise(
                "{ .reg .pred late, any; setp.ne.b32 late, $1, 0; "
                "bar.red.or.pred any, 0, late; selp.b32 $0, 1, 0, any; }",
                "=r,r",
                [late.to(tl.int32)],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
            != 0
        )
    return late


@triton.jit
def past_deadline(deadline, clock_addr, USE_GLOBALTIMER: tl.constexpr):
    """`deadline_passed` at the current time."""
    return deadline_passed(now_ns(clock_addr, USE_GLOBALTIMER), deadline, USE_GLOBALTIMER)


@triton.jit
def wait_previous_launch(EARLY_LAUNCH: tl.constexpr):
    """In a kernel launched as a programmatic dependent (`launch_pdl`, Hopper and later): wait
    until the previous kernel of the stream has completed and its stores are visible. Nothing read
    before this may come from that kernel. A no-op without EARLY_LAUNCH."""
    if EARLY_LAUNCH:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next_launch(EARLY_LAUNCH: tl.constexpr):
    """Let the next kernel of the stream, if launched as a programmatic dependent, become resident
    once every program of this one got here (or exited). Called last: a dependent resident while
    this kernel's programs still wait for peers would take slots those peers' launches need."""
    if EARLY_LAUNCH:
        tl.extra.cuda.gdc_launch_dependents()


# Memory scopes of the signalling atomics, as constexprs (`memory_scope`).
SYSTEM_SCOPE = tl.constexpr("sys")
GPU_SCOPE = tl.constexpr("gpu")


def memory_scope(all_ranks_on_gpu: bool, force_put: bool) -> str:
    """The scope that orders a Buffer's peer signals: "gpu" when every rank runs on this GPU and
    every peer is written with this GPU's own stores (no forced NVSHMEM put path, whose transport
    may deliver through other agents), else "sys"."""
    return GPU_SCOPE.value if all_ranks_on_gpu and not force_put else SYSTEM_SCOPE.value


@triton.jit
def load_acquire(ptr, mask=None, SCOPE: tl.constexpr = SYSTEM_SCOPE):
    """Acquire-load at `SCOPE` (peers write these counters over NVLink or shared memory; see
    `memory_scope` for GPU scope).

    Compiled, one thread per element loads and the program shares the value (Triton broadcasts
    atomic results through shared memory), so every thread sees the same value. Masked-off lanes
    are undefined."""
    return tl.atomic_add(ptr, 0, mask=mask, sem="acquire", scope=SCOPE)


@triton.jit
def load_uniform(ptr, mask=None):
    """A word of this GPU's memory that other programs may change meanwhile (the stop word, rank
    masks), read once for the whole program: shared like `load_acquire`'s value, so every thread
    takes the same branch on it, but relaxed at GPU scope (it orders nothing, and only programs of
    this GPU write it). Masked-off lanes are undefined."""
    return tl.atomic_add(ptr, 0, mask=mask, sem="relaxed", scope="gpu")


@triton.jit
def store_release(ptr, value, SCOPE: tl.constexpr = SYSTEM_SCOPE):
    """Publish `value` after every store this program made before (callers barrier first), at
    `SCOPE` (`memory_scope`; host memory always at system scope)."""
    tl.atomic_xchg(ptr, value, sem="release", scope=SCOPE)


@triton.jit
def wait_all_at_least(
    ptrs,
    targets,
    mask,
    deadline,
    clock_addr,
    USE_GLOBALTIMER: tl.constexpr,
    SCOPE: tl.constexpr = SYSTEM_SCOPE,
):
    """Spin until every masked `*ptrs >= targets` or `deadline` (ns) passes (acquire loads at
    `SCOPE`).

    Returns the last values read (lanes outside `mask` read as their target).
    """
    values = tl.where(mask, load_acquire(ptrs, mask, SCOPE), targets)
    pending = tl.sum((values < targets).to(tl.int32), axis=0)
    while (pending > 0) & ~past_deadline(deadline, clock_addr, USE_GLOBALTIMER):
        values = tl.where(mask, load_acquire(ptrs, mask, SCOPE), targets)
        pending = tl.sum((values < targets).to(tl.int32), axis=0)
    return values


@triton.jit
def wait_for_peers(
    ptrs,
    need,
    poll,
    seen,
    tag,
    deadline,
    clock_addr,
    host_error_ptr,
    stop_ptr,
    code,
    rank,
    ranks,
    phase,
    channel,
    BLOCK_RANKS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    SCOPE: tl.constexpr = SYSTEM_SCOPE,
):
    """Wait until every `poll` lane of the epoch-tagged counters `ptrs` reaches `need` (acquire
    loads at `SCOPE`); on timeout record an error (`code`) about the first late rank, with its
    progress as plain counts.

    Returns (`seen` with the polled lanes updated, ok = nobody was late).
    """
    values = wait_all_at_least(ptrs, need, poll, deadline, clock_addr, USE_GLOBALTIMER, SCOPE)
    late = poll & (values < need)
    ok = tl.sum(late.to(tl.int32), axis=0) == 0
    if not ok:
        report_error(
            host_error_ptr,
            stop_ptr,
            STOP_ALL,
            code,
            rank,
            late,
            ranks,
            phase,
            channel,
            (values - tag).to(tl.int32),
            (need - tag).to(tl.int32),
            BLOCK_RANKS,
        )
    return tl.where(poll, values, seen), ok


@triton.jit
def report_error(
    host_error_ptr,
    stop_ptr,
    stop_epoch,
    code,
    rank,
    which,
    ranks,
    phase,
    channel,
    observed,
    expected,
    BLOCK_RANKS: tl.constexpr,
):
    """Record the first failure of this buffer: `[claim, rank, peer, phase, channel, observed,
    expected, code]`.

    The peer is the lowest rank of the mask `which` (lanes of ranks `ranks`, a rank may have
    several); `observed` / `expected` are lanes (or scalars) of which the values at the
    peer's first lane in `which` are recorded. The claim slot makes the first reporter
    win; `code` is published last so the host never reads a half-written record. The device stop
    word is raised to `stop_epoch` (`STOP_ALL` for a fatal error) so later data kernels of those
    epochs do no work.
    """
    peer = tl.min(tl.where(which, ranks, BLOCK_RANKS), axis=0)
    # Only the program that raises the stop word to this level goes on to the host block: when a
    # wait times out, every waiting program of the launch gets here at about the same moment,
    # and the claim below is an atomic on pinned host memory (sysmem atomics are not native over
    # PCIe); the device word sorts them out first.
    before = tl.atomic_max(stop_ptr, stop_epoch, sem="relaxed")
    zero = tl.full([], 0, tl.int64)
    claimed = zero + 1
    if before < stop_epoch:
        claimed = tl.atomic_cas(host_error_ptr, zero, zero + 1, sem="acq_rel", scope="sys")
    if claimed == 0:
        tl.store(host_error_ptr + 1, rank)
        tl.store(host_error_ptr + 2, peer)
        tl.store(host_error_ptr + 3, phase)
        tl.store(host_error_ptr + 4, channel)
        # The peer's first failing lane: several lanes may name one rank (the LL waits have one
        # per expert and rank), and a pick by rank would add their values up.
        LANES: tl.constexpr = ranks.shape[0]
        at = tl.arange(0, LANES)
        first = tl.min(tl.where(which & (ranks == peer), at, LANES), axis=0)
        tl.store(host_error_ptr + 5, lane(observed, at, first))
        tl.store(host_error_ptr + 6, lane(expected, at, first))
        store_release(host_error_ptr + 7, code)


@triton.jit
def call_lanes(
    host_addr,
    rank_mask_ptr,
    peer_bases_ptr,
    rank,
    NUM_RANKS: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
):
    """(host block pointer, stop word pointer, rank lanes, live = unmasked ranks, peer base
    addresses, this rank's base): what every way of opening a high-throughput call reads first."""
    host = host_addr.to(tl.pointer_type(tl.int64))
    ranks = tl.arange(0, BLOCK_RANKS)
    rank_ok = ranks < NUM_RANKS
    live = rank_ok & (
        tl.load(rank_mask_ptr + ranks, mask=rank_ok, other=1) == 0
    )  # masked ranks: no traffic
    peer_bases = tl.load(peer_bases_ptr + ranks, mask=rank_ok, other=0)
    my_base = tl.load(peer_bases_ptr + rank)
    stop = (my_base + STOP_OFFSET).to(tl.pointer_type(tl.int64))
    return host, stop, ranks, live, peer_bases, my_base


@triton.jit
def open_call(
    host_addr,
    rank_mask_ptr,
    peer_bases_ptr,
    rank,
    clock_addr,
    timeout_ns,
    NUM_RANKS: tl.constexpr,
    BLOCK_RANKS: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    """State every data kernel starts from.

    Returns (host block pointer, stop word pointer, ok = this call may work, rank lanes, live =
    unmasked ranks, peer base addresses, this rank's base, epoch tag `epoch << 32`, deadline in ns).
    The epoch was advanced by this call's notify kernel, earlier on the same stream. Nothing here
    reads host memory (see `protocol.STOP_OFFSET`).
    """
    host, stop, ranks, live, peer_bases, my_base = call_lanes(
        host_addr, rank_mask_ptr, peer_bases_ptr, rank, NUM_RANKS, BLOCK_RANKS
    )
    epoch = tl.load(my_base.to(tl.pointer_type(tl.int64)), volatile=True)
    ok = load_uniform(stop) < epoch  # a failed buffer or a refused call does no work
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    return host, stop, ok, ranks, live, peer_bases, my_base, epoch << 32, deadline
