"""The one place that picks a transport for a Buffer's NVL memory."""

from __future__ import annotations

import torch

from ..errors import EPUnsupported
from .base import PeerMemory
from .bootstrap import Bootstrap


def open_peer_memory(
    bootstrap: Bootstrap,
    num_bytes: int,
    backend: str,
    device: torch.device,
    gpus: list[str] | None,
) -> PeerMemory:
    """Collective: allocate and map one `num_bytes` buffer per rank with the chosen backend.
    `gpus`: every rank's GPU UUID (cuda backend; index = rank)."""
    if backend == "cpu":
        from .shm import ShmPeerMemory

        return ShmPeerMemory(bootstrap, num_bytes)
    if backend == "cuda":
        # Symmetric memory needs a process group and one GPU per rank; CUDA IPC covers the rest.
        if bootstrap.process_group is not None and len(set(gpus)) == len(gpus):
            from .symm_mem import SymmMemPeerMemory

            return SymmMemPeerMemory(bootstrap, num_bytes, device)
        from .cuda_ipc import CudaIpcPeerMemory

        return CudaIpcPeerMemory(bootstrap, num_bytes, device)
    raise EPUnsupported(f"Buffer: peer-memory backend {backend!r} is not available in this build")
