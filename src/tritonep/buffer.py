"""`Buffer`: DeepEP V1's communication buffer (reference §5-§14): the public surface.

This module holds what a DeepEP user touches: construction and its rules, attributes, argument
checks, and the routing of each call to the mode that serves it. The work happens below:

* `runtime/`: topology (nodes, which mode, which backend), the comm stream and its hand-offs, the
  host block with its bounded waits and error records, the NVL and RDMA memories;
* `modes/`: one orchestration module per mode (`layout` for `get_dispatch_layout`, `intranode`,
  `internode`, `low_latency`);
* `kernels/` and `transport/`: the Triton kernels and where peer memory comes from.

Every public method runs with torch-function modes disabled (`_plain_torch`): DeepEP-style scripts
set `torch.set_default_device('cuda')`, which routes every torch call, tensor methods included,
through a Python mode (measured: host time per call 150 -> 196 us for a cached dispatch). Every
tensor tritonep allocates names its device, so the mode has nothing to add.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import _env, protocol
from . import config as _config
from ._device import is_sm90_compiled as _is_sm90_compiled
from ._validate import check_int, check_rows_aligned, check_tensor, fail
from .config import MAX_TOPK, Config
from .errors import EPStateError, EPUnsupported
from .event import EventHandle, EventOverlap
from .handles import InternodeHandle, IntranodeHandle
from .kernels.common.context import LaunchContext
from .modes.contract import CombineKey, DispatchKey, ThroughputMode
from .modes.intranode import IntranodeMode
from .modes.layout import RoutingLayout
from .runtime.host import HostBlock
from .runtime.memory import BufferMemory
from .runtime.outputs import OutputPools
from .runtime.streams import CommStreams
from .runtime.topology import Topology, select_backend
from .transport import Bootstrap


def _plain_torch(method):
    """Run `method` with torch-function modes (e.g. a default device) and subclass hooks off."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return method(*args, **kwargs)

    return wrapper


class _Runtime:
    """The subset of V1's C++ runtime object that user code calls directly (reference §7.3)."""

    def __init__(self, buffer: Buffer):
        self._buffer = weakref.ref(buffer)

    def _get(self) -> Buffer:
        buffer = self._buffer()
        if buffer is None:
            raise EPStateError("runtime: its Buffer no longer exists")
        return buffer

    def is_available(self) -> bool:
        buffer = self._buffer()
        return buffer is not None and buffer.runtime is self

    def get_num_rdma_ranks(self) -> int:
        return self._get().num_rdma_ranks

    def get_rdma_rank(self) -> int:
        return self._get().rdma_rank

    def get_root_rdma_rank(self, global_: bool) -> int:
        buffer = self._get()
        return buffer.nvl_rank if global_ else 0

    def get_local_device_id(self) -> int:
        device = self._get()._device
        return device.index if device.type == "cuda" else -1

    def get_comm_stream(self):
        return self._get().get_comm_stream()


class _Resources:
    """Everything a Buffer must release; closed by `destroy()`, by GC, or at interpreter exit."""

    def __init__(self, rank: int):
        self.rank = rank
        self.memory: BufferMemory | None = None
        self.host: HostBlock | None = None
        self.outputs: OutputPools | None = None
        self.warn_if_open = False

    def close(self) -> None:
        if self.warn_if_open and self.memory is not None:
            print(
                f"tritonep: Buffer on rank {self.rank} was created with explicitly_destroy=True "
                "but destroy() was never called; resources may leak",
                file=sys.stderr,
            )
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.outputs is not None:
            self.outputs.clear()  # pooled outputs nobody holds: their GPU memory goes now


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class Buffer:
    """The core expert-parallel communication buffer (DeepEP V1 API).

    Modes: intranode high-throughput (`get_dispatch_layout`, `dispatch`, `combine` among the
    ranks of one NVLink domain) and low-latency (`low_latency_dispatch` / `low_latency_combine`,
    `low_latency_mode=True`). Kernels run on the GPUs through peer memory (and NVSHMEM where a peer
    is on another node), or on the CPU backend in the Triton interpreter (`/dev/shm` memory).

    Attributes:
        num_sms: class-level SM budget of the high-throughput kernels (see `set_num_sms`).
        rank, group_size, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
        explicitly_destroy, enable_shrink, runtime: as in DeepEP V1.
        nvl_rank, rdma_rank, num_rdma_ranks, num_nvl_ranks: this rank's index inside its node, its
            node, the number of nodes and of ranks per node (`TRITONEP_NVL_DOMAIN_SIZE`).
        num_qps_per_rank: V1's queue pairs per peer; tritonep passes it to NVSHMEM as
            `NVSHMEM_IBGDA_NUM_RC_PER_PE` when it starts NVSHMEM (unless the user set that).
        allow_nvlink_for_low_latency_mode: False sends low-latency traffic through the put path
            (NVSHMEM; emulated on the CPU) even to peers that plain stores reach, as V1 forces
            RDMA; results are identical.
        nvshmem_qp_depth: `NVSHMEM_QP_DEPTH` (default 1024), when `R_n > 1` or `low_latency_mode`.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
    ) -> None:
        """Create the buffer (collective and blocking).

        Arguments:
            group: the torch process group of the EP ranks (None if `comm` is given). Any backend:
                a gloo group on a GPU machine runs on the GPUs (that is how ranks share a GPU).
            num_nvl_bytes: peer-accessible bytes per rank for high-throughput calls (multiple of
            128).
            num_rdma_bytes: symmetric bytes for internode and low-latency calls (multiple of 128).
            low_latency_mode: enable the low-latency API.
            num_qps_per_rank: V1's RDMA queue pairs per peer (see the attribute).
            allow_nvlink_for_low_latency_mode: see the attribute.
            allow_mnnvl, use_fabric: V1 multi-node-NVLink / fabric-memory switches; tritonep
                allocates through torch symmetric memory and NVSHMEM and warns once when asked.
            explicitly_destroy: if True, resources are released only by `destroy()`.
            enable_shrink: enable rank masking for the low-latency mode.
            comm: an mpi4py communicator used instead of `group` for the bootstrap exchange.
        """
        with torch._C.DisableTorchFunction():
            self._construct(
                group,
                num_nvl_bytes,
                num_rdma_bytes,
                low_latency_mode,
                num_qps_per_rank,
                allow_nvlink_for_low_latency_mode,
                allow_mnnvl,
                use_fabric,
                explicitly_destroy,
                enable_shrink,
                comm,
            )

    def _construct(
        self,
        group,
        num_nvl_bytes,
        num_rdma_bytes,
        low_latency_mode,
        num_qps_per_rank,
        allow_nvlink_for_low_latency_mode,
        allow_mnnvl,
        use_fabric,
        explicitly_destroy,
        enable_shrink,
        comm,
    ) -> None:
        self.runtime = None
        op = "Buffer"
        bootstrap = Bootstrap(group, comm)
        self._resources = _Resources(bootstrap.rank)
        weakref.finalize(self, _Resources.close, self._resources)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            check_int(op, name, value, minimum=0)
            if value % 128 != 0:
                fail(op, f"{name} must be a multiple of 128, got {value}")
        num_ranks = bootstrap.world_size
        topology = Topology.from_env(bootstrap.rank, num_ranks)
        if num_rdma_bytes > 0 and not (topology.is_internode or low_latency_mode):
            fail(
                op,
                "num_rdma_bytes > 0 needs more than one node or low_latency_mode, got "
                f"{num_rdma_bytes} with {num_ranks} ranks in nodes of {topology.ranks_per_node}",
            )
        if (topology.is_internode or low_latency_mode) and check_int(
            op, "num_qps_per_rank", num_qps_per_rank
        ) <= 0:
            fail(op, f"num_qps_per_rank must be > 0, got {num_qps_per_rank}")
        if allow_mnnvl or use_fabric:
            _warn_once(
                "fabric",
                "tritonep: allow_mnnvl / use_fabric are accepted as hints; memory comes from torch "
                "symmetric memory and NVSHMEM, results are unchanged",
            )

        self.rank = bootstrap.rank
        self.group_size = num_ranks
        self.group = group if group is not None else comm
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self._bootstrap = bootstrap
        self._topology = topology
        self.num_nvl_ranks = topology.ranks_per_node
        self.nvl_rank = topology.local_rank
        self.rdma_rank = topology.node
        self.num_rdma_ranks = topology.num_nodes
        if topology.is_internode or low_latency_mode:
            self.nvshmem_qp_depth = _env.nvshmem_qp_depth()

        # Rule 6: every rank must pass the same sizes and modes (V1 silently misbehaves otherwise).
        mine = (num_nvl_bytes, num_rdma_bytes, bool(low_latency_mode), bool(enable_shrink))
        everyone = bootstrap.all_gather_object(mine)
        if any(other != mine for other in everyone):
            fail(
                op,
                "all ranks must pass identical (num_nvl_bytes, num_rdma_bytes, low_latency_mode, "
                f"enable_shrink); got {everyone} (index = rank)",
            )
        self._backend = select_backend()
        if self._backend == "cuda":
            if not torch.cuda.is_available():
                raise EPUnsupported(
                    f"{op}: the CUDA backend was selected but no CUDA device is available"
                )
            self._device = torch.device("cuda", torch.cuda.current_device())
            # Every rank's GPU (one gather): ranks sharing this one (under MPS) split its SMs, and
            # the peer-memory transport depends on whether any GPU is shared.
            gpu = str(torch.cuda.get_device_properties(self._device).uuid)
            gpus = bootstrap.all_gather_object(gpu)
            ranks_on_gpu = gpus.count(gpu)
            from .utils import check_nvlink_connections

            if group is not None:
                check_nvlink_connections(group)
        else:
            self._device = torch.device("cpu")
            gpus = None
            ranks_on_gpu = 1
        from .kernels import load_kernels

        self._kernels = load_kernels(self._backend)

        timeout_s = _env.timeout_s()
        force_put = _env.force_put() or (low_latency_mode and not allow_nvlink_for_low_latency_mode)
        resources = self._resources
        resources.host = self._host = HostBlock(
            self.rank,
            self._backend == "cuda",
            timeout_s,
            self.explicitly_destroy,
            topology.ranks_per_node if topology.is_internode else None,
        )
        resources.memory = self._memory = BufferMemory(
            bootstrap,
            topology,
            self._backend,
            self._device,
            gpus,
            num_nvl_bytes,
            num_rdma_bytes,
            force_put,
            num_qps_per_rank,
            rdma_reserved_bytes=(
                self._kernels.internode.regions.signal_reserve(topology)
                if topology.is_internode
                else 0
            ),
        )
        self._streams = CommStreams(self._device if self._backend == "cuda" else None)
        if self._backend == "cuda":
            clock_addr = 0
        else:
            from .runtime.clock import clock_address

            clock_addr = clock_address()
        self._rank_mask = torch.zeros(num_ranks, dtype=torch.int32, device=self._device)
        ctx = LaunchContext(
            peer_bases=self._memory.peer_bases,
            rank=self.rank,
            num_ranks=num_ranks,
            data_offset=self._memory.nvl_offset,
            rank_mask=self._rank_mask,
            host_addr=self._host.address,
            clock_addr=clock_addr,
            timeout_ns=int(timeout_s * 1e9),
            use_globaltimer=self._backend == "cuda",
            all_ranks_on_gpu=self._backend == "cuda" and ranks_on_gpu == num_ranks,
            early_launch=self._backend == "cuda"
            and torch.cuda.get_device_capability(self._device) >= (9, 0),
        )
        resources.outputs = self._outputs = OutputPools(self._device)
        self._layout = RoutingLayout(
            self._kernels,
            topology,
            self._host,
            self._streams,
            self._rank_mask,
            self._device,
            self._outputs,
        )
        # The mode serving dispatch / combine: more than one node -> internode.
        self._throughput_mode: ThroughputMode
        if topology.is_internode:
            from .modes.internode import InternodeMode

            self._throughput_mode = InternodeMode(
                self._kernels, ctx, self._memory, self._host, self._streams, self._backend, topology
            )
        else:
            self._throughput_mode = IntranodeMode(
                self._kernels, ctx, self._host, self._streams, self._backend, num_nvl_bytes
            )
        self._low_latency = None
        if low_latency_mode:
            from .modes.low_latency import LowLatencyMode

            self._low_latency = LowLatencyMode(
                self._kernels,
                ctx,
                self._memory,
                self._host,
                self._streams,
                self._backend,
                num_rdma_bytes,
                self.enable_shrink,
                ranks_on_gpu,
                self._outputs,
            )
        self._validated_handles: dict = {}
        # The default Config of each kind, per (kind, Buffer.num_sms, TRITONEP_CONFIG_FILE): with
        # the tuned tables it came from (`_resolve_config`).
        self._default_configs: dict = {}
        if self._backend == "cuda":
            torch.cuda.synchronize(self._device)
        # Nobody may signal a peer before every rank has zeroed its signal region.
        bootstrap.barrier()
        resources.warn_if_open = self.explicitly_destroy
        self.runtime = _Runtime(self)

    # ------------------------------------------------------------------------------ lifetime
    def destroy(self) -> None:
        """Release all resources (collective). Only for buffers made with
        `explicitly_destroy=True`."""
        if not self.explicitly_destroy:
            raise EPStateError(
                "destroy: only buffers created with explicitly_destroy=True can be destroyed "
                "explicitly"
            )
        if self.runtime is None:
            raise EPStateError("destroy: buffer has been destroyed already")
        if self._backend == "cuda":
            torch.cuda.synchronize(self._device)
        # No peer may still be reading or writing this rank's memory when it goes, nor still map it
        # (CUDA IPC frees an allocation only once every importer has let go of it).
        self._bootstrap.barrier()
        self._memory.release_peers()
        self._bootstrap.barrier()
        self._resources.warn_if_open = False
        self._resources.close()
        self._validated_handles.clear()
        self.runtime = None

    def _check_usable(self, op: str) -> None:
        if self.runtime is None:
            raise EPStateError(f"{op}: buffer has been destroyed")
        self._host.check_usable(op)
        # `torch.cuda.current_device()` adds a Python layer (lazy init, ~1.5 us on the H200 host).
        if self._backend == "cuda" and torch._C._cuda_getDevice() != self._device.index:
            raise EPStateError(
                f"{op}: buffer lives on {self._device} but the current device is "
                f"cuda:{torch.cuda.current_device()}"
            )

    # ------------------------------------------------------------------------ static helpers
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when FP8 / Hopper paths are usable in this process (CUDA device with sm >= 90)."""
        return _is_sm90_compiled()

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the class-wide SM budget used by `get_dispatch_config` / `get_combine_config`."""
        check_int("set_num_sms", "new_num_sms", new_num_sms)
        if new_num_sms % 2 != 0 or new_num_sms <= 0:
            fail("set_num_sms", f"new_num_sms must be a positive even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Recommended dispatch `Config` for `num_ranks` ranks (a new object)."""
        return _config.dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Recommended combine `Config` for `num_ranks` ranks (a new object)."""
        return _config.combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream, to pass as `previous_event`."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """V1's exact `num_rdma_bytes` recommendation for the low-latency mode (reference §6.5)."""
        return _config.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    # ------------------------------------------------------------------------ local helpers
    def get_comm_stream(self):
        """The buffer's high-priority communication stream (None on the CPU backend)."""
        return self._streams.expose()

    @_plain_torch
    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A view (no copy) of this rank's NVL buffer (or RDMA buffer), `offset` bytes in.
        Scratch."""
        op = "get_local_buffer_tensor"
        self._check_usable(op)
        return self._memory.local_view(op, dtype, size, offset, use_rdma_buffer)

    # ------------------------------------------------------------------------ rank masking
    @_plain_torch
    def update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (`mask=True`) or unmask a rank for this rank's high-throughput calls (tritonep
        extension).

        Local, enqueued on the current stream, no host synchronisation. A masked rank is left out of
        high-throughput traffic on this rank: `get_dispatch_layout` treats its experts as not
        selected (its `num_tokens_per_rank` entry, its experts' counts and its `is_token_in_rank`
        column read zero: the dropped tokens show in the returned counts), dispatch sends it
        nothing and does not wait for it, combine neither sends to it nor waits for or adds its
        rows. Masks must be symmetric (if rank a masks b, b masks a) and every rank keeps making
        the same collective calls; a rank that masked every peer only moves its own tokens.
        Low-latency masks (`low_latency_update_mask_buffer`) are separate.
        """
        op = "update_mask_buffer"
        self._check_usable(op)
        check_int(op, "rank_to_mask", rank_to_mask)
        if not 0 <= rank_to_mask < self.group_size:
            fail(op, f"rank_to_mask must be in [0, {self.group_size}), got {rank_to_mask}")
        if mask and rank_to_mask == self.rank:
            fail(
                op,
                f"a rank cannot mask itself, got rank_to_mask={rank_to_mask} on rank {self.rank}",
            )
        self._rank_mask[rank_to_mask] = int(bool(mask))

    @_plain_torch
    def query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy this rank's high-throughput mask (1 = masked) into `mask_status`, int32 with R
        elements."""
        op = "query_mask_buffer"
        self._check_usable(op)
        check_tensor(op, "mask_status", mask_status, device=self._device, dtypes=(torch.int32,))
        if mask_status.numel() != self.group_size:
            fail(op, f"mask_status must have {self.group_size} elements, got {mask_status.numel()}")
        mask_status.copy_(self._rank_mask.view(mask_status.shape))

    @_plain_torch
    def clean_mask_buffer(self) -> None:
        """Unmask every rank for this rank's high-throughput calls."""
        self._check_usable("clean_mask_buffer")
        self._rank_mask.zero_()

    # ------------------------------------------------------------------------------ layout
    @_plain_torch
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Token counts per rank / node / expert and the `is_token_in_rank` mask (local, no
        communication).

        Arguments:
            topk_idx: `[N, K]` int64 (or int32), the experts each token selects; negative = none.
            num_experts: total experts E, divisible by the rank count.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of reference §14.5.

        Returns:
            num_tokens_per_rank: int32 `[R]`; num_tokens_per_rdma_rank: int32 `[R // nvl domain]`
            when more than one node, else None; num_tokens_per_expert: int32 `[E]`;
            is_token_in_rank: bool `[N, R]`; event: `EventOverlap`.
        """
        op = "get_dispatch_layout"
        self._check_usable(op)
        return self._layout(
            op, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )

    # ---------------------------------------------------------------------------- dispatch
    @_plain_torch
    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token to every rank that hosts one of its experts (collective).

        Arguments:
            x: `[N, H]` rows (any dtype, row bytes a multiple of 16), or `(x_fp8 [N, H], scales [N,
            S])`
                with float32 or packed-UE8M0 int32 scales of any strides.
            handle: a handle from an earlier non-cached dispatch: reuse its layout (cached mode, no
                host synchronisation, CUDA-graph capturable); the count/top-k arguments must then be
                omitted.
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: outputs of
            `get_dispatch_layout`
                (non-cached mode). `num_tokens_per_rdma_rank` is ignored for one node.
            topk_idx / topk_weights: optional `[N, K]` routing (int64/int32 and float32), forwarded
                with ids rebased to the receiver's local experts (-1 elsewhere, weight 0).
            expert_alignment: rounds up each entry of the returned per-expert list.
            num_worst_tokens: if > 0, outputs get exactly this many rows and the host never blocks
                (padding rows carry top-k -1 and weight 0).
            config: `Config`; None means `get_dispatch_config(R)`.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of reference §14.5.

        Returns:
            (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
            event);
            cached mode returns (recv_x, None, None, None, None, event). Rows are ordered by source
            rank, then source token. Non-cached mode without `num_worst_tokens` blocks the host
            until the received counts are known.
        """
        op = "dispatch"
        self._check_usable(op)
        return self._dispatch(
            op,
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    # ----------------------------------------------------------------------------- combine
    @_plain_torch
    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Sum the copies of each token returned by every rank it was dispatched to (collective).

        Arguments:
            x: `[X, H]` bfloat16 (float16 and float32 also accepted) where X is the handle's row
                count; row i answers row i of the dispatch output.
            handle: the handle of the matching non-cached dispatch.
            topk_weights: optional float32 `[X, K]`, summed alongside (no bias).
            bias: None, a tensor or a pair of tensors `[N, H]` with x's dtype, added once per token.
            config: `Config` with the handle's `num_sms`; None means `get_combine_config(R)`.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of reference §14.5.

        Returns:
            (combined_x `[N, H]`, combined_topk_weights `[N, K]` or None, event). The sum is
            accumulated in fp32 (bias first, then ranks in ascending order) and rounded once. No
            host synchronisation; CUDA-graph capturable.
        """
        op = "combine"
        self._check_usable(op)
        return self._combine(
            op,
            x,
            handle,
            topk_weights,
            bias,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    # ---------------------------------------------------------------------- internode (R_n > 1)
    @_plain_torch
    def internode_dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """`dispatch` across nodes (reference §11): same arguments and returns, `config` required.

        Each token crosses to each destination node once (to the rank with this rank's local
        index there), which stores it into every rank of its node that receives it. Non-cached
        calls also need `num_tokens_per_rdma_rank` (int32 `[R_n]`, from `get_dispatch_layout`) and
        return the 10-tuple handle of reference §12.2. `dispatch` routes here when the ranks span
        several nodes.
        """
        op = "internode_dispatch"
        self._check_internode(op)
        if config is None:
            fail(op, "config must be given (V1's internode entry points have no default), got None")
        return self._dispatch(
            op,
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    @_plain_torch
    def internode_combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """`combine` across nodes (reference §11): same arguments and returns, `config` required.

        Copies are summed inside each node first (fp32, rounded to x's dtype for the crossing),
        then across nodes in ascending order after the biases (fp32, rounded once). `combine`
        routes here when the ranks span several nodes.
        """
        op = "internode_combine"
        self._check_internode(op)
        if config is None:
            fail(op, "config must be given (V1's internode entry points have no default), got None")
        return self._combine(
            op,
            x,
            handle,
            topk_weights,
            bias,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def _check_internode(self, op: str) -> None:
        self._check_usable(op)
        if not self._topology.is_internode:
            raise EPStateError(
                f"{op}: only valid when the ranks span several nodes (V1: more than 8 ranks), got "
                f"{self.group_size} ranks in one node of {self._topology.ranks_per_node}"
            )

    # ------------------------------------------------- dispatch / combine of either mode
    def _dispatch(
        self,
        op,
        x,
        handle,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment,
        num_worst_tokens,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):
        """Checks shared by both high-throughput modes, then the mode of this topology."""
        config = self._resolve_config(op, config, Buffer.get_dispatch_config)
        x_data, x_scales = self._check_dispatch_x(op, x)
        num_tokens, num_ranks = x_data.size(0), self.group_size
        check_int(op, "num_worst_tokens", num_worst_tokens, minimum=0)
        if handle is not None:
            handle = self._check_handle(op, handle, config.num_channels)
            if topk_idx is not None or topk_weights is not None:
                fail(
                    op,
                    "topk_idx and topk_weights must be None for a cached dispatch (handle given)",
                )
            if handle.is_token_in_rank.size(0) != num_tokens:
                fail(
                    op,
                    f"x must have the handle's {handle.is_token_in_rank.size(0)} tokens, got "
                    f"{num_tokens}",
                )
            is_token_in_rank = handle.is_token_in_rank
        else:
            check_int(op, "expert_alignment", expert_alignment, minimum=1)
            counts = [
                ("num_tokens_per_rank", num_tokens_per_rank, (num_ranks,), torch.int32),
                ("is_token_in_rank", is_token_in_rank, (num_tokens, num_ranks), torch.bool),
                ("num_tokens_per_expert", num_tokens_per_expert, (None,), torch.int32),
            ]
            if self._topology.is_internode:  # one node: V1 ignores it
                nodes = (self._topology.num_nodes,)
                counts.append(
                    ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, nodes, torch.int32)
                )
            for name, value, shape, dtype in counts:
                if value is None:
                    fail(
                        op,
                        f"{name} is required for a non-cached dispatch (no handle given), got None",
                    )
                check_tensor(op, name, value, device=self._device, dtypes=(dtype,), shape=shape)
            num_experts = num_tokens_per_expert.size(0)
            if num_experts == 0 or num_experts % num_ranks != 0:
                fail(
                    op,
                    f"num_tokens_per_expert must have a positive multiple of {num_ranks} entries, "
                    f"got {num_experts}",
                )
            if num_experts // num_ranks > protocol.MAX_LOCAL_EXPERTS:
                fail(
                    op,
                    f"num_tokens_per_expert must have at most {protocol.MAX_LOCAL_EXPERTS} x "
                    f"{num_ranks} entries ({protocol.MAX_LOCAL_EXPERTS} experts per rank), got "
                    f"{num_experts} ({num_experts // num_ranks} per rank)",
                )
            if (topk_idx is None) != (topk_weights is None):
                fail(op, "topk_idx and topk_weights must be given together")
            if topk_idx is not None:
                check_tensor(
                    op,
                    "topk_idx",
                    topk_idx,
                    device=self._device,
                    dtypes=(torch.int64, torch.int32),
                    dim=2,
                )
                if topk_idx.size(0) != num_tokens or not 0 < topk_idx.size(1) <= MAX_TOPK:
                    fail(
                        op,
                        f"topk_idx must have shape [{num_tokens}, K] with 1 <= K <= {MAX_TOPK}, "
                        f"got {tuple(topk_idx.shape)}",
                    )
                check_tensor(
                    op,
                    "topk_weights",
                    topk_weights,
                    device=self._device,
                    dtypes=(torch.float32,),
                    shape=tuple(topk_idx.shape),
                )
        key = DispatchKey.of(
            config,
            x_data,
            x_scales,
            topk_idx,
            num_tokens_per_expert,
            num_ranks,
            num_worst_tokens,
            handle is not None,
        )
        return self._throughput_mode.dispatch(
            op,
            key,
            x_data,
            x_scales,
            handle,
            num_tokens_per_expert,
            is_token_in_rank,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def _combine(
        self,
        op,
        x,
        handle,
        topk_weights,
        bias,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):
        """Checks shared by both high-throughput modes, then the mode of this topology."""
        config = self._resolve_config(op, config, Buffer.get_combine_config)
        handle = self._check_handle(op, handle, config.num_channels)
        num_rows, num_tokens = handle.num_recv_rows, handle.is_token_in_rank.size(0)
        check_tensor(
            op,
            "x",
            x,
            device=self._device,
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            dim=2,
        )
        if x.size(0) != num_rows:
            fail(op, f"x must have shape [{num_rows}, H] (the handle's rows), got {tuple(x.shape)}")
        check_rows_aligned(op, "x", x)
        if topk_weights is not None:
            check_tensor(
                op,
                "topk_weights",
                topk_weights,
                device=self._device,
                dtypes=(torch.float32,),
                dim=2,
            )
            if topk_weights.size(0) != num_rows or not 0 < topk_weights.size(1) <= MAX_TOPK:
                fail(
                    op,
                    f"topk_weights must have shape [{num_rows}, K] with 1 <= K <= {MAX_TOPK}, got "
                    f"{tuple(topk_weights.shape)}",
                )
        biases = self._check_bias(op, bias, num_tokens, x.size(1), x.dtype)
        return self._throughput_mode.combine(
            op,
            CombineKey.of(config, x, topk_weights, biases),
            x,
            handle,
            topk_weights,
            biases,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def _check_handle(self, op: str, handle, num_channels: int):
        """The handle of this topology's mode (`IntranodeHandle` or `InternodeHandle`), checked.

        Loops reuse one handle for many cached dispatches and combines: the last few validated
        ones are remembered (tuples are immutable and their tensors' metadata cannot change).
        """
        key = (id(handle), num_channels)
        hit = self._validated_handles.get(key)
        if hit is not None and hit[0] is handle:
            return hit[1]
        handle_type = InternodeHandle if self._topology.is_internode else IntranodeHandle
        checked = handle_type.checked(op, handle, num_channels, self._device, self._topology)
        if isinstance(handle, tuple):
            if len(self._validated_handles) >= 8:  # forget the oldest (dicts keep insertion order)
                del self._validated_handles[next(iter(self._validated_handles))]
            self._validated_handles[key] = (handle, checked)
        return checked

    # --------------------------------------------------------------------------- low latency
    def _ll(self, op: str):
        self._check_usable(op)
        if self._low_latency is None:
            raise EPStateError(f"{op}: the buffer was created with low_latency_mode=False")
        return self._low_latency

    @_plain_torch
    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Reset the low-latency signalling state of both buffer sets (collective, current stream).

        Call it before low-latency use when the buffer ran high-throughput kernels on shared memory,
        or when the low-latency geometry changes. Barriers across all (unmasked) ranks; CUDA-graph
        capturable.
        """
        op = "clean_low_latency_buffer"
        self._ll(op).clean(op, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @_plain_torch
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Send each (token, selected expert) pair to the expert's rank, for decoding (collective).

        Arguments:
            x: `[N, H]` bfloat16, `N <= num_max_dispatch_tokens_per_rank`, `H` a multiple of 128.
            topk_idx: `[N, K]` int64 (or int32) expert ids, negative = none.
            num_max_dispatch_tokens_per_rank: `T`, the same on every rank and every call of a
            geometry.
            num_experts: `E`, a multiple of the rank count.
            cumulative_local_expert_recv_stats: optional int32 `[E / R]`, += received rows per
            expert.
            dispatch_wait_recv_cost_stats: optional int64 `[R]`, += time waited per source rank
                (`tritonep.WAIT_COST_UNIT`).
            use_fp8: quantise to float8_e4m3fn with one scale per 128 channels in the kernel.
            round_scale: round scales up to powers of two; use_ue8m0: pack them as UE8M0 bytes
                (requires round_scale).
            async_finish: return an event on the comm stream instead of ordering the current stream.
            return_recv_hook: launch only the send phase now (on the current stream) and return a
                hook that launches the receive phase; nothing stays resident in between.

        Returns:
            (recv_x, recv_count, handle, event, hook): `recv_x` bf16 `[E/R, R*T, H]` or
            `(fp8 [E/R, R*T, H], scales [E/R, R*T, H/128] float32 or [E/R, R*T, H/512] int32)` with
            column-major scales; `recv_count` int32 `[E/R]`; the 5-tuple handle. Rows of an expert
            come in blocks by ascending source rank, ascending source token inside a block. No host
            synchronisation; CUDA-graph capturable (hook included).
        """
        op = "low_latency_dispatch"
        return self._ll(op).dispatch(
            op,
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        )

    @_plain_torch
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ):
        """Return each expert output row to its token and sum it weighted by `topk_weights`
        (collective).

        Arguments:
            x: bf16 `[E/R, R*T, H]` expert outputs, row k of expert e answering row k of the
            dispatch.
            topk_idx, topk_weights: `[N, K]` routing of this rank's tokens (the dispatch's; entries
                may be set to -1 to drop a contribution) and float32 weights.
            handle: the 5-tuple of the matching `low_latency_dispatch`.
            use_logfmt: send rows as LogFMT-10 (10 bits per value) instead of BF16.
            zero_copy: the outputs were already written into `get_next_low_latency_combine_buffer`.
            async_finish, return_recv_hook: as in `low_latency_dispatch`.
            out: optional bf16 `[N, H]` written in place and returned.
            combine_wait_recv_cost_stats: optional int64 `[R]`, += time waited per source rank.

        Returns:
            (combined_x bf16 `[N, H]`, event, hook). `combined_x[t]` is the fp32 sum over k of
            `topk_weights[t, k] * y(topk_idx[t, k], t)`, rounded once; zero where nothing was
            selected.
        """
        op = "low_latency_combine"
        return self._ll(op).combine(
            op,
            x,
            topk_idx,
            topk_weights,
            handle,
            use_logfmt,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )

    @_plain_torch
    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """Local: a bf16 `[E/R, R*T, H]` view of the staging area the next low-latency call uses,
        for
        `low_latency_combine(..., zero_copy=True)`."""
        op = "get_next_low_latency_combine_buffer"
        return self._ll(op).next_combine_buffer(op, handle)

    def _shrink(self, op: str):
        self._check_usable(op)
        if not self.enable_shrink:
            raise EPStateError(f"{op}: the buffer was created with enable_shrink=False")
        return self._ll(op)

    @_plain_torch
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Local: mask (`mask=True`) or unmask `rank_to_mask` for this rank's low-latency calls
        (current stream, no host synchronisation)."""
        op = "low_latency_update_mask_buffer"
        low_latency = self._shrink(op)
        check_int(op, "rank_to_mask", rank_to_mask)
        if not 0 <= rank_to_mask < self.group_size:
            fail(op, f"rank_to_mask must be in [0, {self.group_size}), got {rank_to_mask}")
        low_latency.update_mask(rank_to_mask, bool(mask))

    @_plain_torch
    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Local: copy this rank's low-latency mask (1 = masked) into int32 `mask_status` of R
        elements."""
        op = "low_latency_query_mask_buffer"
        low_latency = self._shrink(op)
        check_tensor(op, "mask_status", mask_status, device=self._device, dtypes=(torch.int32,))
        if mask_status.numel() != self.group_size:
            fail(op, f"mask_status must have {self.group_size} elements, got {mask_status.numel()}")
        low_latency.query_mask(mask_status)

    @_plain_torch
    def low_latency_clean_mask_buffer(self) -> None:
        """Local: unmask every rank for this rank's low-latency calls."""
        self._shrink("low_latency_clean_mask_buffer").clean_mask()

    # ------------------------------------------------------------------------- internals
    def _resolve_config(
        self, op: str, config: Config | None, default: Callable[[int], Config]
    ) -> Config:
        if config is None:
            # Building and validating a Config is about a third of a cached dispatch's host path,
            # so the default one is built once per (kind, SM count, config file) and reused while
            # the file's tables stay the ones it came from (`load_config_file.cache_clear()` after
            # rewriting the file gives new tables, hence a new Config).
            path = _env.config_file()
            tables = _config.load_config_file(path) if path is not None else None
            key = (default, Buffer.num_sms, path)
            known = self._default_configs.get(key)
            if known is not None and known[0] is tables:
                return known[1]
            config = self._check_config(op, default(self.group_size))
            self._default_configs[key] = (tables, config)
            return config
        return self._check_config(op, config)

    def _check_config(self, op: str, config) -> Config:
        if not isinstance(config, Config):
            fail(op, f"config must be a tritonep Config, got {type(config).__name__}")
        if config.num_sms < 2 or config.num_sms % 2 != 0:
            fail(op, f"config.num_sms must be even and >= 2, got {config.num_sms}")
        if config.num_channels > protocol.MAX_CHANNELS:
            fail(op, f"config.num_sms must be <= {2 * protocol.MAX_CHANNELS}, got {config.num_sms}")
        if self.num_nvl_bytes == 0:
            raise EPStateError(f"{op}: the buffer has no NVL memory (num_nvl_bytes=0)")
        return config

    def _check_dispatch_x(self, op: str, x):
        if isinstance(x, tuple):
            if len(x) != 2:
                fail(op, f"x must be a tensor or a (data, scales) pair, got a tuple of {len(x)}")
            x_data, x_scales = x
            check_tensor(op, "x[0]", x_data, device=self._device, dim=2, contiguous=False)
            if x_data.element_size() != 1:
                fail(op, f"x[0] (FP8 data) must have 1-byte elements, got {x_data.dtype}")
            check_tensor(
                op,
                "x[1]",
                x_scales,
                device=self._device,
                dtypes=(torch.float32, torch.int32),
                dim=2,
                contiguous=False,
            )
            if x_scales.size(0) != x_data.size(0):
                fail(op, f"x[1] (scales) must have {x_data.size(0)} rows, got {x_scales.size(0)}")
            check_rows_aligned(op, "x[0]", x_data)
            return x_data, x_scales
        check_tensor(op, "x", x, device=self._device, dim=2, contiguous=False)
        check_rows_aligned(op, "x", x)
        return x, None

    def _check_bias(self, op: str, bias, num_tokens: int, hidden: int, dtype: torch.dtype):
        if bias is None:
            return (None, None)
        if isinstance(bias, torch.Tensor):
            biases = (bias, None)
        elif isinstance(bias, tuple) and len(bias) == 2:
            biases = bias
        else:
            kind = f"a tuple of {len(bias)}" if isinstance(bias, tuple) else type(bias).__name__
            fail(op, f"bias must be None, a tensor or a pair of tensors, got {kind}")
        for i, b in enumerate(biases):
            if b is not None:
                check_tensor(
                    op,
                    f"bias[{i}]",
                    b,
                    device=self._device,
                    dtypes=(dtype,),
                    shape=(num_tokens, hidden),
                )
        return biases
