"""The peer-memory interface every transport implements (CUDA symmetric memory, CUDA IPC, /dev/shm,
NVSHMEM)."""

from __future__ import annotations

import abc

import torch


class PeerMemory(abc.ABC):
    """One symmetric buffer of `num_bytes` per rank, mapped by every rank of the group.

    Attributes:
        rank, world_size: position in the group.
        num_bytes: size of each rank's buffer (identical on every rank).
        local: uint8 tensor `[num_bytes]` viewing this rank's buffer.
        peer_ptrs: base address of every rank's buffer in this process (index = rank).
        peer_ptrs_dev: the same addresses as an int64 tensor on the buffer's device (kernels load
        it).
    """

    rank: int
    world_size: int
    num_bytes: int
    local: torch.Tensor
    peer_ptrs: list[int]
    peer_ptrs_dev: torch.Tensor

    def release_peers(self) -> None:  # noqa: B027 (a no-op default: only CUDA IPC maps peers)
        """Drop this process's mappings of the peers' buffers (before a barrier and `close`)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the mapping of every peer and this rank's memory. Idempotent; no collective."""
