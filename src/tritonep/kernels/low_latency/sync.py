"""Device pieces shared by the low-latency kernels: roles, epochs, bounded signal waits, shrink.

Workspace (int64 `[WORKSPACE_SLOTS]`, this rank's device memory, not peer-visible): set p's epoch
with a count of the programs that have read it, a stop word, the clean barrier's epoch. Epochs start
at 1, so every tag (`epoch << 32`) is above zeroed memory.
"""

import triton
import triton.language as tl

from ... import _env, protocol
from ...runtime.outputs import AddressedTensors, addressed
from ...transport import device
from ..common.launch import KernelLaunch
from ..common.sync import (
    deadline_passed,
    load_acquire,
    load_uniform,
    memory_scope,
    now_ns,
    report_error,
)

# The `ROLE` constexpr: the fused call, the send phase of a hooked call, its receive phase (hook).
ROLE_BOTH = tl.constexpr(0)
ROLE_SEND = tl.constexpr(1)
ROLE_RECV = tl.constexpr(2)

# [2] per buffer set: its epoch << 32 | the programs of the current sending launch that read it
WS_EPOCH = tl.constexpr(0)
WS_STOP = tl.constexpr(4)  # non-zero after a fatal device error: later launches do nothing
WS_BARRIER = tl.constexpr(5)  # epoch of the clean barrier
WORKSPACE_SLOTS = 8


@triton.jit
def open_launch(ws, parity, ROLE: tl.constexpr):
    """(tag of this call, `epoch << 32`, ok = the buffer has not failed).

    A launch that sends advances set `parity`'s epoch: each program reads it and counts itself in
    with one atomic add on the set's word (`epoch << 32 | count`), and the one that completes the
    count moves the word to the next epoch with a count of 0; no program of the launch reads it
    again. The stop word (`stopped`) comes back from the same atomic: one round trip. (The count
    used to be taken at the end of the launch, where its release waited for every store of the
    program's receive phase, and the last program's 0.8-1.4 us went on the kernel time,
    globaltimer stamps, 2 ranks sharing an H200.) A receive-only launch runs after its own send
    launch, which already advanced the epoch."""
    if ROLE == ROLE_RECV:
        epoch = (tl.load(ws + WS_EPOCH + parity, volatile=True) >> 32) - 1
        ok = stopped(ws) == 0
    else:
        words = tl.arange(0, 2)
        got = tl.atomic_add(
            ws + tl.where(words == 0, WS_EPOCH + parity, WS_STOP),
            1 - words,
            sem="relaxed",
            scope="gpu",
        )
        state = tl.sum(tl.where(words == 0, got, 0), axis=0)
        ok = tl.sum(tl.where(words == 1, got, 0), axis=0) == 0
        epoch = state >> 32
        if (state & 0xFFFFFFFF) == tl.num_programs(0) - 1:
            next_epoch = tl.full([], 1 << 32, tl.int64) - tl.num_programs(0)  # and count 0
            tl.atomic_add(ws + WS_EPOCH + parity, next_epoch, sem="relaxed", scope="gpu")
    return epoch << 32, ok


@triton.jit
def stopped(ws):
    """The stop word, read once for the whole program (`sync.load_uniform`): another program may
    raise it at any moment, and the branches it steers must be taken by every thread alike."""
    return load_uniform(ws + WS_STOP)


@triton.jit
def unmasked(mask_ptr, ranks, mask):
    """The lanes of `mask` whose rank (`ranks`, lanes of the same shape) is not masked. Read like
    the stop word (`stopped`): in shrink mode a receiver may mask a rank at any moment."""
    return mask & (tl.where(mask, load_uniform(mask_ptr + ranks, mask), 1) == 0)


@triton.jit
def wait_signals(
    sigs,
    live,
    target,
    deadline,
    clock_addr,
    USE_GLOBALTIMER: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """Spin until every `live` lane of the signals `sigs` reaches `target` (lanes or scalar), or
    until `deadline` (ns); acquire loads at `PEER_SCOPE`. Returns (values, late lanes, ns each
    lane waited; 0 for late or dead)."""
    start = now_ns(clock_addr, USE_GLOBALTIMER)
    values = tl.where(live, load_acquire(sigs, live, PEER_SCOPE), target)
    waited = tl.zeros(values.shape, dtype=tl.int64)
    pending = tl.sum((values < target).to(tl.int32), axis=0)
    late = pending < 0
    while (pending > 0) & ~late:
        now = now_ns(clock_addr, USE_GLOBALTIMER)
        late = deadline_passed(now, deadline, USE_GLOBALTIMER)  # all threads leave together
        missing = values < target
        polled = load_acquire(
            sigs, missing, PEER_SCOPE
        )  # the data behind a signal is visible once it is seen
        fresh = missing & (polled >= target)
        values = tl.where(fresh, polled, values)
        waited = tl.where(fresh, now - start, waited)
        pending = tl.sum((values < target).to(tl.int32), axis=0)
    return values, values < target, waited


@triton.jit
def give_up_on(
    late,
    peers,
    mask_ptr,
    ws,
    host,
    rank,
    observed,
    expected,
    phase,
    expert,
    SHRINK: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_SHRUNK: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """After a timed-out wait on the ranks `peers` where `late`: in shrink mode mask them and carry
    on (the host warns about the ranks recorded in its shrink slot); otherwise record a timeout
    error naming the first late rank and stop the buffer."""
    if SHRINK:
        tl.atomic_xchg(
            mask_ptr + peers, 1, mask=late
        )  # masked from now on: not sent to, not waited for
        bits = tl.full(peers.shape, 1, tl.int64) << peers.to(tl.int64)
        tl.atomic_or(
            host + HOST_SHRUNK + peers * 0,
            bits,
            mask=late & (peers < 64),
            sem="relaxed",
            scope="sys",
        )
    else:
        report_error(
            host + HOST_ERROR,
            ws + WS_STOP,
            1,
            ERR_TIMEOUT,
            rank,
            late,
            peers,
            phase,
            expert,
            observed,
            expected,
            BLOCK,
        )


def _early_launch(early: bool) -> dict:
    """The constexpr and launch option of a programmatic dependent launch (Hopper's PDL): the
    launch's programs become resident while the kernel before them finishes, and wait for it in
    place (`common.sync.wait_previous_launch`). A hook's send and receive launches take it: the
    hooked decode step as a CUDA graph replayed in 61.3 us with it against 71.0 without; the fused
    launches do not (their pair as a graph: 56.5 against 54.5 us; 2 ranks sharing an H200,
    `2026-12-03-h200-ll-pdl-ab-*.json`). Only over plain stores, the measured transport: launches
    linked with NVSHMEM (puts) keep plain stream order."""
    return {"EARLY_LAUNCH": True, "launch_pdl": True} if early else {"EARLY_LAUNCH": False}


class RolePlan:
    """What the launch plans of the LL data kernels share: one `KernelLaunch` per role of `grids`
    (`{role: (senders, receivers)}`; the fused role cooperative, since its receivers wait for its
    senders), the constexprs of the memory layout, transport and error reporting, and the
    arguments that end every launch (`fixed`: mask, workspace, arrival counters, then the RDMA
    route table, RDMA base and rank, host block, clock and timeout), bound to the launches once.

    A kernel's parameters start with what changes from call to call (the caller's tensors, the
    outputs, token count and buffer-set parity) and end with those fixed ones, so a launch passes
    only the former.

    Subclasses launch role r as `launch, inputs, outputs = self._kernels[r].choose(inputs,
    outputs)`, then `launch(self._grid[r], stream, *per_call_arguments)`: `choose` gives addresses
    once the kernel is compiled (the launcher then skips its pointer query per tensor), tensors for
    the JIT."""

    def __init__(
        self,
        kernel,
        memory,
        ctx,
        regions,
        grids: dict,
        shrink: bool,
        phase: int,
        fixed: tuple,
        **constexprs,
    ):
        self.grids = grids
        self._grid = {role: (max(programs),) for role, programs in grids.items()}
        shared = dict(
            NUM_RANKS=regions.num_ranks,
            NUM_EXPERTS=regions.num_experts,
            MAX_TOKENS=regions.max_tokens,
            HIDDEN=regions.hidden,
            SIGNALS0=regions.signals0,
            SIGNALS_STRIDE=regions.signals_stride,
            RECV0=regions.recv0,
            RECV_STRIDE=regions.recv_stride,
            SEND0=regions.send0,
            SEND_STRIDE=regions.send_stride,
            SLOT_BYTES=regions.slot_bytes,
            TRANSPORT=memory.rdma_transport,
            FORCE_PUT=memory.rdma_force_put,
            SHRINK=shrink,
            HOST_ERROR=protocol.HOST_ERROR,
            HOST_SHRUNK=protocol.HOST_SHRUNK,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=phase,
            USE_GLOBALTIMER=ctx.use_globaltimer,
            PEER_SCOPE=memory_scope(ctx.all_ranks_on_gpu, memory.rdma_force_put),
            INTERPRETED=_env.interpret_enabled(),
        )
        tensors = addressed((*fixed, memory.rdma_routes))
        scalars = (memory.rdma_base, ctx.rank, ctx.host_addr, ctx.clock_addr, ctx.timeout_ns)
        bound = AddressedTensors((*tensors.tensors, *scalars), (*tensors.addresses, *scalars))
        self._kernels = {
            role: KernelLaunch(
                kernel,
                wrap=memory.device_wrapper,
                fixed=bound,
                ROLE=role,
                NUM_SENDERS=senders,
                NUM_RECEIVERS=receivers,
                launch_cooperative_grid=role == ROLE_BOTH.value,
                maxnreg=protocol.ll_register_cap(constexprs["num_warps"]),
                **_early_launch(
                    ctx.early_launch
                    and role != ROLE_BOTH.value
                    and memory.rdma_transport == device.STORES.value
                ),
                **shared,
                **constexprs,
            )
            for role, (senders, receivers) in grids.items()
        }

    def resources(self) -> dict[int, tuple[int, int]]:
        """{role: (registers, spilled bytes)} of the launches compiled so far."""
        built = {role: kernel.resources for role, kernel in self._kernels.items()}
        return {role: used for role, used in built.items() if used is not None}


@triton.jit
def wait_signals_or_give_up(
    sigs,
    live,
    counted,
    peers,
    expert_lanes,
    no_expert,
    target,
    base,
    deadline,
    clock_addr,
    ok,
    mask_ptr,
    ws,
    host,
    rank,
    wait_stats_ptr,
    PHASE: tl.constexpr,
    SHRINK: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_SHRUNK: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    HAS_WAIT_STATS: tl.constexpr,
    PEER_SCOPE: tl.constexpr,
):
    """A wait for the `live` signals `sigs` (of ranks `peers`) to reach `target`.

    Late peers are given up on (`give_up_on`; the record quotes progress as `value - base` of
    `target - base`, -1 for a signal still tagged with an earlier call (below `base`: its low word
    is that call's progress, which quoted as this call's once read "seen 3, needed 1"), and names
    the smallest late lane of `expert_lanes`, or `no_expert` if none is smaller); without shrink
    mode that stops the call (`ok` false). With HAS_WAIT_STATS each live
    lane of `counted` adds its wait (ns) to its peer's stat (lanes that other programs wait for
    too count in one of them). Returns (signal values, late lanes, ok)."""
    values, late, waited = wait_signals(
        sigs, live, target, deadline, clock_addr, USE_GLOBALTIMER, PEER_SCOPE
    )
    late = late & live
    if tl.sum(late.to(tl.int32), axis=0) > 0:
        give_up_on(
            late,
            peers,
            mask_ptr,
            ws,
            host,
            rank,
            tl.maximum(values - base, -1).to(tl.int32),
            (target - base).to(tl.int32),
            PHASE,
            tl.min(tl.where(late, expert_lanes, no_expert), axis=0),
            SHRINK,
            HOST_ERROR,
            HOST_SHRUNK,
            ERR_TIMEOUT,
            BLOCK,
        )
        ok = ok & SHRINK  # without shrink mode the error record stops this call
    if HAS_WAIT_STATS:
        tl.atomic_add(wait_stats_ptr + peers, waited, mask=live & counted, sem="relaxed")
    return values, late, ok
