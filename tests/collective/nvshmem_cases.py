"""Cases for the device layer (`tritonep.transport.device`), shared by the CPU tests and the GPU
check.

Every case is one single-program kernel per rank plus a host check. `run_cases(heap, ...)` runs
them all on any `HeapMemory` (the `/dev/shm` emulation in the interpreter, NVSHMEM on a GPU) and
returns plain numbers, so the same code proves both. `pool_cases` is the `RankPool` task.

Kernels take ranks and sizes unspecialised (`do_not_specialize`): one compilation serves every
rank. Heap layout (bytes): int64 signal words below `DATA`, then five int32 regions of `[R][n]`:
inbox (put+signal), fence inbox, store inbox, staging, fence staging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonep.kernels.common.sync import now_ns
from tritonep.transport import device

FLAGS = tl.constexpr(0)  # [R] put-with-signal flags, by source
STORE_FLAGS = tl.constexpr(512)  # [R] store-path flags, by source
WORDS = tl.constexpr(1024)  # [R] flag words put after a fence, by source
COUNTER = tl.constexpr(1536)  # count raised after a quiet
ADDS = tl.constexpr(1544)  # atomic_add target
FETCH_ADDS = tl.constexpr(1552)  # atomic_fetch_add target
PING = tl.constexpr(1560)  # ping-pong flag
SPARE = tl.constexpr(1568)  # nobody writes it: the timeout case waits on it
WORD_STAGE = tl.constexpr(1576)  # staging of the fence case's flag word
DATA = tl.constexpr(4096)
REGIONS = 5
MAX_RANKS = 64  # flag arrays of 512 bytes


def heap_bytes(num_ranks: int, n: int) -> int:
    return DATA.value + REGIONS * num_ranks * n * 4


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _region(heap, k, world, n):
    return (heap + DATA + k * world * n * 4).to(tl.pointer_type(tl.int32))


@triton.jit
def _words(heap, offset):
    return (heap + offset).to(tl.pointer_type(tl.int64))


@triton.jit
def _payload(src, dst, epoch, index):
    return epoch * 1000003 + src * 1009 + dst * 31 + index


@triton.jit
def _fill(ptr, n, src, dst, epoch, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        index = start + offsets
        tl.store(ptr + index, _payload(src, dst, epoch, index), mask=index < n)


@triton.jit
def _mismatches(ptr, n, src, dst, epoch, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        index = start + offsets
        inside = index < n
        got = tl.load(ptr + index, mask=inside, other=0)
        bad += tl.sum((inside & (got != _payload(src, dst, epoch, index))).to(tl.int32), axis=0)
    return bad


@triton.jit(do_not_specialize=["rank", "world", "epoch", "n"])
def _exchange_kernel(
    route,
    heap,
    rank,
    world,
    epoch,
    n,
    out,
    clock_addr,
    timeout_ns,
    SIG_OP: tl.constexpr,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Every rank puts a distinct payload with a signal to every rank (itself included), then checks
    what arrived once each signal is seen. `out[j]`: wrong elements from j, -1 if j's signal never
    came."""
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    flags = _words(heap, FLAGS)
    inbox = _region(heap, 0, world, n)
    stage = _region(heap, 3, world, n)
    for j in range(world):
        _fill(stage + j * n, n, rank, j, epoch, BLOCK)
    tl.debug_barrier()
    # One signal per epoch: SET writes the epoch, ADD counts epochs; either way flags[j] == epoch.
    value = epoch if SIG_OP == device.SIGNAL_SET else 1
    for j in range(world):
        pe, delta, direct = device.open_peer(route, rank, j, TRANSPORT, FORCE_PUT)
        device.put_signal_nbi_block(
            inbox + rank * n,
            stage + j * n,
            n,
            flags + rank,
            value,
            pe,
            delta,
            direct,
            SIG_OP,
            TRANSPORT,
            BLOCK,
        )
    for j in range(world):
        seen = device.wait_until(flags + j, epoch, deadline, clock_addr, USE_GLOBALTIMER)
        bad = _mismatches(inbox + j * n, n, j, rank, epoch, BLOCK)
        tl.store(out + j, tl.where(seen >= epoch, bad, -1))


@triton.jit(do_not_specialize=["rank", "world", "epoch", "n"])
def _fence_quiet_kernel(
    route,
    heap,
    rank,
    world,
    epoch,
    n,
    out,
    clock_addr,
    timeout_ns,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rank r sends to r+1: put, quiet, unordered count (data complete before the count);
    put, fence, put of a flag word (data lands before the word). Then checks what r-1 sent.
    `out[0]`, `out[1]`: wrong elements behind the count / the word, -1 if it never came."""
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    to = (rank + 1) % world
    source = (rank + world - 1) % world
    inbox = _region(heap, 0, world, n)
    fence_inbox = _region(heap, 1, world, n)
    stage = _region(heap, 3, world, n)
    fence_stage = _region(heap, 4, world, n)
    words = _words(heap, WORDS)
    word_stage = _words(heap, WORD_STAGE)
    counter = _words(heap, COUNTER)
    _fill(stage, n, rank, to, epoch, BLOCK)
    _fill(fence_stage, n, rank, to, epoch + 500, BLOCK)
    tl.store(word_stage, tl.cast(epoch, tl.int64))
    tl.debug_barrier()
    pe, delta, direct = device.open_peer(route, rank, to, TRANSPORT, FORCE_PUT)
    device.put_nbi_block(inbox + rank * n, stage, n, pe, delta, direct, TRANSPORT, BLOCK)
    device.quiet(TRANSPORT)
    device.atomic_add(counter, 1, pe, delta, direct, TRANSPORT)
    device.put_nbi_block(
        fence_inbox + rank * n, fence_stage, n, pe, delta, direct, TRANSPORT, BLOCK
    )
    device.fence(TRANSPORT)
    device.put_nbi_block(words + rank, word_stage, 1, pe, delta, direct, TRANSPORT, BLOCK)
    device.quiet(TRANSPORT)
    seen = device.wait_until(counter, epoch, deadline, clock_addr, USE_GLOBALTIMER)
    bad = _mismatches(inbox + source * n, n, source, rank, epoch, BLOCK)
    tl.store(out, tl.where(seen >= epoch, bad, -1))
    seen = device.wait_until(words + source, epoch, deadline, clock_addr, USE_GLOBALTIMER)
    bad = _mismatches(fence_inbox + source * n, n, source, rank, epoch + 500, BLOCK)
    tl.store(out + 1, tl.where(seen >= epoch, bad, -1))


@triton.jit(do_not_specialize=["rank", "world", "reps"])
def _atomics_kernel(
    route, heap, rank, world, reps, olds, TRANSPORT: tl.constexpr, FORCE_PUT: tl.constexpr
):
    """`reps` times per rank j (itself included): fetch-add 1 and add 3 at j; `olds[j, i]` the
    fetched values."""
    for j in range(world):
        pe, delta, direct = device.open_peer(route, rank, j, TRANSPORT, FORCE_PUT)
        for i in range(reps):
            old = device.atomic_fetch_add(_words(heap, FETCH_ADDS), 1, pe, delta, direct, TRANSPORT)
            tl.store(olds + j * reps + i, old)
            device.atomic_add(_words(heap, ADDS), 3, pe, delta, direct, TRANSPORT)


@triton.jit(do_not_specialize=["rank", "world", "epoch", "n"])
def _store_kernel(
    route,
    heap,
    rank,
    world,
    epoch,
    n,
    out,
    clock_addr,
    timeout_ns,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Plain stores to every direct peer, then a signal; `out[j]`: wrong elements from direct peer
    j,
    -1 if its signal never came, -2 if j is not direct."""
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    inbox = _region(heap, 2, world, n)
    flags = _words(heap, STORE_FLAGS)
    offsets = tl.arange(0, BLOCK)
    for j in range(world):
        pe, delta, direct = device.open_peer(route, rank, j, TRANSPORT, FORCE_PUT)
        if direct:
            for start in range(0, n, BLOCK):
                index = start + offsets
                device.store(
                    inbox + rank * n + index, _payload(rank, j, epoch, index), delta, mask=index < n
                )
            device.signal_op(flags + rank, epoch, pe, delta, direct, device.SIGNAL_SET, TRANSPORT)
    for j in range(world):
        pe, delta, direct = device.open_peer(route, rank, j, TRANSPORT, FORCE_PUT)
        result = tl.full([], -2, tl.int32)
        if direct:
            seen = device.wait_until(flags + j, epoch, deadline, clock_addr, USE_GLOBALTIMER)
            bad = _mismatches(inbox + j * n, n, j, rank, epoch, BLOCK)
            result = tl.where(seen >= epoch, bad, -1)
        tl.store(out + j, result)


@triton.jit(do_not_specialize=["rank", "world", "peer", "rounds", "n"])
def _ping_pong_kernel(
    route,
    heap,
    rank,
    world,
    peer,
    initiator,
    rounds,
    n,
    out,
    clock_addr,
    timeout_ns,
    TRANSPORT: tl.constexpr,
    FORCE_PUT: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """`rounds` round trips: the initiator puts round i with signal i, the peer echoes what came.
    `out`: rounds completed, wrong elements of the last echo (all equal `rounds`), ns from the end
    of round 1 to the end (round 1 absorbs the two launches' skew)."""
    deadline = now_ns(clock_addr, USE_GLOBALTIMER) + timeout_ns
    pe, delta, direct = device.open_peer(route, rank, peer, TRANSPORT, FORCE_PUT)
    flag = _words(heap, PING)
    message = _region(heap, 0, world, n)
    stage = _region(heap, 3, world, n)
    offsets = tl.arange(0, BLOCK)
    i = tl.full([], 1, tl.int32)
    ok = i > 0
    first = now_ns(clock_addr, USE_GLOBALTIMER)
    while ok & (i <= rounds):
        if initiator:
            tl.store(stage + offsets, i, mask=offsets < n)
            tl.debug_barrier()
            device.put_signal_nbi_block(
                message, stage, n, flag, i, pe, delta, direct, device.SIGNAL_SET, TRANSPORT, BLOCK
            )
            seen = device.wait_until(flag, i, deadline, clock_addr, USE_GLOBALTIMER)
        else:
            seen = device.wait_until(flag, i, deadline, clock_addr, USE_GLOBALTIMER)
            device.put_signal_nbi_block(
                message, message, n, flag, i, pe, delta, direct, device.SIGNAL_SET, TRANSPORT, BLOCK
            )
        if i == 1:
            first = now_ns(clock_addr, USE_GLOBALTIMER)
        ok = seen >= i
        i += ok.to(tl.int32)
    got = tl.load(message + offsets, mask=offsets < n, other=rounds)
    tl.store(out, (i - 1).to(tl.int64))
    tl.store(out + 1, tl.sum((got != rounds).to(tl.int32), axis=0).to(tl.int64))
    tl.store(out + 2, now_ns(clock_addr, USE_GLOBALTIMER) - first)


@triton.jit
def _timeout_kernel(heap, target, out, clock_addr, timeout_ns, USE_GLOBALTIMER: tl.constexpr):
    """Waits on a word nobody writes: `out = [value seen, ns waited]`."""
    start = now_ns(clock_addr, USE_GLOBALTIMER)
    seen = device.wait_until(
        _words(heap, SPARE), target, start + timeout_ns, clock_addr, USE_GLOBALTIMER
    )
    tl.store(out, seen)
    tl.store(out + 1, now_ns(clock_addr, USE_GLOBALTIMER) - start)


KERNELS = {
    "exchange": _exchange_kernel,
    "fence_quiet": _fence_quiet_kernel,
    "atomics": _atomics_kernel,
    "store": _store_kernel,
    "ping_pong": _ping_pong_kernel,
    "timeout": _timeout_kernel,
}


# -------------------------------------------------------------------------------------- host
class Launcher:
    """Launches the case kernels on one heap: the constexprs it needs, NVSHMEM linking when it
    needs it."""

    def __init__(self, heap, bootstrap, clock_addr: int, use_globaltimer: bool, timeout_s: float):
        self.heap = heap
        self.bootstrap = bootstrap
        self.dev = heap.route_table_dev.device
        self.base = heap.local.data_ptr()
        self.clock_addr = clock_addr
        self.use_globaltimer = use_globaltimer
        self.timeout_ns = int(timeout_s * 1e9)
        self._kernels = {}

    def kernel(self, name):
        if name not in self._kernels:
            kernel = KERNELS[name]
            if self.heap.transport == device.NVSHMEM.value and name != "timeout":
                from tritonep.transport.nvshmem import NvshmemKernel

                kernel = NvshmemKernel(kernel)
            self._kernels[name] = kernel
        return self._kernels[name]

    def constexprs(self, block: int | None = None) -> dict:
        flags = dict(
            TRANSPORT=self.heap.transport,
            FORCE_PUT=self.heap.force_put,
            USE_GLOBALTIMER=self.use_globaltimer,
        )
        if block is not None:
            flags["BLOCK"] = block
        return flags

    def sync(self) -> None:
        """Kernels done here and on every rank (the next case may overwrite what they read)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.bootstrap.barrier()

    def zero(self) -> None:
        self.heap.local.zero_()
        self.sync()


def run_cases(
    heap,
    bootstrap,
    *,
    n: int,
    block: int,
    epochs: int,
    reps: int,
    clock_addr: int,
    use_globaltimer: bool,
    timeout_s: float,
) -> dict:
    """Every case on `heap`; returns `{case: numbers}` (all-zero error counts mean it passed)."""
    go = Launcher(heap, bootstrap, clock_addr, use_globaltimer, timeout_s)
    rank, world = heap.rank, heap.world_size
    args = (heap.route_table_dev, go.base, rank, world)
    results: dict = {}
    go.zero()
    for sig_op, name in ((device.SIGNAL_SET, "exchange_set"), (device.SIGNAL_ADD, "exchange_add")):
        rows = []
        for epoch in range(1, epochs + 1):
            out = torch.zeros(world, dtype=torch.int32, device=go.dev)
            go.kernel("exchange")[(1,)](
                *args,
                epoch,
                n,
                out,
                go.clock_addr,
                go.timeout_ns,
                SIG_OP=sig_op,
                **go.constexprs(block),
            )
            go.sync()
            rows.append(out.tolist())
        results[name] = rows
        # SET leaves the last epoch, ADD the count of epochs: both `epochs`. A SET acting as an add
        # (any op code NVSHMEM does not know as SET) leaves 1 + 2 + ... instead.
        results[name + "_flags"] = heap.local[: DATA.value].view(torch.int64)[:world].tolist()
        go.zero()
    rows = []
    for epoch in range(1, epochs + 1):
        out = torch.zeros(2, dtype=torch.int32, device=go.dev)
        go.kernel("fence_quiet")[(1,)](
            *args, epoch, n, out, go.clock_addr, go.timeout_ns, **go.constexprs(block)
        )
        go.sync()
        rows.append(out.tolist())
    results["fence_quiet"] = rows
    rows = []
    for epoch in range(1, epochs + 1):
        out = torch.zeros(world, dtype=torch.int32, device=go.dev)
        go.kernel("store")[(1,)](
            *args, epoch, n, out, go.clock_addr, go.timeout_ns, **go.constexprs(block)
        )
        go.sync()
        rows.append(out.tolist())
    results["store"] = rows
    olds = torch.full((world, reps), -1, dtype=torch.int64, device=go.dev)
    go.kernel("atomics")[(1,)](
        *args, reps, olds, TRANSPORT=heap.transport, FORCE_PUT=heap.force_put
    )
    go.sync()
    words = heap.local[: DATA.value].view(torch.int64).cpu()
    results["atomics"] = {
        "adds": int(words[ADDS.value // 8]),
        "fetch_adds": int(words[FETCH_ADDS.value // 8]),
        "olds": olds.tolist(),
    }
    out = torch.zeros(2, dtype=torch.int64, device=go.dev)
    go.kernel("timeout")[(1,)](
        go.base, 1, out, go.clock_addr, int(0.05e9), USE_GLOBALTIMER=use_globaltimer
    )
    go.sync()
    results["timeout"] = {"seen": int(out[0]), "waited_ns": int(out[1])}
    return results


def ping_pong(
    heap,
    bootstrap,
    *,
    rounds: int,
    n: int,
    block: int,
    clock_addr: int,
    use_globaltimer: bool,
    timeout_s: float,
) -> dict:
    """Ranks 0 and 1 play `rounds` round trips of `n` int32 (others idle); returns rounds completed,
    wrong elements, and on rank 0 the mean round trip in µs over rounds 2..`rounds` (device
    clock)."""
    go = Launcher(heap, bootstrap, clock_addr, use_globaltimer, timeout_s)
    go.zero()
    rank = heap.rank
    out = torch.zeros(3, dtype=torch.int64, device=go.dev)
    if rank < 2:
        go.kernel("ping_pong")[(1,)](
            heap.route_table_dev,
            go.base,
            rank,
            heap.world_size,
            1 - rank,
            rank == 0,
            rounds,
            n,
            out,
            go.clock_addr,
            go.timeout_ns,
            **go.constexprs(block),
        )
    go.sync()
    if rank >= 2:
        return {"rank": rank}
    rounds_done, bad, ns = out.tolist()
    return {
        "rank": rank,
        "rounds": rounds_done,
        "bad": bad,
        "payload_bytes": 4 * n,
        "mean_round_trip_us": ns / max(rounds - 1, 1) / 1e3,
    }


def problems(results: dict, direct: list[bool], reach: list[bool], rank: int) -> list[str]:
    """What is wrong in `run_cases` results of `rank` (`direct[j]`: j takes the store path,
    `reach[j]`: j's memory is mapped here); empty when every case passed."""
    world = len(direct)
    found = []
    for name in ("exchange_set", "exchange_add"):
        for epoch, row in enumerate(results[name], 1):
            if row != [0] * world:
                found.append(
                    f"{name} epoch {epoch}: wrong elements per source {row} (-1 = no signal)"
                )
        if results[name + "_flags"] != [len(results[name])] * world:
            found.append(
                f"{name}: signal words {results[name + '_flags']}, want {len(results[name])} each"
            )
    for epoch, row in enumerate(results["fence_quiet"], 1):
        if row != [0, 0]:
            found.append(
                f"fence/quiet epoch {epoch}: wrong elements [after quiet, after fence] {row}"
            )
    for epoch, row in enumerate(results["store"], 1):
        if row != [0 if d else -2 for d in direct]:
            found.append(f"stores epoch {epoch}: {row}")
    atomics = results["atomics"]
    reps = len(atomics["olds"][0])
    if (atomics["adds"], atomics["fetch_adds"]) != (3 * world * reps, world * reps):
        found.append(f"atomics: adds {atomics['adds']}, fetch-adds {atomics['fetch_adds']}")
    if results["timeout"]["seen"] != 0 or results["timeout"]["waited_ns"] < 0.05e9:
        found.append(f"bounded wait: {results['timeout']}")
    if results["peer_ptrs"] != [int(r) for r in reach]:
        found.append(f"mapped peers {results['peer_ptrs']}, want {[int(r) for r in reach]}")
    ping = results.get("ping_pong", {})
    if rank < 2 and ping and (ping["bad"] != 0 or ping["rounds"] != ping["expected"]):
        found.append(f"ping-pong: {ping}")
    return found


def fetch_add_problems(all_results: list[dict]) -> list[str]:
    """Fetch-adds at each target must hand out 0..R*reps-1, each exactly once, across all ranks."""
    found = []
    for target in range(len(all_results)):
        olds = sorted(v for result in all_results for v in result["atomics"]["olds"][target])
        if olds != list(range(len(olds))):
            found.append(f"fetch-add results at rank {target}: {olds}")
    return found


# ------------------------------------------------------------------------------- RankPool task
def pool_cases(
    ctx,
    ranks_per_node: int,
    force_put: bool,
    n: int = 24,
    block: int = 16,
    epochs: int = 2,
    reps: int = 2,
    rounds: int = 3,
) -> dict:
    """CPU task: every case on an `EmulatedPeerMemory` of `ranks_per_node`-rank nodes."""
    from tritonep.runtime import clock as _clock
    from tritonep.transport.bootstrap import Bootstrap
    from tritonep.transport.nvshmem import EmulatedPeerMemory

    bootstrap = Bootstrap(ctx.group)
    heap = EmulatedPeerMemory(bootstrap, heap_bytes(ctx.world_size, n), ranks_per_node, force_put)
    try:
        timing = dict(clock_addr=_clock.clock_address(), use_globaltimer=False, timeout_s=20.0)
        results = run_cases(heap, bootstrap, n=n, block=block, epochs=epochs, reps=reps, **timing)
        results["ping_pong"] = ping_pong(
            heap, bootstrap, rounds=rounds, n=min(n, block), block=block, **timing
        )
        results["ping_pong"]["expected"] = rounds
        results["peer_ptrs"] = [int(p != 0) for p in heap.peer_ptrs]
        return results
    finally:
        heap.close()


def lifecycle_task(ctx, cycles: int) -> dict:
    """Create and close an emulated heap `cycles` times; close twice at the end."""
    from tritonep.transport.bootstrap import Bootstrap
    from tritonep.transport.nvshmem import EmulatedPeerMemory

    bootstrap = Bootstrap(ctx.group)
    for _ in range(cycles):
        heap = EmulatedPeerMemory(bootstrap, heap_bytes(ctx.world_size, 8), 1)
        heap.local.fill_(1)
        heap.close()
    heap.close()
    bootstrap.barrier()
    return {
        "peer_ptrs": heap.peer_ptrs,
        "local": heap.local.numel(),
        "route": tuple(heap.route_table_dev.shape),
    }


# -------------------------------------------------------------------------------- AOT (sm_90)
def aot_compile(transport: int, force_put: bool, extern_libs: dict | None = None) -> dict:
    """Compile every case kernel for sm_90 without a GPU; returns `{kernel: NVSHMEM symbols left in
    its PTX}` (run where TRITON_INTERPRET is unset)."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = {}
    for name, fn in KERNELS.items():
        if name == "timeout" and transport != device.STORES.value:
            continue
        types = {
            "route": "*i64",
            "olds": "*i64",
            "out": "*i64" if name == "timeout" else "*i32",
            "heap": "i64",
            "clock_addr": "i64",
            "timeout_ns": "i64",
            "initiator": "i1",
        }
        values = dict(
            TRANSPORT=transport,
            FORCE_PUT=force_put,
            USE_GLOBALTIMER=True,
            BLOCK=1024,
            SIG_OP=device.SIGNAL_ADD.value,
        )
        signature = {
            arg: "constexpr" if arg.isupper() else types.get(arg, "i32") for arg in fn.arg_names
        }
        constexprs = {arg: values[arg] for arg in fn.arg_names if arg.isupper()}
        options = {"extern_libs": tuple(extern_libs.items())} if extern_libs else {}
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
        report[name] = sorted(set(re.findall(r"\bnvshmemx?_(?!cases)\w+", compiled.asm["ptx"])))
    return report
