"""CUDA peer memory through plain CUDA IPC handles, exchanged with the bootstrap all-gather.

Used where symmetric memory cannot rendezvous: an mpi4py communicator without a torch process
group (spec Q3), or several ranks sharing one GPU (symmetric memory refuses that; IPC mappings of
another process's allocation on the same device work), which lets a single GPU exercise every
cross-rank code path. Each rank allocates its buffer from the caching allocator and shares it the
way `torch.multiprocessing` shares CUDA storages (`_share_cuda_` / `_new_shared_cuda`).
"""

from __future__ import annotations

import torch

from .base import PeerMemory
from .bootstrap import Bootstrap


class CudaIpcPeerMemory(PeerMemory):
    def __init__(self, bootstrap: Bootstrap, num_bytes: int, device: torch.device):
        self.rank = bootstrap.rank
        self.world_size = bootstrap.world_size
        self.num_bytes = num_bytes
        self._local = torch.empty(max(num_bytes, 128), dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        # A storage once shared stays allocated until every importer lets go: share only if a peer
        # imports it.
        handles = bootstrap.all_gather_object(
            self._local.untyped_storage()._share_cuda_() if self.world_size > 1 else None
        )
        self._peers = []
        for rank, handle in enumerate(handles):
            if rank == self.rank:
                self._peers.append(self._local)
                continue
            storage = torch.UntypedStorage._new_shared_cuda(*handle)
            self._peers.append(torch.empty(0, dtype=torch.uint8, device=device).set_(storage))
        self.local = self._local[:num_bytes]
        self.peer_ptrs = [t.data_ptr() for t in self._peers]
        self.peer_ptrs_dev = torch.tensor(self.peer_ptrs, dtype=torch.int64, device=device)
        # Nobody may free its buffer while a peer still opens it.
        bootstrap.barrier()

    def release_peers(self) -> None:
        self._peers = []

    def close(self) -> None:
        self._peers = []
        self._local = None
        self.local = torch.empty(0, dtype=torch.uint8, device="cpu")
        self.peer_ptrs = []
        self.peer_ptrs_dev = torch.empty(0, dtype=torch.int64, device="cpu")
        # Shared allocations wait in torch's IPC limbo until their importers have released them;
        # after `release_peers` + barrier on every rank (destroy) they all have.
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
