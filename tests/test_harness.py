"""Tests of the multi-process harness itself (tritonep.testing.dist).

Spawning a worker costs 2-3 s on the 2-core CI box, so the tests share cached pools and are ordered
so that only the fault tests pay for fresh ones (whole file: ~30 s).
Task functions are module-level: the workers unpickle them by reference.
"""

import os
import signal
import time

import pytest

from tritonep.testing.dist import RankError, close_all_pools, sweep_shm

WORLD_SIZES = [1, 2, 3]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the pool reaps its workers, so a dead one is not a zombie
    except ProcessLookupError:
        return False
    return True


def _whoami(ctx, tag):
    return ctx.rank, ctx.world_size, tag, os.getpid(), os.environ.get("TRITON_INTERPRET")


def _all_reduce(ctx, base):
    import torch
    import torch.distributed as dist

    t = torch.tensor([base + ctx.rank], dtype=torch.int64)
    dist.all_reduce(t, group=ctx.group)
    return int(t.item())


def _count_calls(ctx):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return ctx.state["calls"]


def _raise_on(ctx, rank):
    if ctx.rank == rank:
        raise ValueError(f"boom from rank {ctx.rank}")
    return ctx.rank


def _sleep_on(ctx, rank, seconds):
    if ctx.rank == rank:
        time.sleep(seconds)
    return ctx.rank


def _sigkill_on(ctx, rank):
    if ctx.rank == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.rank


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_results_are_ordered_by_rank(cpu_pool, world_size):
    pool = cpu_pool(world_size)
    out = pool.run(_whoami, "tag", timeout=60)
    assert [o[:3] for o in out] == [(r, world_size, "tag") for r in range(world_size)]
    assert [o[3] for o in out] == pool.pids
    assert [o[4] for o in out] == ["1"] * world_size  # env applied in the workers
    assert cpu_pool(world_size) is pool  # cached


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce_over_group(cpu_pool, world_size):
    # sum over r of (10 + r) = 10 R + R (R - 1) / 2
    expected = 10 * world_size + world_size * (world_size - 1) // 2
    assert cpu_pool(world_size).run(_all_reduce, 10, timeout=60) == [expected] * world_size


def test_state_persists_across_tasks(cpu_pool):
    pool = cpu_pool(2)
    first = pool.run(_count_calls, timeout=60)
    assert pool.run(_count_calls, timeout=60) == [n + 1 for n in first]


def test_unpicklable_task_is_rejected_before_sending(cpu_pool):
    pool = cpu_pool(1)
    with pytest.raises(TypeError, match="module-level function"):
        pool.run(lambda ctx: 0)
    assert pool.run(_whoami, "after", timeout=60)[0][2] == "after"


@pytest.mark.parametrize("world_size", [2, 3])
def test_exception_surfaces_with_traceback_and_pool_survives(cpu_pool, world_size):
    pool = cpu_pool(world_size)
    bad = world_size - 1
    with pytest.raises(RankError) as info:
        pool.run(_raise_on, bad, timeout=60)
    err = info.value
    assert list(err.failures) == [bad]
    failure = err.failures[bad]
    assert (failure.kind, failure.exc_type) == ("raised", "ValueError")
    text = str(err)
    assert f"rank {bad} raised ValueError" in text
    assert f"ValueError: boom from rank {bad}" in text
    assert "Traceback" in text and "_raise_on" in text  # the worker's formatted traceback
    assert err.results[:bad] == list(range(bad))
    assert not pool.broken and cpu_pool(world_size) is pool
    assert pool.run(_all_reduce, 0, timeout=60) == [world_size * (world_size - 1) // 2] * world_size


def test_hung_rank_breaks_pool_and_get_pool_replaces_it(cpu_pool):
    pool = cpu_pool(2)
    pids = pool.pids
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        pool.run(_sleep_on, 1, 1000, timeout=3)
    assert time.monotonic() - start < 3 + 5  # SIGUSR1 dump wait + SIGTERM grace
    err = info.value
    assert list(err.failures) == [1] and err.failures[1].kind == "hung"
    assert err.results[0] == 0
    assert "rank 1 hung" in str(err)
    assert "_sleep_on" in err.failures[1].stderr_tail  # faulthandler's stack dump of rank 1
    assert pool.broken and pool.closed
    assert not any(_alive(pid) for pid in pids)

    fresh = cpu_pool(2)
    assert fresh is not pool and not fresh.broken
    assert fresh.run(_all_reduce, 0, timeout=60) == [1, 1]


def test_rank_that_dies_is_reported(cpu_pool):
    pool = cpu_pool(2)
    with pytest.raises(RankError) as info:
        pool.run(_sigkill_on, 1, timeout=30)
    err = info.value
    assert list(err.failures) == [1] and err.failures[1].kind == "died"
    assert "killed by signal SIGKILL" in str(err)
    assert err.results[0] == 0
    assert pool.broken and pool.closed


def test_kill_rank_then_survivors_still_answer(cpu_pool):
    pool = cpu_pool(3)
    pool.kill(2)
    assert pool.broken
    with pytest.raises(RankError) as info:
        pool.run(_whoami, "survivor", timeout=30)
    err = info.value
    assert list(err.failures) == [2] and err.failures[2].kind == "died"
    assert [r[:3] for r in err.results[:2]] == [(0, 3, "survivor"), (1, 3, "survivor")]
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_whoami, "x")


def test_close_leaves_no_worker_processes(cpu_pool):
    shm_before = sweep_shm()
    pool = cpu_pool(1)
    pids = pool.pids
    assert all(_alive(pid) for pid in pids)
    close_all_pools()
    assert pool.closed
    assert not any(_alive(pid) for pid in pids)
    assert sweep_shm() == shm_before  # the harness itself creates no shm files
