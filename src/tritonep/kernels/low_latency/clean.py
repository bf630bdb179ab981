"""Low-latency clean: the collective barrier of `clean_low_latency_buffer`.

Problem: V1 requires `clean_low_latency_buffer` between high-throughput and low-latency use of a
buffer, and when the low-latency geometry changes, to reset its signals. tritonep's LL signals are
epoch-tagged (`regions.py`): a later call can never mistake a stale value for its own, and the
high-throughput structures keep off the LL signal words (intranode queues live in the NVL memory;
internode rings grow from the top of the RDMA memory, their signal words lie above the user's
bytes), so nothing needs resetting. The call stays
what V1 code relies on: a device-side barrier of every (unmasked) rank, on the current stream,
capturable in CUDA graphs.

Algorithm (one program): advance this rank's barrier epoch b (workspace), set slot `rank` of every
unmasked peer's barrier array to b (peers reached through the device layer), then wait until every
unmasked peer has set this rank's slot `peer` to b. In shrink mode a peer that times out is masked.

Example: R=2, first clean -> each rank writes 1 into the other's barrier array, waits for a 1.
"""

import triton.language as tl

from ... import protocol
from ...transport import device
from ..common.launch import KernelLaunch, pow2
from ..common.naming import named_kernel
from ..common.sync import SYSTEM_SCOPE, now_ns
from ..common.tiles import lane
from .sync import WS_BARRIER, stopped, unmasked, wait_signals_or_give_up


@named_kernel("ll", "clean_buffer", do_not_specialize=["rank"])
def _clean_kernel(
    mask_ptr,
    workspace_ptr,
    routes_ptr,
    rdma_base,
    rank,
    host_addr,
    clock_addr,
    timeout_ns,
    NUM_RANKS: tl.constexpr,
    BARRIER: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    SHRINK: tl.constexpr,
    HOST_ERROR: tl.constexpr,
    HOST_SHRUNK: tl.constexpr,
    ERR_TIMEOUT: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    ws = workspace_ptr
    host = host_addr.to(tl.pointer_type(tl.int64))
    ok = stopped(ws) == 0
    if ok:
        epoch = tl.load(ws + WS_BARRIER) + 1
        deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
        barrier = rdma_base + BARRIER
        # One read of the masks serves both sides: the peers signalled are those waited for.
        ranks = tl.arange(0, BLOCK_R)
        live = unmasked(mask_ptr, ranks, ranks < NUM_RANKS)
        live_i = live.to(tl.int32)
        for peer in range(0, NUM_RANKS):
            if lane(live_i, ranks, peer) != 0:
                pe, delta, direct = device.open_peer(routes_ptr, rank, peer, TRANSPORT, FORCE_PUT)
                slot = (barrier + rank * 8).to(tl.pointer_type(tl.int64))
                device.signal_op(slot, epoch, pe, delta, direct, device.SIGNAL_SET, TRANSPORT)
        slots = (barrier + ranks * 8).to(tl.pointer_type(tl.int64))
        # Progress quoted as the epochs themselves (base 0); no expert, no wait statistics.
        wait_signals_or_give_up(
            slots,
            live,
            live,
            ranks,
            tl.full([BLOCK_R], -1, tl.int32),
            -1,
            epoch,
            0,
            deadline,
            clock_addr,
            ok,
            mask_ptr,
            ws,
            host,
            rank,
            ws,
            PHASE,
            SHRINK,
            HOST_ERROR,
            HOST_SHRUNK,
            ERR_TIMEOUT,
            BLOCK_R,
            USE_GLOBALTIMER,
            False,
            SYSTEM_SCOPE,  # the barrier signals above are released at system scope
        )
        tl.store(ws + WS_BARRIER, epoch)


class CleanPlan:
    """The clean barrier of one Buffer's low-latency memory (`memory`: its `BufferMemory`)."""

    def __init__(self, memory, ctx, barrier_offset: int, shrink: bool):
        self._kernel = KernelLaunch(
            _clean_kernel,
            wrap=memory.device_wrapper,
            NUM_RANKS=ctx.num_ranks,
            BARRIER=barrier_offset,
            TRANSPORT=memory.rdma_transport,
            FORCE_PUT=memory.rdma_force_put,
            SHRINK=shrink,
            HOST_ERROR=protocol.HOST_ERROR,
            HOST_SHRUNK=protocol.HOST_SHRUNK,
            ERR_TIMEOUT=protocol.ERR_TIMEOUT,
            PHASE=protocol.PHASE_LL_CLEAN,
            BLOCK_R=pow2(ctx.num_ranks),
            USE_GLOBALTIMER=ctx.use_globaltimer,
            num_warps=1,
        )
        self._args = (
            memory.rdma_routes,
            memory.rdma_base,
            ctx.rank,
            ctx.host_addr,
            ctx.clock_addr,
            ctx.timeout_ns,
        )

    def launch(self, stream, mask, workspace) -> None:
        self._kernel.launch((1,), stream, mask, workspace, *self._args)
