"""CUDA peer memory through `torch.distributed._symmetric_memory` (CUDA backend, NVLink P2P).

One `symm_mem.empty` allocation per buffer and one `rendezvous` at construction; kernels receive
the peer base addresses (`buffer_ptrs`) as an int64 tensor. Multicast is never used (it is disabled
on the GPU machines and tritonep does not need it).
"""

from __future__ import annotations

import torch

from ..errors import EPStateError, EPUnsupported
from .base import PeerMemory
from .bootstrap import Bootstrap


class SymmMemPeerMemory(PeerMemory):
    def __init__(self, bootstrap: Bootstrap, num_bytes: int, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        group = bootstrap.process_group
        if group is None:
            raise EPUnsupported(
                "Buffer: the CUDA backend needs a torch process group (group); an mpi4py "
                "communicator alone is not supported yet"
            )
        self.rank = bootstrap.rank
        self.world_size = bootstrap.world_size
        self.num_bytes = num_bytes
        self._tensor = symm_mem.empty(max(num_bytes, 128), dtype=torch.uint8, device=device)
        try:
            self._handle = symm_mem.rendezvous(self._tensor, group)
        except TypeError:
            # torch releases before 2.6 take the group name only.
            self._handle = symm_mem.rendezvous(self._tensor, group.group_name)
        if self._handle is None:
            raise EPStateError("Buffer: symmetric-memory rendezvous returned no handle")
        self.local = self._tensor[:num_bytes]
        self.peer_ptrs = [int(p) for p in self._handle.buffer_ptrs]
        self.peer_ptrs_dev = torch.tensor(self.peer_ptrs, dtype=torch.int64, device=device)

    def close(self) -> None:
        self._handle = None
        self._tensor = None
        self.local = torch.empty(0, dtype=torch.uint8, device="cpu")
        self.peer_ptrs = []
        self.peer_ptrs_dev = torch.empty(0, dtype=torch.int64, device="cpu")
