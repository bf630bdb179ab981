"""NVSHMEM symmetric memory (torch's NVSHMEM backend) and its CPU emulation, for
`transport/device.py`.

Problem: the low-latency and internode modes need one symmetric allocation per rank that peers on
other nodes reach with NVSHMEM puts (DeepEP's `num_rdma_bytes`), while peers of the same node keep
using plain stores. Kernels address it through `device.py`, which needs per peer: a mapped base
(0 if not mapped), the base its put path addresses, and the NVSHMEM PE.

Design:
- `NvshmemPeerMemory`: `symm_mem.set_backend("NVSHMEM")`, `symm_mem.empty`, `symm_mem.rendezvous`
  over the given process group (gloo works: NVSHMEM bootstraps through the default group's
  store). NVSHMEM itself starts at the first allocation of the process, with the variables
  `nvshmem_environment` sets. `buffer_ptrs[j]` is `nvshmem_ptr(base, pe_j)`: this rank's own
  address for itself, a peer mapping for a peer reachable by loads and stores (same GPU or
  NVLink), 0 for a peer only a network reaches.
- `EmulatedPeerMemory`: the same attributes over `ShmPeerMemory` (`/dev/shm`), for the Triton
  interpreter: group ranks form nodes of `ranks_per_node`, peers of other nodes get 0 in
  `peer_ptrs` and are reached by `device.py`'s emulated put path through their file mapping.
- Both expose `route_table_dev` (int64 `[R, 3]`: mapped base or 0, put-path base, PE) and the
  `transport` / `force_put` constexprs their kernels are compiled with.

Facts (torch 2.11 + NVSHMEM 3.4.5 on one H200, 2 ranks under MPS, `scripts/nvshmem_check.py`,
2026-11-30; and torch's `NVSHMEMSymmetricMemory.cpp` / `SymmetricMemory.cpp`):
- One symmetric-memory backend per process and device type. Once a symmetric tensor exists,
  `set_backend` of another backend raises "Backend can not be changed after use" (measured: a
  CUDA-backend `empty` first, then this class -> `EPStateError`). A process using this class
  cannot also hold CUDA-backend symmetric memory (`symm_mem.py`); CUDA IPC peer memory
  (`cuda_ipc.py`) does not go through symmetric memory and is unaffected. torch 2.11 has no
  backend named "CUDA" to switch back to (`set_backend("CUDA")`: "does not find allocation
  backend CUDA"); the CUDA backend is simply the default.
- `buffer_ptrs` (measured): this rank's entry is its own tensor's address; a peer on the same GPU
  gets a mapping of the peer's heap at another address (rank 0: own 0x327c80800, peer
  0x2327c80800); every rank's own heap starts at the same virtual address. Peers on other GPUs
  of the node are mapped the same way (`nvshmem_ptr` over P2P, source); a peer only a network
  reaches gives 0 (source; no RDMA machine to measure on).
- Freeing returns heap memory (measured): 100 create/close cycles of a 32 MiB heap handed out
  the same base address every time, device memory free stayed flat (0 MiB growth), 2.2 ms per
  cycle. torch frees with `nvshmem_free` when the tensor's storage dies (`close` drops it).
- NVSHMEM starts with the *default* group ("0"): PE numbers are global ranks (`pes` maps group
  ranks to them), and every rank of the default group must allocate: `nvshmem_malloc` and
  `nvshmem_free` are collective, so every rank creates and closes its heaps in the same order.
- Several ranks on one GPU (gloo group, all on device 0) run only under MPS with
  `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` values adding up to <= 100 on that GPU; otherwise NVSHMEM
  starts in a limited mode whose team and barrier calls exit the process (checked before
  NVSHMEM starts).
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from ..errors import EPInvalidArgument, EPStateError, EPUnsupported
from . import device
from .base import PeerMemory
from .bootstrap import Bootstrap

logger = logging.getLogger(__name__)

# What tritonep needs from NVSHMEM's environment, applied only where the user set nothing:
# NVSHMEM_DISABLE_NVLS=1   no NVLink SHARP (multicast) team resources: tritonep never uses them, and
#                            multicast is unavailable or off on shared machines.
#   NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo   only when every rank runs on this host: the unique-id
#                            bootstrap otherwise picks the first non-loopback interface, which need
#                            not connect the local processes (torch copies NCCL_SOCKET_IFNAME here
#                            when that is set, for multi-host jobs).
SINGLE_HOST_ENV = {"NVSHMEM_DISABLE_NVLS": "1", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}
MULTI_HOST_ENV = {"NVSHMEM_DISABLE_NVLS": "1"}


def nvshmem_environment(single_host: bool, num_qps_per_rank: int = 0) -> dict[str, str]:
    """Set the NVSHMEM variables tritonep relies on, never overwriting a value the user set.

    `num_qps_per_rank` (the Buffer argument, V1's queue pairs per peer) becomes
    `NVSHMEM_IBGDA_NUM_RC_PER_PE`, as in V1: the RC queue pairs per peer when NVSHMEM uses
    GPU-initiated InfiniBand (IBGDA); other transports ignore it. Must run before NVSHMEM starts
    (the process's first NVSHMEM allocation). Returns what was set.
    """
    wanted = dict(SINGLE_HOST_ENV if single_host else MULTI_HOST_ENV)
    if num_qps_per_rank > 0:
        wanted["NVSHMEM_IBGDA_NUM_RC_PER_PE"] = str(num_qps_per_rank)
    applied = {name: value for name, value in wanted.items() if name not in os.environ}
    os.environ.update(applied)
    if applied:
        logger.info("tritonep set %s", " ".join(f"{k}={v}" for k, v in applied.items()))
    return applied


def nvshmem_device_library() -> str:
    """Path of `libnvshmem_device.bc` (torch's search: `NVSHMEM_LIB_DIR`, the nvidia-nvshmem wheel,
    system paths)."""
    try:
        from torch.distributed._symmetric_memory._nvshmem_triton import NvshmemLibFinder

        return NvshmemLibFinder.find_device_library()
    except (ImportError, RuntimeError) as e:
        raise EPUnsupported(
            "NVSHMEM transport: the NVSHMEM device library (libnvshmem_device.bc) was not found; "
            "install the nvidia-nvshmem-cu12 / nvidia-nvshmem-cu13 wheel matching your CUDA, or "
            f"point NVSHMEM_LIB_DIR at the directory holding it ({e})"
        ) from e


class NvshmemKernel:
    """A `@triton.jit` kernel compiled with `TRANSPORT=NVSHMEM`: `NvshmemKernel(kernel)[grid](...)`
    launches it (kernels of the other transports need no wrapping).

    Each compilation links `libnvshmem_device.bc`, and each compiled module that kept NVSHMEM code
    gets its device state initialised (`nvshmemx_cumodule_init`) before its first launch. Modules
    in which the optimiser removed every NVSHMEM call (e.g. a kernel whose NVSHMEM branch is dead
    for its constexprs) must not be initialised: NVSHMEM fails on them (error 7). torch's
    `requires_nvshmem` initialises every module, hence this class.

    `warmup(*args, grid=, **kwargs)` compiles and initialises without launching and returns the
    compiled kernel (for launchers that call it directly, like `kernels.launch.FastKernel`).
    """

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = fn.arg_names
        self._libs = {"libnvshmem_device": nvshmem_device_library()}
        self._ready: set[int] = set()  # compiled kernels (id) whose module is initialised

    def warmup(self, *args, grid, **kwargs):
        kernel = self.fn.warmup(*args, grid=grid, extern_libs=self._libs, **kwargs)
        if id(kernel) not in self._ready:
            if "nvshmemi_device_state_d" in kernel.asm["ptx"]:  # NVSHMEM code survived optimisation
                from torch._C._distributed_c10d import _nvshmemx_cumodule_init

                kernel._init_handles()  # loads the module on the current device
                _nvshmemx_cumodule_init(kernel.module)
            self._ready.add(id(kernel))
        return kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.warmup(*args, grid=grid, **kwargs)
            return self.fn.run(*args, grid=grid, warmup=False, extern_libs=self._libs, **kwargs)

        return launch


class HeapMemory(PeerMemory):
    """A symmetric heap as `device.py` sees it (attributes beyond `PeerMemory`'s).

    Attributes:
        peer_ptrs: rank j's buffer as mapped in this process; 0 where plain stores cannot reach j.
        put_ptrs: the base that the put path addresses for rank j: this rank's own base under
            NVSHMEM (its calls take local symmetric addresses), rank j's file mapping when emulated.
        pes: NVSHMEM PE of each group rank.
        route_table_dev: int64 `[R, 3]` rows `(peer_ptrs[j], put_ptrs[j], pes[j])` on the buffer's
            device: `device.open_peer`'s table.
        transport: the `TRANSPORT` constexpr of kernels using this heap (`device.STORES`,
            `device.NVSHMEM` or `device.EMULATED`, as int).
        force_put: the `FORCE_PUT` constexpr: every peer goes through the put path.
    """

    put_ptrs: list[int]
    pes: list[int]
    route_table_dev: torch.Tensor
    transport: int
    force_put: bool

    def _publish(
        self, peer_ptrs: list[int], put_ptrs: list[int], pes: list[int], dev: torch.device
    ) -> None:
        self.peer_ptrs = peer_ptrs
        self.put_ptrs = put_ptrs
        self.pes = pes
        self.peer_ptrs_dev = torch.tensor(peer_ptrs, dtype=torch.int64, device=dev)
        rows = list(zip(peer_ptrs, put_ptrs, pes, strict=True))
        self.route_table_dev = torch.tensor(rows, dtype=torch.int64, device=dev)

    def _forget(self) -> None:
        self.local = torch.empty(0, dtype=torch.uint8)
        self.peer_ptrs, self.put_ptrs, self.pes = [], [], []
        self.peer_ptrs_dev = torch.empty(0, dtype=torch.int64)
        self.route_table_dev = torch.empty((0, 3), dtype=torch.int64)


def _mps_shares(peers: list[dict]) -> dict[str, int]:
    """Sum of `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (unset counts 100) per GPU that several ranks
    share."""
    by_gpu: dict[str, list[str | None]] = {}
    for peer in peers:
        by_gpu.setdefault(f"{peer['host']}/{peer['gpu']}", []).append(peer["mps"])
    return {
        gpu: sum(100 if value in (None, "") else int(float(value)) for value in values)
        for gpu, values in by_gpu.items()
        if len(values) > 1
    }


class NvshmemPeerMemory(HeapMemory):
    """One `num_bytes` NVSHMEM allocation per rank through torch's NVSHMEM symmetric-memory backend.

    Collective over `bootstrap`'s process group, whose ranks must be all the ranks of the default
    group (NVSHMEM starts over that one). Raises `EPUnsupported` when NVSHMEM is missing or cannot
    start here, `EPStateError` when this process already uses another symmetric-memory backend.
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        num_bytes: int,
        dev: torch.device,
        force_put: bool = False,
        num_qps_per_rank: int = 0,
    ):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        group = bootstrap.process_group
        if group is None:
            raise EPUnsupported(
                "NVSHMEM memory: needs a torch process group (group), not an mpi4py communicator"
            )
        if not symm_mem.is_nvshmem_available():
            raise EPUnsupported(
                "NVSHMEM memory: this torch build cannot use NVSHMEM "
                "(symm_mem.is_nvshmem_available() is False); install a CUDA build of torch >= 2.8 "
                "and the nvidia-nvshmem-cu12 / -cu13 wheel"
            )
        if bootstrap.world_size != dist.get_world_size():
            raise EPUnsupported(
                f"NVSHMEM memory: the group has {bootstrap.world_size} ranks but the default group "
                f"has {dist.get_world_size()}; NVSHMEM spans the default group, so every rank must "
                "take part"
            )
        self.rank = bootstrap.rank
        self.world_size = bootstrap.world_size
        self.num_bytes = num_bytes
        self.force_put = force_put
        peers = bootstrap.all_gather_object(
            {
                "host": socket.gethostname(),
                "gpu": str(torch.cuda.get_device_properties(dev).uuid),
                "mps": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                "pe": dist.get_rank(),
            }
        )
        oversubscribed = {gpu: total for gpu, total in _mps_shares(peers).items() if total > 100}
        if oversubscribed:
            raise EPUnsupported(
                "NVSHMEM memory: ranks sharing a GPU need MPS (nvidia-cuda-mps-control -d) and "
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE values adding up to <= 100 per GPU (e.g. 50 "
                f"each for 2 ranks; unset counts as 100); got {oversubscribed}. Without that "
                "NVSHMEM starts in a limited mode whose collectives exit the process"
            )
        nvshmem_environment(len({p["host"] for p in peers}) == 1, num_qps_per_rank)
        try:
            symm_mem.set_backend("NVSHMEM")
        except RuntimeError as e:
            raise EPStateError(
                "NVSHMEM memory: this process already allocated symmetric memory with another "
                f"backend ({symm_mem.get_backend(dev)}); torch allows one backend per process ({e})"
            ) from e
        try:
            self._tensor = symm_mem.empty(max(num_bytes, 128), dtype=torch.uint8, device=dev)
            self._handle = symm_mem.rendezvous(self._tensor, group)
        except RuntimeError as e:
            raise EPUnsupported(
                f"NVSHMEM memory: NVSHMEM could not start or allocate {num_bytes} bytes ({e}). "
                "Check NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME (an interface connecting the ranks), "
                "NVSHMEM_SYMMETRIC_SIZE (heap size), and MPS when ranks share a GPU; "
                "NVSHMEM_DEBUG=INFO explains its choices"
            ) from e
        self.local = self._tensor[:num_bytes]
        peer_ptrs = [int(p) for p in self._handle.buffer_ptrs]
        self.transport = (
            device.STORES.value if all(peer_ptrs) and not force_put else device.NVSHMEM.value
        )
        self._publish(
            peer_ptrs, [self._tensor.data_ptr()] * self.world_size, [p["pe"] for p in peers], dev
        )

    def close(self) -> None:
        self._handle = None
        self._tensor = None
        self._forget()


class EmulatedPeerMemory(HeapMemory):
    """The CPU stand-in: `/dev/shm` files (`ShmPeerMemory`), nodes of `ranks_per_node` group ranks.

    A rank's node is `rank // ranks_per_node`; peers of its own node are mapped (`peer_ptrs`), the
    others reached by `device.py`'s emulated puts (`put_ptrs`: every file as mapped here).
    """

    def __init__(
        self, bootstrap: Bootstrap, num_bytes: int, ranks_per_node: int, force_put: bool = False
    ):
        from .shm import ShmPeerMemory

        if ranks_per_node <= 0 or bootstrap.world_size % ranks_per_node != 0:
            raise EPInvalidArgument(
                "EmulatedPeerMemory: ranks_per_node must divide the rank count "
                f"{bootstrap.world_size}, got {ranks_per_node}"
            )
        self._shm = ShmPeerMemory(bootstrap, num_bytes)
        self.rank = bootstrap.rank
        self.world_size = bootstrap.world_size
        self.num_bytes = num_bytes
        self.force_put = force_put
        self.transport = device.EMULATED.value
        self.local = self._shm.local
        node = self.rank // ranks_per_node
        files = list(self._shm.peer_ptrs)
        mapped = [p if j // ranks_per_node == node else 0 for j, p in enumerate(files)]
        self._publish(mapped, files, list(range(self.world_size)), torch.device("cpu"))

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._forget()
