"""A host clock the Triton interpreter can read: the CPU backend's stand-in for `%globaltimer`.

Interpreted kernels cannot execute inline PTX, so their bounded waits read the current time from a
memory cell that a daemon thread refreshes every millisecond with `time.monotonic_ns()`. One cell
per process serves every Buffer.
"""

import threading
import time

import torch

_cell: torch.Tensor | None = None
_lock = threading.Lock()

TICK_S = 0.001


def _tick(cell: torch.Tensor) -> None:
    while True:
        cell[0] = time.monotonic_ns()
        time.sleep(TICK_S)


def clock_address() -> int:
    """Address of the int64 cell holding the current `time.monotonic_ns()` (started on first use)."""
    global _cell
    with _lock:
        if _cell is None:
            _cell = torch.tensor([time.monotonic_ns()], dtype=torch.int64)
            threading.Thread(target=_tick, args=(_cell,), name="tritonep-clock", daemon=True).start()
        return _cell.data_ptr()
