"""A host clock the Triton interpreter can read: the CPU backend's stand-in for `%globaltimer`.

Interpreted kernels cannot execute inline PTX, so their bounded waits read the current time from a
memory cell that a daemon thread refreshes every 10 ms with `time.monotonic_ns()` (fine enough for
timeouts of seconds; at 1 ms each idle rank process of the test pools spent 5 % of a core on the
ticks alone). One cell per process serves every Buffer. The thread writes through a numpy view
(no torch call that could be cut short mid-C++ at interpreter exit) and is stopped by an atexit
hook.
"""

import atexit
import threading
import time

import numpy as np

TICK_S = 0.01

_cell: np.ndarray | None = None
_stop = threading.Event()
_lock = threading.Lock()


def _tick(cell: np.ndarray) -> None:
    while not _stop.is_set():
        cell[0] = time.monotonic_ns()
        _stop.wait(TICK_S)


def clock_address() -> int:
    """Address of the int64 cell holding the current `time.monotonic_ns()` (started on first
    use)."""
    global _cell
    with _lock:
        if _cell is None:
            _cell = np.array([time.monotonic_ns()], dtype=np.int64)
            thread = threading.Thread(
                target=_tick, args=(_cell,), name="tritonep-clock", daemon=True
            )
            thread.start()
            atexit.register(lambda: (_stop.set(), thread.join(1.0)))
        return _cell.ctypes.data
