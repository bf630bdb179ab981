"""Every byte a Buffer carves out, where it comes from, and how it is given back.

A Buffer has up to two memories, as in DeepEP V1:

* the **NVL memory**: one peer-mapped allocation per rank holding the signal region (epoch, stop
  word, intranode inbox/tails/heads; `protocol.SignalLayout`) followed by the user's
  `num_nvl_bytes` (intranode queues, `get_local_buffer_tensor()`);
* the **RDMA memory**: `num_rdma_bytes` of symmetric memory for the low-latency and internode
  modes (`get_local_buffer_tensor(use_rdma_buffer=True)`). Its kernels reach a peer through the
  device layer (`transport/device.py`) and its route table: plain stores where the peer is mapped,
  NVSHMEM puts elsewhere. When every peer is mapped (one node) and the put path is not forced,
  the RDMA bytes simply follow the NVL bytes in the same peer allocation, so a one-node process
  never starts NVSHMEM and keeps torch's CUDA symmetric-memory backend for all its Buffers (torch
  allows one backend per process). Otherwise they are an NVSHMEM allocation (torch's NVSHMEM
  backend; on the CPU backend, `/dev/shm` files behind the emulated put path).

Extra memory beyond the user's sizes: the signal region (`protocol.signal_layout(R).num_bytes`,
about 270 KB at R = 8), the host block (9 KB of pinned host memory) and, across nodes, the
internode signal words (`rdma_reserved_bytes`, 41 KB at 20 nodes) just above the user's RDMA bytes.
Why above: the low-latency layout may fill all `num_rdma_bytes` (V1's size hint is exact), and V1
code may run low-latency calls before internode ones on one Buffer; the internode signal words
are epoch-tagged and never reset, so low-latency data must never land on them.
"""

from __future__ import annotations

import torch

from .. import protocol
from .._validate import check_int, fail
from ..errors import EPStateError
from ..transport import Bootstrap, open_peer_memory
from .topology import Topology


class BufferMemory:
    """The NVL and RDMA memories of one Buffer (collective to build; `close` is local).

    Attributes:
        signal: the signal-region layout (identical on every rank).
        nvl_offset: byte offset of the `num_nvl_bytes` data region in the NVL allocation.
        peer_bases: int64 `[R]` base of every rank's NVL allocation as mapped here (kernels
            load it).
        rdma_routes: int64 `[R, 3]` route table of the RDMA memory for `device.open_peer`, or None.
        rdma_base: this rank's RDMA base address (local symmetric address of its offset 0).
        rdma_capacity: bytes of the RDMA memory: `num_rdma_bytes` then `rdma_reserved_bytes` that
            only the internode mode uses (none of `get_local_buffer_tensor`'s or the low-latency
            layout's).
        rdma_transport / rdma_force_put: the device layer's `TRANSPORT` / `FORCE_PUT` constexprs
            for kernels using the RDMA memory; uses_nvshmem: those kernels call NVSHMEM.
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        topology: Topology,
        backend: str,
        device_: torch.device,
        gpus: list[str] | None,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        force_put: bool,
        num_qps_per_rank: int,
        rdma_reserved_bytes: int = 0,
    ):
        self.signal = protocol.signal_layout(topology.num_ranks)
        self.nvl_offset = self.signal.num_bytes
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.rdma_capacity = num_rdma_bytes + rdma_reserved_bytes if num_rdma_bytes > 0 else 0
        self._peer = None
        self._heap = None
        rdma_in_peer = num_rdma_bytes > 0 and not (topology.is_internode or force_put)
        self._rdma_offset = (
            protocol.align_up(self.nvl_offset + num_nvl_bytes) if rdma_in_peer else 0
        )
        peer_bytes = (
            self._rdma_offset + self.rdma_capacity
            if rdma_in_peer
            else self.nvl_offset + num_nvl_bytes
        )
        self.rdma_routes = None
        self.rdma_base = 0
        self.rdma_transport = (
            0  # device.STORES (the device layer is a kernel module: imported late)
        )
        self.rdma_force_put = False
        self.uses_nvshmem = False
        self.device_wrapper = None  # what kernels on the RDMA memory are launched through
        if num_rdma_bytes > 0 and not rdma_in_peer:
            # First: torch allows one symmetric-memory backend per process, and NVSHMEM's must be
            # chosen before anything is allocated (the NVL memory then comes from its heap too).
            self._open_heap(
                bootstrap,
                topology,
                backend,
                device_,
                self.rdma_capacity,
                force_put,
                num_qps_per_rank,
            )
        # The signal region exists whenever a mode signals through the NVL memory.
        if num_nvl_bytes > 0 or rdma_in_peer:
            self._peer = open_peer_memory(bootstrap, peer_bytes, backend, device_, gpus)
            self._peer.local[: self.signal.num_bytes].zero_()
            self.peer_bases = self._peer.peer_ptrs_dev
        else:
            self.peer_bases = torch.zeros(topology.num_ranks, dtype=torch.int64, device=device_)
        if rdma_in_peer:
            mine = self._peer.peer_ptrs[topology.rank]
            bases = [p + self._rdma_offset for p in self._peer.peer_ptrs]
            self.rdma_base = mine + self._rdma_offset
            self.rdma_routes = torch.tensor(
                [[b, self.rdma_base, j] for j, b in enumerate(bases)],
                dtype=torch.int64,
                device=device_,
            )
            self._rdma_view = self._peer.local[
                self._rdma_offset : self._rdma_offset + self.rdma_capacity
            ]
            self._rdma_view.zero_()  # signal words must start below every epoch

    def _open_heap(
        self, bootstrap, topology, backend, device_, num_rdma_bytes, force_put, num_qps_per_rank
    ):
        from ..transport import device, nvshmem

        if backend == "cpu":
            self._heap = nvshmem.EmulatedPeerMemory(
                bootstrap, num_rdma_bytes, topology.ranks_per_node, force_put
            )
        else:
            self._heap = nvshmem.NvshmemPeerMemory(
                bootstrap, num_rdma_bytes, device_, force_put, num_qps_per_rank
            )
        self.rdma_routes = self._heap.route_table_dev
        self.rdma_base = self._heap.local.data_ptr()
        self.rdma_transport = self._heap.transport
        self.rdma_force_put = self._heap.force_put
        self.uses_nvshmem = self.rdma_transport == device.NVSHMEM.value
        if self.uses_nvshmem:
            self.device_wrapper = nvshmem.NvshmemKernel
        self._rdma_view = self._heap.local
        self._rdma_view.zero_()  # signal words must start below every epoch

    def local_view(
        self, op: str, dtype: torch.dtype, size, offset: int, rdma: bool
    ) -> torch.Tensor:
        """A view (no copy) of this rank's data region (NVL or RDMA), from `offset` bytes in."""
        if rdma:
            if self.num_rdma_bytes == 0:
                raise EPStateError(f"{op}: this buffer has no RDMA memory (num_rdma_bytes=0)")
            raw, total = self._rdma_view[: self.num_rdma_bytes], self.num_rdma_bytes
        else:
            if self._peer is None or self.num_nvl_bytes == 0:
                raise EPStateError(f"{op}: this buffer has no NVL memory (num_nvl_bytes=0)")
            raw, total = (
                self._peer.local[self.nvl_offset : self.nvl_offset + self.num_nvl_bytes],
                self.num_nvl_bytes,
            )
        if not isinstance(dtype, torch.dtype):
            fail(op, f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        itemsize = dtype.itemsize
        check_int(op, "offset", offset, minimum=0)
        if offset % itemsize != 0 or offset > total:
            fail(op, f"offset must be a multiple of {itemsize} within {total} bytes, got {offset}")
        raw = raw[offset:]
        view = raw[: (raw.numel() // itemsize) * itemsize].view(dtype)
        if size is None:
            return view
        size = torch.Size(size)
        if size.numel() > view.numel():
            fail(
                op,
                f"size {tuple(size)} needs {size.numel() * itemsize} bytes, only "
                f"{view.numel() * itemsize} from offset {offset}",
            )
        return view[: size.numel()].view(size)

    def release_peers(self) -> None:
        """Drop this process's mappings of the peers' memory (before a barrier and `close`)."""
        if self._peer is not None:
            self._peer.release_peers()

    def close(self) -> None:
        """Release every mapping and allocation. Idempotent; no collective (NVSHMEM frees are
        collective inside NVSHMEM itself: every rank closes its buffers in the same order)."""
        for memory in (self._peer, self._heap):
            if memory is not None:
                memory.close()
        self._peer = self._heap = None
        self._rdma_view = None
