"""Multi-process harness for distributed tests: a pool of persistent rank processes.

Problem: every distributed test needs R processes in one gloo process group that run the same
function and report a result or a failure per rank. A spawned worker costs 2-3 s (torch import) on
the 2-core CI machine, so spawning per test would dominate the suite; and a rank that hangs or
crashes must fail one test quickly, saying where it hung, instead of stalling the whole run.

Design:
- `RankPool(world_size, env)` spawns R workers once ('spawn' context: no inherited CUDA context,
  no half-initialised interpreter state). A worker applies `env` before torch is imported
  (`TRITON_INTERPRET=1` must precede the first `@triton.jit`), joins a gloo group through a
  FileStore in a private temp dir, then serves tasks until told to stop.
- `pool.run(fn, *args, timeout=, **kwargs)` calls `fn(ctx, *args, **kwargs)` on every rank and
  returns the results ordered by rank. A task that raises leaves the pool usable. A rank that hangs
  or dies breaks the pool (its state and the gloo group are unknown): the pool kills every worker
  and raises `RankError`; `get_pool` then builds a new one.
- `get_pool(world_size, env)` caches pools per (world_size, env) so that tests share warm workers.
  `TRITONEP_POOL_LOG=<file>` appends a line per pool start-up (ranks, seconds, environment).

Worker start-up imports nothing of tritonep: spawn unpickles the process target by reference, and
a target living in `tritonep.testing.dist` would import the `tritonep` package (which imports torch
and reads env vars at import, and may be half-written while tests run). So the target is
`runpy.run_path(<this file>)` with a private `run_name`; the guard at the bottom starts the worker.
tritonep is imported only when a task's function is unpickled.

Diagnostics: each worker's stderr goes to a per-rank file. On timeout the parent first sends
SIGUSR1 (`faulthandler` dumps every thread's stack into that file), then kills, and quotes the
file's tail in `RankError`. No worker outlives the parent: PR_SET_PDEATHSIG, a parent-pid watcher
thread and EOF on the task pipe in the worker; `atexit`, `weakref.finalize` and daemon processes in
the parent.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.connection as mp_connection
import multiprocessing.util  # noqa: F401  (registers its atexit hook first, so ours runs before it)
import os
import pickle
import runpy
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RankContext",
    "RankError",
    "RankFailure",
    "RankPool",
    "close_all_pools",
    "get_pool",
    "sweep_shm",
]

_WORKER_RUN_NAME = "__tritonep_rank_worker__"
_STOP = b""  # an empty task message tells a worker to shut down
_STDERR_TAIL_CHARS = 6000  # ~70 lines: the last thread dumps of faulthandler, plus a few warnings
_DUMP_WAIT_S = 0.5  # faulthandler writes from its C signal handler, well within 0.5 s
_TERM_GRACE_S = 1.0  # SIGTERM -> SIGKILL; workers install no SIGTERM handler, so this rarely waits
# An idle worker holds 300-400 MB RSS (torch): 8 pools of 1-4 ranks stay within ~10 GB. Fewer
# evicted pools are spawned again (each worker imports torch and Triton: ~4 s of CPU).
_MAX_CACHED_POOLS = 8


@dataclass
class RankContext:
    """First argument of every task: who this rank is, its process group, and its scratch state.

    `state` persists across tasks of the same worker (e.g. a `Buffer` built once, reused by later
    tasks). `group` is `torch.distributed.group.WORLD` (gloo). Inside a worker this class comes from
    the worker's private copy of this module: do not `isinstance`-check or return `ctx` itself.
    """

    rank: int
    world_size: int
    group: Any
    state: dict = field(default_factory=dict)


@dataclass
class RankFailure:
    """What went wrong on one rank: `kind` is 'raised', 'hung' or 'died'."""

    rank: int
    kind: str
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    stderr_tail: str = ""

    def format(self) -> str:
        head = f"--- rank {self.rank}: {self.kind}"
        if self.exc_type:
            head += f" {self.exc_type}: {self.message}"
        elif self.message:
            head += f" ({self.message})"
        parts = [head + " ---"]
        if self.traceback:
            parts.append(self.traceback.rstrip())
        if self.stderr_tail:
            parts.append(f"[stderr tail of rank {self.rank}]\n{self.stderr_tail.rstrip()}")
        return "\n".join(parts)


class RankError(Exception):
    """One or more ranks raised, hung or died.

    `failures` maps rank -> `RankFailure`; `results` holds the return values of the ranks that
    finished (None elsewhere), so fault-injection tests can check what the survivors did.
    """

    def __init__(self, what: str, failures: dict[int, RankFailure] | None = None, results=None):
        # Defaults keep the exception picklable (unpickling calls RankError(message)).
        self.failures = dict(sorted((failures or {}).items()))
        self.results = results if results is not None else []
        summary = ", ".join(
            f"rank {r} {f.kind}" + (f" {f.exc_type}" if f.exc_type else "")
            for r, f in self.failures.items()
        )
        body = "\n".join(f.format() for f in self.failures.values())
        super().__init__(f"{what}: {summary}\n{body}" if failures else what)


class RankPool:
    """`world_size` persistent worker processes joined in one process group (gloo; NCCL when the
    env sets `RANKPOOL_PG_BACKEND=nccl`, one GPU per rank).

    Args:
        world_size: number of ranks (>= 1).
        env: environment variables set in every worker before torch is imported (values str).
        default_timeout: seconds `run` waits when it is not given `timeout`.
        start_timeout: seconds to wait for all workers to import torch and join the group.
        pg_timeout: gloo's own timeout for collectives (a rank left alone in a collective raises
            after this long; keep it above the task timeouts you use so `run` reports 'hung').
        break_on_error: also tear the pool down when a task raises (default: keep it).

    Concurrent `run` calls are serialised by a lock; `kill` and `close` may be called from another
    thread while `run` waits. Create pools from a long-lived thread (normally the main one):
    PR_SET_PDEATHSIG kills the workers when the *thread* that spawned them exits. As with any
    'spawn' pool, a script that builds one must guard its entry point with
    `if __name__ == "__main__":` (workers re-import the parent's `__main__`).
    """

    def __init__(
        self,
        world_size: int,
        env: Mapping[str, str] | None = None,
        *,
        default_timeout: float = 300.0,
        start_timeout: float = 120.0,
        pg_timeout: float = 600.0,
        break_on_error: bool = False,
    ):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"RankPool: world_size must be an int >= 1, got {world_size!r}")
        self.world_size = world_size
        self.env = _normalize_env(env)
        self.default_timeout = default_timeout
        self.break_on_error = break_on_error
        self._broken = False
        self._seq = 0
        self._lock = threading.Lock()
        self._tmpdir = tempfile.mkdtemp(prefix="rankpool-")
        self._procs: list = []
        self._conns: list = []
        # The finalizer holds no reference to self, so an unreferenced pool is still reaped; it also
        # runs at interpreter exit (atexit=True) and at most once (close() calls it).
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._conns, self._tmpdir, self._lock, 10.0
        )
        started = time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        store = os.path.join(self._tmpdir, "store")
        with _ENV_LOCK, _patched_environ(self.env):  # spawn's child inherits os.environ at exec
            for rank in range(world_size):
                parent_conn, child_conn = ctx.Pipe()
                worker_kwargs = dict(
                    rank=rank,
                    world_size=world_size,
                    store_path=store,
                    env=self.env,
                    conn=child_conn,
                    parent_pid=os.getpid(),
                    stderr_path=self._stderr_path(rank),
                    pg_timeout=pg_timeout,
                )
                proc = ctx.Process(
                    target=runpy.run_path,
                    args=(os.path.abspath(__file__),),
                    kwargs={
                        "init_globals": {"_WORKER_KWARGS": worker_kwargs},
                        "run_name": _WORKER_RUN_NAME,
                    },
                    name=f"rankpool-rank{rank}",
                    daemon=True,  # last-resort reaping by multiprocessing's own atexit hook
                )
                proc.start()
                child_conn.close()  # so the parent sees EOF when the worker dies
                self._procs.append(proc)
                self._conns.append(parent_conn)
        self._exchange(None, start_timeout, what=f"{self!r} start-up")
        _log_start(world_size, self.env, time.monotonic() - started)

    # -- public API ---------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any):
        """Call `fn(ctx, *args, **kwargs)` on every rank; return the results ordered by rank.

        `fn`, the arguments and the results travel by pickle (tensors by value): `fn` must be a
        module-level function. Raises `RankError` if any rank raises (pool stays usable unless
        `break_on_error`), or hangs past `timeout` s / dies (pool is killed; see `broken`).
        """
        if self.closed:
            raise RuntimeError(f"{self!r} is closed; create a new pool or use get_pool()")
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(
                "run: fn and its arguments must be picklable (module-level function), got "
                f"fn={fn!r}: {e}"
            ) from e
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        with self._lock:
            return self._exchange(
                payload,
                self.default_timeout if timeout is None else timeout,
                what=f"{self!r}.run({name})",
            )

    def kill(self, rank: int) -> None:
        """SIGKILL one worker (fault injection). The pool is broken from then on: the next `run`
        still reaches the surviving ranks, reports `rank` as died, then tears the pool down."""
        self._broken = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._procs[rank].pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the workers (destroy_process_group, exit; kill after 10 s) and remove temp files."""
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def broken(self) -> bool:
        """True once a rank hung, died or was killed; such a pool must be replaced."""
        return self._broken or self.closed or not all(p.is_alive() for p in self._procs)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RankPool(world_size={self.world_size})"

    # -- internals ----------------------------------------------------------------------------

    def _stderr_path(self, rank: int) -> str:
        return os.path.join(self._tmpdir, f"rank{rank}.stderr")

    def _exchange(self, payload: bytes | None, timeout: float, what: str) -> list:
        """Send one task (None: only wait for the start-up handshake) and collect every reply."""
        if payload is not None:
            self._seq += 1
            message = pickle.dumps((self._seq, list(sys.path), payload))
            for conn in self._conns:
                # A dead worker's pipe raises here; the wait below reports it as died.
                with contextlib.suppress(OSError):
                    conn.send_bytes(message)
        try:
            results, failures = self._collect(self._seq, timeout)  # start-up answers seq 0
        except BaseException:  # e.g. KeyboardInterrupt: ranks are mid-task, their state unknown
            self._teardown()
            raise
        lost = [r for r, f in failures.items() if f.kind in ("hung", "died")]
        if lost or (failures and (self.break_on_error or payload is None)):
            self._broken = True
            hung = [r for r in lost if failures[r].kind == "hung"]
            for r in hung:  # stack dumps first, so the stderr tails show where each rank hung
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._procs[r].pid, signal.SIGUSR1)
            if hung:
                time.sleep(_DUMP_WAIT_S)
            for r in lost:
                failures[r].stderr_tail = _tail(self._stderr_path(r), _STDERR_TAIL_CHARS)
                if payload is None and failures[r].kind == "died" and not failures[r].stderr_tail:
                    failures[r].message += (
                        "; it died before its stderr was redirected: see the parent's stderr "
                        "(spawn re-runs the parent's __main__ file in every worker)"
                    )
            self._teardown()
        if failures:
            raise RankError(what, failures, results)
        return results

    def _collect(self, seq: int, timeout: float) -> tuple[list, dict[int, RankFailure]]:
        deadline = time.monotonic() + timeout
        results: list = [None] * self.world_size
        failures: dict[int, RankFailure] = {}
        pending = set(range(self.world_size))
        owner = {self._conns[r]: r for r in pending}  # Connection (by identity) -> rank
        owner.update({self._procs[r].sentinel: r for r in pending})  # sentinel fd -> rank
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waitables = [self._conns[r] for r in pending]
            waitables += [self._procs[r].sentinel for r in pending]
            for obj in mp_connection.wait(waitables, timeout=remaining):
                r = owner[obj]
                if r not in pending:  # both its pipe and its sentinel fired
                    continue
                pending.discard(r)
                conn = self._conns[r]
                try:
                    if not conn.poll():  # sentinel fired with no reply pending: it exited
                        raise EOFError
                    kind, reply_seq, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    failures[r] = RankFailure(r, "died", message=self._exit_reason(r))
                    continue
                except Exception as e:  # the result does not unpickle in the parent
                    failures[r] = RankFailure(r, "raised", **_describe(e))
                    continue
                assert reply_seq == seq, f"rank {r} answered task {reply_seq}, expected {seq}"
                if kind == "ok":
                    results[r] = value
                else:
                    failures[r] = RankFailure(r, "raised", **value)
        for r in pending:
            failures[r] = RankFailure(r, "hung", message=f"no answer within {timeout:g} s")
        return results, failures

    def _exit_reason(self, rank: int) -> str:
        proc = self._procs[rank]
        proc.join(timeout=2.0)  # EOF can precede the exit status by a few ms
        code = proc.exitcode
        if code is None:
            return "closed its pipe but is still running"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def _teardown(self) -> None:
        _terminate(self._procs)
        self._finalizer()


# -- module-level helpers ----------------------------------------------------------------------

_ENV_LOCK = threading.Lock()
_POOLS: dict[tuple, RankPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(world_size: int, env: Mapping[str, str] | None = None) -> RankPool:
    """Return a live cached pool for (world_size, env), building one if none or if it broke.

    At most a few pools stay cached; the least recently used one is closed beyond that.
    """
    env = _normalize_env(env)
    key = (world_size, tuple(sorted(env.items())))
    with _POOLS_LOCK:
        pool = _POOLS.pop(key, None)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            while len(_POOLS) >= _MAX_CACHED_POOLS:
                _POOLS.pop(next(iter(_POOLS))).close()
            pool = RankPool(world_size, env)
        _POOLS[key] = pool  # (re)insert last: dict order is recency order
        return pool


def close_all_pools() -> None:
    """Close every pool cached by `get_pool` (pools built directly are closed by their owner)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def sweep_shm() -> list[str]:
    """List (never delete) tritonep's files left in /dev/shm (`transport.shm.tritonep_files`).

    Returns sorted absolute paths; tests assert it is empty after their pool closed. Files of other
    concurrently running test sessions match too.
    """
    from tritonep.transport.shm import tritonep_files

    return [path for path, _ in tritonep_files()]


atexit.register(close_all_pools)


def _normalize_env(env: Mapping[str, str] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (env or {}).items()}


@contextlib.contextmanager
def _patched_environ(env: Mapping[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _terminate(procs: list) -> None:
    """SIGTERM the live workers, then SIGKILL those still alive after a grace period; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _TERM_GRACE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)


def _shutdown(procs: list, conns: list, tmpdir: str, lock: threading.Lock, timeout: float) -> None:
    """Ask workers to stop, wait up to `timeout` s, kill stragglers, remove the temp dir.

    If a `run` is in flight (its lock is held: another thread, or exit during a task) the workers
    are busy and would not read the stop message: kill them at once instead of waiting.
    """
    idle = lock.acquire(blocking=False)
    if idle:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(_STOP)
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    _terminate(procs)
    for conn in conns:
        conn.close()
    shutil.rmtree(tmpdir, ignore_errors=True)
    if idle:
        lock.release()


def _tail(path: str, max_chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _describe(exc: BaseException, drop_frames: int = 0) -> dict:
    """Picklable summary of `exc`; `drop_frames` hides the harness's own outermost frames."""
    tb = exc.__traceback__
    for _ in range(drop_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return {
        "exc_type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
    }


def _log_start(world_size: int, env: dict, seconds: float) -> None:
    """One line per pool start-up in the file `TRITONEP_POOL_LOG` names, if set: how often a test
    run spawns pools, and what each costs (the suite's time on a 2-core CI machine)."""
    path = os.environ.get("TRITONEP_POOL_LOG")
    if path:
        with open(path, "a") as log:
            log.write(
                f"{time.time():.0f} ranks={world_size} {seconds:.1f}s {sorted(env.items())}\n"
            )


# -- worker side (runs in the spawned process, via runpy) --------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent process goes away, even while a task is stuck."""
    with contextlib.suppress(OSError, AttributeError):  # prctl exists on Linux only
        import ctypes

        # PR_SET_PDEATHSIG (1): the kernel SIGKILLs us when the thread that spawned us exits.
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # backup for systems without prctl; needs the GIL, polls once a second
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="rankpool-parent-watch", daemon=True).start()


def _worker_main(
    rank: int,
    world_size: int,
    store_path: str,
    env: dict[str, str],
    conn,
    parent_pid: int,
    stderr_path: str,
    pg_timeout: float,
) -> None:
    os.environ.update(env)  # already inherited from the parent; kept explicit for clarity
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # fatal signals (a segfaulting kernel) print every thread's stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's "where are you?"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's job; it reaps us
    _die_with_parent(parent_pid)
    try:
        from datetime import timedelta

        import torch.distributed as dist

        backend = env.get("RANKPOOL_PG_BACKEND", "gloo")
        if backend == "nccl":  # GPU pools: one device per rank, as torchrun users set it up
            import torch

            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        ctx = RankContext(rank, world_size, dist.group.WORLD)
        conn.send_bytes(pickle.dumps(("ok", 0, None)))
    except Exception as e:
        conn.send_bytes(pickle.dumps(("err", 0, _describe(e))))
        return
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # parent gone
            break
        if message == _STOP:
            break
        seq, parent_path, payload = pickle.loads(message)
        # The parent may have imported test modules (new sys.path entries) after we started.
        sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
        try:
            fn, args, kwargs = pickle.loads(payload)
            reply = pickle.dumps(("ok", seq, fn(ctx, *args, **kwargs)))
        except Exception as e:
            reply = pickle.dumps(("err", seq, _describe(e, drop_frames=1)))
        conn.send_bytes(reply)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == _WORKER_RUN_NAME:
    _worker_main(**globals()["_WORKER_KWARGS"])
