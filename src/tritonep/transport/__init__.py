"""Where peer memory comes from. Kernels only ever see int64 base addresses.

`open_peer_memory(bootstrap, num_bytes, backend, device, gpus)` (the factory) returns a
`PeerMemory` whose `peer_ptrs_dev[j]` is rank j's buffer as mapped in this process: torch symmetric
memory (one GPU per rank), CUDA IPC (ranks sharing a GPU, or an mpi4py communicator), `/dev/shm`
(CPU backend).
`nvshmem.py` adds the NVSHMEM heap and its CPU emulation, `device.py` the Triton device layer that
reaches a peer by stores or puts; both are imported where they are needed (they start NVSHMEM or
define kernels).
"""

from .base import PeerMemory
from .bootstrap import Bootstrap
from .factory import open_peer_memory

__all__ = ["Bootstrap", "PeerMemory", "open_peer_memory"]
