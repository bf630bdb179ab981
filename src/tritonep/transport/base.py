"""Peer-memory interface shared by the CUDA (symmetric memory) and CPU (/dev/shm) backends."""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.distributed as dist

from ..errors import EPInvalidArgument, EPUnsupported


class Bootstrap:
    """Host-side collectives used while setting a buffer up: a torch process group or an mpi4py comm.

    Only small Python objects travel through it (sizes, names, flags), never tensors.
    """

    def __init__(self, group: Any = None, comm: Any = None):
        if group is None and comm is None:
            raise EPInvalidArgument(
                "Buffer: a torch process group (group) or an mpi4py communicator (comm) is required, "
                "got group=None and comm=None"
            )
        self.group = group
        self.comm = comm if group is None else None
        if self.group is not None:
            self.rank = group.rank()
            self.world_size = group.size()
        else:
            self.rank = comm.Get_rank()
            self.world_size = comm.Get_size()

    @property
    def process_group(self):
        return self.group

    def all_gather_object(self, obj: Any) -> list:
        if self.group is None:
            return list(self.comm.allgather(obj))
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is None:
            self.comm.Barrier()
        else:
            # all_gather_object works for every backend without touching a device stream.
            self.all_gather_object(None)


class PeerMemory(abc.ABC):
    """One symmetric buffer of `num_bytes` per rank, mapped by every rank of the group.

    Attributes:
        rank, world_size: position in the group.
        num_bytes: size of each rank's buffer (identical on every rank).
        local: uint8 tensor `[num_bytes]` viewing this rank's buffer.
        peer_ptrs: base address of every rank's buffer in this process (index = rank).
        peer_ptrs_dev: the same addresses as an int64 tensor on the buffer's device (kernels load it).
    """

    rank: int
    world_size: int
    num_bytes: int
    local: torch.Tensor
    peer_ptrs: list[int]
    peer_ptrs_dev: torch.Tensor

    @property
    def local_ptr(self) -> int:
        return self.peer_ptrs[self.rank]

    def release_peers(self) -> None:
        """Drop this process's mappings of the peers' buffers (before a barrier and `close`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the mapping of every peer and this rank's memory. Idempotent; no collective."""


def open_peer_memory(bootstrap: Bootstrap, num_bytes: int, backend: str, device: torch.device) -> PeerMemory:
    """Collective: allocate and map one `num_bytes` buffer per rank with the chosen backend."""
    if backend == "cpu":
        from .shm import ShmPeerMemory

        return ShmPeerMemory(bootstrap, num_bytes)
    if backend == "cuda":
        # Symmetric memory needs a process group and one GPU per rank; CUDA IPC covers the rest.
        devices = bootstrap.all_gather_object(str(torch.cuda.get_device_properties(device).uuid))
        if bootstrap.process_group is not None and len(set(devices)) == len(devices):
            from .symm_mem import SymmMemPeerMemory

            return SymmMemPeerMemory(bootstrap, num_bytes, device)
        from .cuda_ipc import CudaIpcPeerMemory

        return CudaIpcPeerMemory(bootstrap, num_bytes, device)
    raise EPUnsupported(f"Buffer: peer-memory backend {backend!r} is not available in this build")
