"""Faults on the CPU backend (reference §14.6, §14.7): no hangs, no silent corruption, clear errors.

- a stalled rank (alive, never makes the call): the waiting rank raises `EPTimeoutError` after
  `TRITONEP_TIMEOUT_S` naming itself, the phase and the missing peer; its buffer is poisoned
  (`EPStateError`) afterwards; both ranks return normally, so the pool stays usable;
- a killed rank (SIGKILL while its peer waits in a dispatch): the survivor raises `EPTimeoutError`,
  the pool reports the rank as died and closes, and nothing is left in /dev/shm;
- ranks calling with different geometry: every rank raises `EPInvalidArgument` (the ranks compare
  layout fingerprints as they open the call: in the counting notify of a dispatch, in the data
  launch of a cached dispatch or a combine) instead of hanging in the data kernel.

The pools here use `TRITONEP_TIMEOUT_S=3`, a distinct env key, so they never share workers with
other test modules; a broken pool is replaced by `get_pool` and never reused. Task functions are
module-level: the workers unpickle them by reference.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
from small_case import NUM_EXPERTS, in_rank, pid_alive, routing, shm_leaks, tokens

import tritonep
from tritonep.testing.dist import RankError, close_all_pools

TIMEOUT_S = 3.0
FAULT_ENV = {"TRITONEP_TIMEOUT_S": "3"}
STALL_S = TIMEOUT_S + 2.0  # how long the stalled rank stays away (it never makes the call)
RAISE_WITHIN_S = 10.0  # the waiting rank must raise within this (spec: after TRITONEP_TIMEOUT_S)
TASK_TIMEOUT_S = 20.0  # harness limit of one task: a hang shows up as 'hung' with stack dumps

NVL_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------- helpers
def _config():
    return tritonep.Config(4, 4, 64)


def _dispatch_args(buffer, rank: int, seed: int, hidden: int = 32) -> dict:
    idx = routing(rank, seed)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(idx, NUM_EXPERTS)
    return dict(
        x=tokens(rank, hidden),
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=idx,
        topk_weights=torch.full(idx.shape, 0.5, dtype=torch.float32),
        config=_config(),
    )


def good_roundtrip(buffer, rank: int, num_ranks: int, seed: int = 0):
    """A healthy non-cached dispatch, cached dispatch and combine, checked with plain torch."""
    args = _dispatch_args(buffer, rank, seed)
    recv_x, _, _, _, handle, _ = buffer.dispatch(**args)
    want = torch.cat(
        [tokens(s, 32)[in_rank(routing(s, seed), num_ranks)[:, rank]] for s in range(num_ranks)]
    )
    assert torch.equal(recv_x, want), f"recv_x {recv_x[:, 0].tolist()} != {want[:, 0].tolist()}"
    cached = buffer.dispatch(args["x"], handle=handle, config=_config())[0]
    assert torch.equal(cached, want), "cached dispatch differs"
    combined = buffer.combine(recv_x, handle, config=_config())[0]
    want_combined = (args["x"].float() * args["is_token_in_rank"].sum(1, keepdim=True)).to(
        torch.bfloat16
    )
    assert torch.equal(combined, want_combined), "combine differs"
    return args, recv_x, handle


def _attempt(call) -> dict:
    """Run `call`, timing it; describe the exception (type, its tritonep classes, message)."""
    t0 = time.monotonic()
    try:
        call()
        error = None
    except Exception as e:  # noqa: BLE001 (described to the parent)
        error = dict(
            type=type(e).__name__,
            message=str(e),
            timeout=isinstance(e, tritonep.EPTimeoutError),
            invalid=isinstance(e, tritonep.EPInvalidArgument),
            state=isinstance(e, tritonep.EPStateError),
        )
    return dict(error=error, seconds=time.monotonic() - t0)


def _call(buffer, op: str, args: dict, recv_x, handle):
    if op == "dispatch":
        return lambda: buffer.dispatch(**args)
    if op == "cached_dispatch":
        return lambda: buffer.dispatch(args["x"], handle=handle, config=_config())
    if op == "combine":
        return lambda: buffer.combine(recv_x, handle, config=_config())
    raise ValueError(op)


# ------------------------------------------------------------------------------------------ tasks
def _sync_check(ctx) -> list:
    """Proves the pool is healthy: a barrier and an all-gather across every rank."""
    import torch.distributed as dist

    dist.barrier(group=ctx.group)
    out = [None] * ctx.world_size
    dist.all_gather_object(out, ctx.rank, group=ctx.group)
    return out


def _stall_task(ctx, op: str, stall_s: float) -> dict:
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    args, recv_x, handle = good_roundtrip(buffer, ctx.rank, ctx.world_size)
    if ctx.rank == 1:
        time.sleep(stall_s)  # alive but never makes the call
        return {"rank": 1}
    first = _attempt(_call(buffer, op, args, recv_x, handle))
    # The buffer is poisoned now: every later data-path call raises EPStateError at once.
    later = {
        name: _attempt(_call(buffer, name, args, recv_x, handle))
        for name in ("dispatch", "cached_dispatch", "combine")
    }
    later["get_dispatch_layout"] = _attempt(
        lambda: buffer.get_dispatch_layout(args["topk_idx"], NUM_EXPERTS)
    )
    return {"rank": 0, "first": first, "later": later}


def _kill_setup(ctx) -> int:
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    good_roundtrip(buffer, ctx.rank, ctx.world_size)
    ctx.state["kill_buffer"] = buffer
    return os.getpid()


def _kill_task(ctx) -> dict:
    buffer = ctx.state["kill_buffer"]
    if ctx.rank == 1:
        time.sleep(60)  # SIGKILLed by the parent long before this ends
        return {"rank": 1}
    args = _dispatch_args(buffer, ctx.rank, seed=1)
    return {"rank": 0, "first": _attempt(lambda: buffer.dispatch(**args))}


def _mismatch_task(ctx, op: str) -> dict:
    """Every rank calls `op` with a hidden size of its own. A dispatch's counting notify compares
    the geometry fingerprints; a cached dispatch or a combine has no notify launch, and its data
    launch compares them as it opens the call."""
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    _, recv_x, handle = good_roundtrip(buffer, ctx.rank, ctx.world_size)
    hidden = 64 if ctx.rank == 0 else 128
    args = _dispatch_args(buffer, ctx.rank, seed=2, hidden=hidden)
    rows = torch.ones((recv_x.size(0), hidden), dtype=torch.bfloat16)  # what a combine returns
    call = _call(buffer, op, args, rows, handle)
    return {"rank": ctx.rank, "hidden": hidden, "first": _attempt(call)}


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module", autouse=True)
def _pools_closed_and_shm_clean():
    yield
    close_all_pools()
    leaks = shm_leaks()
    assert leaks == [], f"/dev/shm files left after the fault tests and closing every pool: {leaks}"


def _fault_pool(cpu_pool):
    pool = cpu_pool(2, **FAULT_ENV)
    assert not pool.broken
    return pool


def _assert_pool_usable(pool, after: str):
    assert not pool.broken, f"the pool broke during {after}"
    assert pool.run(_sync_check, timeout=TASK_TIMEOUT_S) == [[0, 1], [0, 1]], (
        f"pool unusable after {after}"
    )


def _timeout_message_ok(message: str, phase: str) -> list[str]:
    """What an EPTimeoutError message lacks: this rank (0), the phase, and the missing peer (1)."""
    missing = []
    if not re.search(r"\brank 0\b", message):
        missing.append("this rank ('rank 0')")
    if phase not in message:
        missing.append(f"the phase ({phase!r})")
    if not re.search(r"\brank 1\b", message):
        missing.append("the missing peer ('rank 1')")
    # Quoted progress of the peer must show what was missing (not e.g. "saw 4, needed 4").
    for saw, needed in re.findall(r"saw (-?\d+), needed (-?\d+)", message):
        if int(saw) >= int(needed):
            missing.append(f"a consistent progress figure (it says 'saw {saw}, needed {needed}')")
    return missing


@pytest.mark.parametrize("op", ["dispatch", "cached_dispatch", "combine"])
def test_stalled_rank_times_out(cpu_pool, op):
    pool = _fault_pool(cpu_pool)
    t0 = time.monotonic()
    results = pool.run(_stall_task, op, STALL_S, timeout=TASK_TIMEOUT_S)
    wall = time.monotonic() - t0
    first = results[0]["first"]
    error = first["error"]
    print(f"[{op}] rank 0 after {first['seconds']:.2f} s: {error}")
    assert error is not None, (
        f"{op}: rank 0 returned normally although rank 1 never called (after "
        f"{first['seconds']:.2f} s)"
    )
    described = f"{error['type']} after {first['seconds']:.2f} s: {error['message']}"
    assert error["timeout"], f"{op}: expected EPTimeoutError, got {described}"
    assert TIMEOUT_S * 0.8 <= first["seconds"] <= RAISE_WITHIN_S, (
        f"{op}: raised outside [~{TIMEOUT_S}, {RAISE_WITHIN_S}] s: {described}"
    )
    phases = ("notify", "dispatch") if op != "combine" else ("notify", "combine")
    lacks = [_timeout_message_ok(error["message"], phase) for phase in phases]
    assert min(lacks, key=len) == [], (
        f"{op}: the timeout message does not name {min(lacks, key=len)}: {error['message']!r}"
    )
    for name, later in results[0]["later"].items():
        e = later["error"]
        assert e is not None and e["state"], (
            f"{op}: after the timeout, {name} must raise EPStateError (poisoned), got {e}"
        )
        assert later["seconds"] < 1.0, (
            f"{op}: {name} on a poisoned buffer took {later['seconds']:.2f} s"
        )
        # The advice must be one the user can follow: this buffer was made without
        # explicitly_destroy, so destroy() would refuse it.
        assert "create a new Buffer" in e["message"] and "destroy()" not in e["message"], e[
            "message"
        ]
    assert wall < STALL_S + 15, f"{op}: the task took {wall:.1f} s"
    _assert_pool_usable(pool, f"the stalled-{op} test")


@pytest.mark.parametrize("op", ["dispatch", "cached_dispatch", "combine"])
def test_mismatched_geometry_raises_on_every_rank(cpu_pool, op):
    pool = _fault_pool(cpu_pool)
    results = pool.run(_mismatch_task, op, timeout=TASK_TIMEOUT_S)
    for r in results:
        first, error = r["first"], r["first"]["error"]
        print(
            f"[mismatch {op}] rank {r['rank']} (hidden {r['hidden']}) after "
            f"{first['seconds']:.2f} s: {error}"
        )
        assert error is not None, (
            f"rank {r['rank']}: {op} with hidden={r['hidden']} against a peer's other hidden "
            "size returned normally"
        )
        described = f"{error['type']} after {first['seconds']:.2f} s: {error['message']}"
        assert error["invalid"] and not error["timeout"], (
            f"rank {r['rank']}: expected EPInvalidArgument, got {described}"
        )
        assert first["seconds"] < TIMEOUT_S, (
            f"rank {r['rank']}: the mismatch must be detected, not timed out: {described}"
        )
        other = 1 - r["rank"]
        assert re.search(rf"\brank {other}\b", error["message"]), (
            f"rank {r['rank']}: the message should name the other rank ({other}): {described}"
        )
    _assert_pool_usable(pool, f"the mismatched-geometry test ({op})")


def test_killed_rank_times_out_and_leaves_nothing(cpu_pool):
    pool = _fault_pool(cpu_pool)
    pids = pool.run(_kill_setup, timeout=TASK_TIMEOUT_S)
    killer = threading.Timer(1.0, pool.kill, args=(1,))  # rank 0 is waiting in dispatch by then
    killer.start()
    try:
        with pytest.raises(RankError) as info:
            pool.run(_kill_task, timeout=TASK_TIMEOUT_S)
    finally:
        killer.cancel()
        killer.join()
    failures = info.value.failures
    assert set(failures) == {1} and failures[1].kind == "died", (
        f"expected only rank 1 to have died: {info.value}"
    )
    # A pool that lost a rank tears itself down and is never handed out again; the killed rank
    # unlinked its /dev/shm file at Buffer construction, so nothing is left behind.
    assert pool.broken and pool.closed
    assert [p for p in pids if pid_alive(p)] == [], f"worker processes left: {pids}"
    assert shm_leaks(pids) == [], "the killed rank left /dev/shm files"
    assert cpu_pool(2, **FAULT_ENV) is not pool
    # The survivor's dispatch timed out instead of hanging or failing some other way.
    result = info.value.results[0]
    first, error = result["first"], result["first"]["error"]
    print(f"[killed] rank 0 after {first['seconds']:.2f} s: {error}")
    assert error is not None, (
        f"rank 0's dispatch returned normally although rank 1 was killed ({first['seconds']:.2f} s)"
    )
    described = f"{error['type']} after {first['seconds']:.2f} s: {error['message']}"
    assert error["timeout"], (
        f"rank 0: expected EPTimeoutError after rank 1 was killed, got {described}"
    )
    assert first["seconds"] <= RAISE_WITHIN_S, described
    lacks = [_timeout_message_ok(error["message"], phase) for phase in ("notify", "dispatch")]
    assert min(lacks, key=len) == [], (
        f"the timeout message does not name {min(lacks, key=len)}: {error['message']!r}"
    )


def _overflow_task(ctx) -> dict:
    """num_worst_tokens smaller than what arrives: a clear EPInvalidArgument, rows beyond it
    dropped, the buffer stays usable (a caller error, not a device fault)."""
    import tritonep as deep_ep
    from tritonep.testing import checks

    buffer = checks.get_buffer(ctx, 4 << 20)
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn((8, 32), generator=gen).to(torch.bfloat16)
    topk_idx, topk_weights = checks.make_routing(8, 4, 2, gen, torch.device("cpu"), drop=0.0)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 4)
    config = deep_ep.Config(2, 4, 64)
    try:
        buffer.dispatch(
            x,
            num_tokens_per_rank=ntr,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_worst_tokens=1,
            config=config,
        )
        message = None
    except deep_ep.EPInvalidArgument as e:
        message = str(e)
    # Still usable: a normal round trip afterwards.
    checks.check_intranode(
        ctx,
        num_tokens=8,
        hidden=32,
        num_topk=2,
        num_experts=4,
        num_nvl_bytes=4 << 20,
        matrix="quick",
    )
    return {"message": message}


def test_worst_case_overflow_raises_and_keeps_the_buffer(cpu_pool):
    results = cpu_pool(2).run(_overflow_task, timeout=120)
    for rank, result in enumerate(results):
        message = result["message"]
        assert message is not None, f"rank {rank}: no error for num_worst_tokens=1"
        assert "num_worst_tokens" in message and f"rank {rank}" in message, message
