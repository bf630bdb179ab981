"""CPU peer memory: one /dev/shm file per rank, mapped by every rank process.

Each rank creates `/dev/shm/tritonep-<token>-r<rank>-p<pid>`, every rank maps every file, and after
a
barrier each rank unlinks its own file: the mappings stay valid, and nothing is left in /dev/shm
even if a process is killed later. Files of processes that died during the short create-to-unlink
window are swept by the next buffer construction on the machine (their creator pid no longer
exists). The Triton interpreter dereferences raw addresses, so kernels see these mappings exactly as
GPU kernels see peer pointers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import uuid

import torch

from ..errors import EPStateError
from .base import PeerMemory
from .bootstrap import Bootstrap

SHM_DIR = "/dev/shm"
PREFIX = "tritonep-"
_NAME = re.compile(r"^tritonep-[0-9a-f]+-r\d+-p(\d+)$")
_created: set[str] = set()  # files this process created and has not unlinked yet


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    _created.discard(path)


@atexit.register
def _unlink_created() -> None:
    for path in list(_created):
        _unlink_quietly(path)


def tritonep_files(shm_dir: str = SHM_DIR) -> list[tuple[str, int | None]]:
    """Every file of `shm_dir` named `tritonep-*`: (path, creator pid, or None when the name does
    not carry one as this module's names do). The one place that knows the naming scheme."""
    try:
        names = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(PREFIX):
            match = _NAME.match(name)
            found.append((os.path.join(shm_dir, name), int(match.group(1)) if match else None))
    return found


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_files() -> list[str]:
    """Remove tritonep files whose creating process no longer exists; return what was removed."""
    removed = []
    for path, pid in tritonep_files():
        if pid is not None and not process_alive(pid):
            _unlink_quietly(path)
            removed.append(path)
    return removed


class ShmPeerMemory(PeerMemory):
    def __init__(self, bootstrap: Bootstrap, num_bytes: int):
        if not os.path.isdir(SHM_DIR):
            raise EPStateError(
                f"Buffer: the CPU backend needs {SHM_DIR}, which does not exist here"
            )
        self.rank = bootstrap.rank
        self.world_size = bootstrap.world_size
        self.num_bytes = num_bytes
        sweep_stale_files()
        token = bootstrap.all_gather_object(uuid.uuid4().hex[:16])[0]
        path = os.path.join(SHM_DIR, f"{PREFIX}{token}-r{self.rank}-p{os.getpid()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _created.add(path)
        try:
            os.ftruncate(fd, max(num_bytes, 1))
        finally:
            os.close(fd)
        try:
            paths = bootstrap.all_gather_object(path)
            self._maps = [
                torch.from_file(p, shared=True, size=max(num_bytes, 1), dtype=torch.uint8)
                for p in paths
            ]
            # Every rank has mapped every file once this barrier passes; the names can go.
            bootstrap.barrier()
        finally:
            _unlink_quietly(path)
        self.local = self._maps[self.rank][:num_bytes]
        self.peer_ptrs = [m.data_ptr() for m in self._maps]
        self.peer_ptrs_dev = torch.tensor(self.peer_ptrs, dtype=torch.int64, device="cpu")

    def close(self) -> None:
        self._maps = []
        self.local = torch.empty(0, dtype=torch.uint8, device="cpu")
        self.peer_ptrs = []
        self.peer_ptrs_dev = torch.empty(0, dtype=torch.int64, device="cpu")
