"""Buffer lifetime on the CPU backend (reference §5.2, §5.5, §14.13): create/destroy, several
buffers per process, garbage collection, the never-destroyed warning, and no leaked peer memory.

Each task runs on 2 rank processes (Triton interpreter, `/dev/shm` peer memory). Leak checks:
- `/dev/shm/tritonep-*` files: none may remain (each rank unlinks its file right after every rank
  mapped it, so a leftover file means a lost unlink);
- the process's open file descriptors and its memory mappings of peer memory (lines of
  `/proc/self/maps` that mention tritonep or /dev/shm) must not grow from one Buffer to the next:
  `destroy()` must unmap every peer, not leave it to the garbage collector.

Task functions are module-level: the workers unpickle them by reference.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time

import pytest
import torch
from small_case import NUM_EXPERTS, in_rank, routing, shm_leaks, tokens

import tritonep
from tritonep.testing.dist import close_all_pools
from tritonep.transport.shm import tritonep_files

SMALL, LARGE = 1 << 20, 2 << 20  # num_nvl_bytes of the two buffer sizes used below
ITERATIONS = 8


# ---------------------------------------------------------------------------------------- helpers
def _num_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _peer_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.rstrip("\n") for line in f if "tritonep" in line or "/dev/shm" in line]


@contextlib.contextmanager
def capture_stderr(out: dict):
    """Capture file descriptor 2 (Python-level and C-level writes) into `out["text"]`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out["text"] = tmp.read().decode("utf-8", "replace")


def _tritonep_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "tritonep" in line.lower()]


def roundtrip(buffer, rank: int, num_ranks: int, seed: int, hidden: int = 32):
    """One non-cached dispatch and one combine, checked with plain torch; (x, recv_x, handle)."""
    config = tritonep.Config(4, 4, 64)
    idx = routing(rank, seed)
    x = tokens(rank, hidden)
    weights = torch.full(idx.shape, 0.5, dtype=torch.float32)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(idx, NUM_EXPERTS)
    assert torch.equal(itr, in_rank(idx, num_ranks)), f"is_token_in_rank {itr.tolist()}"
    recv_x, _, _, counts, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=idx,
        topk_weights=weights,
        config=config,
    )
    # Rows arrive by source rank, then source token (reference §14.1).
    want = torch.cat(
        [tokens(s, hidden)[in_rank(routing(s, seed), num_ranks)[:, rank]] for s in range(num_ranks)]
    )
    assert torch.equal(recv_x, want), (
        f"seed {seed}: recv_x {recv_x[:, 0].tolist()} != {want[:, 0].tolist()}"
    )
    local = NUM_EXPERTS // num_ranks
    want_counts = [
        sum(int((routing(s, seed) == rank * local + i).sum()) for s in range(num_ranks))
        for i in range(local)
    ]
    assert counts == want_counts, f"seed {seed}: per-expert counts {counts} != {want_counts}"
    combined, _, _ = buffer.combine(recv_x, handle, config=config)
    want_combined = (x.float() * itr.sum(1, keepdim=True)).to(
        torch.bfloat16
    )  # unweighted sum of the copies
    assert torch.equal(combined, want_combined), (
        f"seed {seed}: combined {combined[:, 0].tolist()} != {want_combined[:, 0].tolist()}"
    )
    return x, recv_x, handle


def _all_pids(ctx) -> list[int]:
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, os.getpid(), group=ctx.group)
    return out


def _own_files(pids) -> list[str]:
    return [path for path, pid in tritonep_files() if pid in pids]


# ------------------------------------------------------------------------------------------ tasks
def _create_destroy_loop(ctx, iterations: int) -> dict:
    pids = _all_pids(ctx)
    maps_before = _peer_maps()
    fds, maps, files = [], [], []
    captured: dict = {}
    with capture_stderr(captured):
        for i in range(iterations):
            buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL, explicitly_destroy=True)
            assert buffer.explicitly_destroy and buffer.num_nvl_bytes == SMALL
            mapped = len(_peer_maps())
            roundtrip(buffer, ctx.rank, ctx.world_size, seed=i)
            buffer.destroy()
            # destroy() itself must release everything: `buffer` is still referenced here.
            assert buffer.runtime is None
            fds.append(_num_fds())
            maps.append(len(_peer_maps()))
            files.append(_own_files(pids))
            del buffer
    return dict(
        maps_before=len(maps_before),
        maps_while_alive=mapped,
        maps=maps,
        fds=fds,
        files=files,
        maps_left=_peer_maps(),
        warnings=_tritonep_lines(captured["text"]),
    )


def _two_buffers(ctx) -> dict:
    from tritonep import EPStateError

    rank, world = ctx.rank, ctx.world_size
    maps_before = len(_peer_maps())
    captured: dict = {}
    log = []
    with capture_stderr(captured):
        small = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL, explicitly_destroy=True)
        large = tritonep.Buffer(ctx.group, num_nvl_bytes=LARGE, explicitly_destroy=True)
        both_alive = len(_peer_maps())
        # Alternate between the two buffers, with different hidden sizes.
        for step, (buffer, hidden) in enumerate(
            [(small, 32), (large, 64), (small, 32), (large, 64), (large, 32), (small, 64)]
        ):
            roundtrip(buffer, rank, world, seed=step, hidden=hidden)
            log.append(f"step {step} ok")
        small.destroy()
        one_alive = len(_peer_maps())
        errors = {}
        for name, call in (
            ("dispatch", lambda: small.dispatch(tokens(rank, 32), handle=None)),
            (
                "get_dispatch_layout",
                lambda: small.get_dispatch_layout(routing(rank, 0), NUM_EXPERTS),
            ),
            ("destroy twice", small.destroy),
        ):
            try:
                call()
                errors[name] = None
            except Exception as e:  # noqa: BLE001 (reported to the parent)
                errors[name] = (isinstance(e, EPStateError), type(e).__name__, str(e))
        # The other buffer is unaffected; then a new buffer of the first size, used alternately.
        roundtrip(large, rank, world, seed=10, hidden=64)
        small = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL, explicitly_destroy=True)
        for step, buffer in enumerate([small, large, small]):
            roundtrip(buffer, rank, world, seed=20 + step, hidden=32)
            log.append(f"re-created step {step} ok")
        small.destroy()
        large.destroy()
        maps_after = len(_peer_maps())
    return dict(
        maps_before=maps_before,
        both_alive=both_alive,
        one_alive=one_alive,
        maps_after=maps_after,
        errors=errors,
        log=log,
        warnings=_tritonep_lines(captured["text"]),
    )


def _gc_release(ctx, late_rank_delay: float) -> dict:
    """Non-explicit buffers: destroy() is refused, and GC releases them without any collective.

    Rank 0 drops its buffers while rank 1 still holds (and sleeps): a collective in the GC path
    would block rank 0 for the length of the sleep.
    """
    from tritonep import EPStateError

    rank, world = ctx.rank, ctx.world_size
    maps_before = len(_peer_maps())
    fds_before = _num_fds()
    captured: dict = {}
    out: dict = {}
    with capture_stderr(captured):
        plain = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL)
        cyclic = tritonep.Buffer(ctx.group, num_nvl_bytes=LARGE)
        cyclic._test_self_reference = cyclic  # only the cycle collector can free this one
        roundtrip(plain, rank, world, seed=1)
        roundtrip(cyclic, rank, world, seed=2, hidden=64)
        try:
            plain.destroy()
            out["destroy_non_explicit"] = None
        except Exception as e:  # noqa: BLE001
            out["destroy_non_explicit"] = (isinstance(e, EPStateError), type(e).__name__, str(e))
        out["maps_alive"] = len(_peer_maps())
        if rank != 0:
            time.sleep(late_rank_delay)
        t0 = time.monotonic()
        del plain
        out["maps_after_del"] = len(_peer_maps())
        del cyclic
        gc.collect()
        out["gc_seconds"] = time.monotonic() - t0
        out["maps_after_gc"] = len(_peer_maps())
    out.update(
        maps_before=maps_before,
        fds_before=fds_before,
        fds_after=_num_fds(),
        warnings=_tritonep_lines(captured["text"]),
        maps_left=_peer_maps(),
    )
    return out


def _never_destroyed(ctx) -> dict:
    """explicitly_destroy=True but destroy() never called: finalisation prints one warning line."""
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL, explicitly_destroy=True)
    roundtrip(buffer, ctx.rank, ctx.world_size, seed=3)
    import torch.distributed as dist

    dist.barrier(group=ctx.group)  # both ranks are done with the buffer before either drops it
    captured: dict = {}
    with capture_stderr(captured):
        del buffer
        gc.collect()
    return dict(
        text=captured["text"],
        lines=[line for line in captured["text"].splitlines() if line.strip()],
    )


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module", autouse=True)
def _pools_closed_and_shm_clean():
    yield
    close_all_pools()
    leaks = shm_leaks()
    assert leaks == [], (
        f"/dev/shm files left after the lifecycle tests and closing every pool: {leaks}"
    )


def test_create_destroy_loop_does_not_leak(cpu_pool):
    pool = cpu_pool(2)
    results = pool.run(_create_destroy_loop, ITERATIONS, timeout=120)
    for rank, r in enumerate(results):
        info = f"rank {rank}: {r}"
        assert r["maps_while_alive"] > r["maps_before"], (
            f"peer memory is not visible in /proc/self/maps? {info}"
        )
        assert all(not f for f in r["files"]), (
            f"/dev/shm files of the ranks remain after destroy(): {info}"
        )
        assert r["maps"] == [r["maps_before"]] * ITERATIONS, (
            "peer-memory mappings remain after destroy() (count per iteration vs "
            f"{r['maps_before']} before the first Buffer): {r['maps']}; left: {r['maps_left']}"
        )
        assert max(r["fds"]) <= r["fds"][0], (
            f"open file descriptors grow across create/destroy: {r['fds']}"
        )
        assert r["warnings"] == [], f"destroyed buffers must not warn: {r['warnings']}"
    assert shm_leaks(pool.pids) == [], "tritonep files left in /dev/shm"


def test_two_buffers_alternate_destroy_and_recreate(cpu_pool):
    pool = cpu_pool(2)
    results = pool.run(_two_buffers, timeout=120)
    for rank, r in enumerate(results):
        assert r["maps_before"] < r["one_alive"] < r["both_alive"], (
            f"rank {rank}: mapping counts {r}"
        )
        assert r["maps_after"] == r["maps_before"], (
            f"rank {rank}: mappings remain after destroying both: {r}"
        )
        for name, error in r["errors"].items():
            assert error is not None, f"rank {rank}: {name} on a destroyed buffer did not raise"
            assert error[0], (
                f"rank {rank}: {name} on a destroyed buffer must raise EPStateError, got "
                f"{error[1:]}"
            )
            assert "destroy" in error[2], (
                f"rank {rank}: {name}: message should say the buffer is destroyed: {error[2]}"
            )
        assert r["warnings"] == [], f"rank {rank}: destroyed buffers must not warn: {r['warnings']}"
    assert shm_leaks(pool.pids) == []


def test_gc_releases_non_explicit_buffers_without_collective(cpu_pool):
    pool = cpu_pool(2)
    delay = 1.5
    results = pool.run(_gc_release, delay, timeout=120)
    for rank, r in enumerate(results):
        info = f"rank {rank}: {r}"
        destroy = r["destroy_non_explicit"]
        assert destroy is not None and destroy[0], (
            f"destroy() without explicitly_destroy must raise EPStateError: {info}"
        )
        assert r["maps_alive"] > r["maps_before"], info
        assert r["maps_after_gc"] == r["maps_before"], (
            f"GC did not release the peer mappings: {info}"
        )
        assert r["fds_after"] <= r["fds_before"], f"file descriptors leaked: {info}"
        assert r["warnings"] == [], f"non-explicit buffers must not warn on GC: {info}"
    # Rank 0 collected while rank 1 slept: a collective on the GC path would have blocked it.
    assert results[0]["gc_seconds"] < delay / 3, (
        f"GC of a Buffer blocked rank 0 for {results[0]['gc_seconds']:.2f} s"
    )
    assert shm_leaks(pool.pids) == []


def test_never_destroyed_explicit_buffer_warns_once(cpu_pool):
    pool = cpu_pool(2)
    results = pool.run(_never_destroyed, timeout=120)
    for rank, r in enumerate(results):
        lines = r["lines"]
        print(f"rank {rank} stderr on GC: {lines}")
        assert len(lines) == 1, (
            f"rank {rank}: expected exactly one warning line on stderr, got {lines}"
        )
        text = lines[0].lower()
        assert "tritonep" in text and "destroy" in text and "leak" in text, (
            f"rank {rank}: unclear warning: {lines[0]}"
        )
    assert shm_leaks(pool.pids) == []


def _pooled_outputs(ctx) -> dict:
    """Layout results kept across later calls stay intact; dropped ones are handed out again;
    destroy() lets go of the pooled ones."""
    from tritonep import reference

    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=SMALL, explicitly_destroy=True)
    first_idx, second_idx = routing(ctx.rank, 1), routing(ctx.rank, 2)
    kept = buffer.get_dispatch_layout(first_idx, NUM_EXPERTS)[:4]
    second = buffer.get_dispatch_layout(second_idx, NUM_EXPERTS)[:4]
    intact = all(
        (got is None and want is None) or torch.equal(got, want)
        for outputs, idx in ((kept, first_idx), (second, second_idx))
        for got, want in zip(
            outputs, reference.layout(idx, NUM_EXPERTS, ctx.world_size, ctx.world_size), strict=True
        )
    )
    distinct = kept[3].data_ptr() != second[3].data_ptr()
    address = second[3].data_ptr()
    del second
    gc.collect()  # the Triton interpreter leaves its argument copies in a reference cycle
    third = buffer.get_dispatch_layout(first_idx, NUM_EXPERTS)
    reused = third[3].data_ptr() == address
    storage = third[3].untyped_storage()
    del third
    gc.collect()
    uses = torch._C._storage_Use_Count(storage._cdata)
    buffer.destroy()
    released = torch._C._storage_Use_Count(storage._cdata) < uses
    return dict(intact=intact, distinct=distinct, reused=reused, released=released)


def test_pooled_outputs_are_never_shared_with_a_holder(cpu_pool):
    results = cpu_pool(2).run(_pooled_outputs, timeout=120)
    for rank, r in enumerate(results):
        assert r == dict(intact=True, distinct=True, reused=True, released=True), (rank, r)
