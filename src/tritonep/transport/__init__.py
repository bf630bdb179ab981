"""Where peer memory comes from. Kernels only ever see int64 base addresses.

`open_peer_memory(bootstrap, num_bytes, backend, device)` returns a `PeerMemory` whose
`peer_ptrs_dev[j]` is rank j's buffer as mapped in this process; everything above this layer
(protocol offsets, kernels) is identical for every backend.
"""

from .base import Bootstrap, PeerMemory, open_peer_memory

__all__ = ["Bootstrap", "PeerMemory", "open_peer_memory"]
