"""`Buffer`: DeepEP V1's communication buffer (spec §5-§14), orchestrating tritonep's kernels.

A Buffer owns one peer-accessible allocation per rank (signal region + `num_nvl_bytes` of data),
a host block the kernels report into, and a high-priority communication stream. Each collective
call is one `notify` launch plus one data launch on that stream; see `kernels/` for the protocols.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
import time
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import torch

from . import _env, protocol
from . import config as _config
from ._device import is_sm90_compiled as _is_sm90_compiled
from ._validate import check_int, check_rows_aligned, check_tensor, fail
from .config import Config
from .errors import EPInvalidArgument, EPStateError, EPTimeoutError, EPUnsupported
from .event import EventHandle, EventOverlap, previous_handle
from .handles import IntranodeHandle
from .kernels.context import LaunchContext
from .transport import Bootstrap, open_peer_memory

MAX_TOPK = 128  # the V1 size hints budget 128 top-k slots per row


class _Runtime:
    """The subset of V1's C++ runtime object that user code calls directly (spec §7.3)."""

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

    def __init__(self):
        self.peer_memory = None
        self.host_block: torch.Tensor | None = None
        self.warn_if_open = False
        self.rank = -1

    def close(self) -> None:
        if self.warn_if_open and self.peer_memory is not None:
            print(
                f"tritonep: Buffer on rank {self.rank} was created with explicitly_destroy=True but "
                "destroy() was never called; resources may leak",
                file=sys.stderr,
            )
        if self.peer_memory is not None:
            self.peer_memory.close()
            self.peer_memory = None
        self.host_block = None


def _select_backend() -> str:
    """`cuda` where CUDA is usable, else `cpu`; `TRITONEP_BACKEND` overrides. The group's own
    backend does not decide: DeepEP runs on the GPUs with whatever group it is given, and ranks
    sharing one GPU need a gloo group because NCCL refuses them."""
    requested = _env.backend()
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=1024)
def _layout_key(*fields) -> int:
    """A 31-bit fingerprint of a call's geometry; ranks compare it in notify (collective consistency).

    Cached: the same geometry recurs on every call of a training or decoding loop.
    """
    return zlib.crc32(repr(fields).encode()) & 0x7FFFFFFF


# Program shapes per backend (see Buffer._tuning and program_shapes).
_TUNING = {
    "cpu": dict(dispatch_warps=1, dispatch_tile_words=512, combine_warps=1, combine_tile_words=512, combine_tile=8,
                prefetch=True),
    "cuda": dict(dispatch_warps=8, dispatch_tile_words=8192, combine_warps=8, combine_tile_words=8192, combine_tile=8,
                 prefetch=True),
}
# Up to two ranks the combine kernel fits 16 warps x 64 KB tiles without spilling (128 registers),
# and more bytes in flight per program pay: 24 SMs, two ranks under MPS on one H200, 282 -> 339
# GB/s (benchmarks/results/2026-11-23-h200-mps-ep2-1dd5e47.json). With more ranks it spills.
_WIDE_COMBINE = dict(combine_warps=16, combine_tile_words=16384)


def program_shapes(backend: str, num_ranks: int) -> dict:
    """Warps, register tiles and prefetching of the data kernels for a backend and rank count."""
    if backend == "cuda" and num_ranks <= 2:
        return {**_TUNING[backend], **_WIDE_COMBINE}
    return _TUNING[backend]

# The queue layout of a geometry never changes; computing it is pure.
_fit_queues = functools.lru_cache(maxsize=1024)(protocol.QueueLayout.fit)


class _CallStreams:
    """Stream and event rules of one high-throughput call (spec §14.5).

    The hand-offs between the caller's stream and the comm stream reuse two events owned by the
    Buffer (a wait captures the event's state when it is enqueued, so re-recording is safe); only an
    `async_finish` call creates a new event, because the caller keeps it.
    """

    def __init__(self, buffer: Buffer, op: str, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        previous = previous_handle(previous_event, op)
        if allocate_on_comm_stream and (previous is None or not async_finish):
            fail(op, "allocate_on_comm_stream=True requires a previous_event and async_finish=True")
        self.buffer = buffer
        self.comm = buffer._comm_stream
        self.async_finish = async_finish
        self.allocate_on_comm_stream = allocate_on_comm_stream
        if self.comm is None:
            return
        self.compute = buffer._current_stream()
        if previous is not None and previous.event is not None:
            self.comm.wait_event(previous.event)
        else:
            buffer._to_comm.record(self.compute)
            self.comm.wait_event(buffer._to_comm)

    def allocation(self):
        """Context in which output tensors are allocated."""
        if self.comm is not None and self.allocate_on_comm_stream:
            return torch.cuda.stream(self.comm)
        return contextlib.nullcontext()

    def launch(self):
        """Context in which kernels are launched (the comm stream)."""
        return torch.cuda.stream(self.comm) if self.comm is not None else contextlib.nullcontext()

    def finish(self, tensors) -> EventOverlap:
        if self.comm is None:
            return EventOverlap(EventHandle._on_stream(None)) if self.async_finish else EventOverlap()
        if self.async_finish:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.comm)
                    if self.allocate_on_comm_stream:
                        t.record_stream(self.compute)
            return EventOverlap(EventHandle._on_stream(self.comm))
        to_compute = self.buffer._to_compute
        to_compute.record(self.comm)
        self.compute.wait_event(to_compute)
        return EventOverlap()


class Buffer:
    """The core expert-parallel communication buffer (DeepEP V1 API).

    Supports the intranode high-throughput mode (ranks of one NVLink domain: dispatch, combine,
    `get_dispatch_layout`). Kernels run on the GPUs through peer memory, or on the CPU backend in
    the Triton interpreter (gloo group; `/dev/shm` peer memory).

    Attributes:
        num_sms: class-level SM budget of the high-throughput kernels (see `set_num_sms`).
        rank, group_size, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
        explicitly_destroy, enable_shrink, runtime: as in DeepEP V1.
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
            group: the torch process group of the EP ranks (None if `comm` is given).
            num_nvl_bytes: peer-accessible bytes per rank for high-throughput calls (multiple of 128).
            num_rdma_bytes: symmetric bytes for internode and low-latency calls (multiple of 128).
            low_latency_mode: enable the low-latency API.
            num_qps_per_rank: V1's RDMA queue pairs per peer; accepted as a hint.
            allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: V1 transport hints; they
                never change results.
            explicitly_destroy: if True, resources are released only by `destroy()`.
            enable_shrink: enable rank masking for the low-latency mode.
            comm: an mpi4py communicator used instead of `group` for the bootstrap exchange.
        """
        self.runtime = None
        self._resources = _Resources()
        weakref.finalize(self, _Resources.close, self._resources)
        op = "Buffer"
        bootstrap = Bootstrap(group, comm)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            check_int(op, name, value, minimum=0)
            if value % 128 != 0:
                fail(op, f"{name} must be a multiple of 128, got {value}")
        num_ranks = bootstrap.world_size
        if num_rdma_bytes > 0 and not (num_ranks > 8 or low_latency_mode):
            fail(op, f"num_rdma_bytes > 0 needs more than 8 ranks or low_latency_mode, got {num_rdma_bytes} with {num_ranks} ranks")
        if (num_ranks > 8 or low_latency_mode) and check_int(op, "num_qps_per_rank", num_qps_per_rank) <= 0:
            fail(op, f"num_qps_per_rank must be > 0, got {num_qps_per_rank}")
        if num_ranks > 8 and num_ranks % 8 != 0:
            raise EPUnsupported(f"{op}: more than 8 ranks must be a multiple of 8, got {num_ranks}")

        self.rank = bootstrap.rank
        self.group_size = num_ranks
        self.group = group if group is not None else comm
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.num_qps_per_rank = num_qps_per_rank
        self._bootstrap = bootstrap
        self._timeout_s = _env.timeout_s()
        self.num_nvl_ranks = _env.nvl_domain_size(num_ranks)
        self.nvl_rank = self.rank % self.num_nvl_ranks
        self.rdma_rank = self.rank // self.num_nvl_ranks
        self.num_rdma_ranks = num_ranks // self.num_nvl_ranks
        if num_ranks > 8 or low_latency_mode:
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
        self._backend = _select_backend()
        if self._backend == "cuda":
            if not torch.cuda.is_available():
                raise EPUnsupported(f"{op}: the CUDA backend was selected but no CUDA device is available")
            self._device = torch.device("cuda", torch.cuda.current_device())
            from .utils import check_nvlink_connections

            if group is not None:
                check_nvlink_connections(group)
        else:
            self._device = torch.device("cpu")
        from .kernels import load_kernels

        self._kernels = load_kernels(self._backend)

        signal = protocol.signal_layout(num_ranks)
        self._signal = signal
        resources = self._resources
        resources.rank = self.rank
        if num_nvl_bytes > 0:
            resources.peer_memory = open_peer_memory(
                bootstrap, signal.num_bytes + num_nvl_bytes, self._backend, self._device
            )
            resources.peer_memory.local[: signal.num_bytes].zero_()
        pin = self._backend == "cuda"
        resources.host_block = torch.zeros(protocol.HOST_SLOTS, dtype=torch.int64, device="cpu", pin_memory=pin)
        self._host = resources.host_block.numpy()
        if self._backend == "cuda":
            self._comm_stream = torch.cuda.Stream(device=self._device, priority=-1)
            self._to_comm = torch.cuda.Event()
            self._to_compute = torch.cuda.Event()
            self._stream_cache = (None, None)
            clock_addr = 0
        else:
            self._comm_stream = None
            from ._clock import clock_address

            clock_addr = clock_address()
        self._layout_scratch = torch.zeros(0, dtype=torch.int32, device=self._device)
        self._rank_mask = torch.zeros(num_ranks, dtype=torch.int32, device=self._device)
        peer = resources.peer_memory
        self._ctx = LaunchContext(
            peer_bases=peer.peer_ptrs_dev if peer is not None else torch.zeros(num_ranks, dtype=torch.int64, device=self._device),
            rank=self.rank,
            num_ranks=num_ranks,
            data_offset=signal.num_bytes,
            host_addr=resources.host_block.data_ptr(),
            clock_addr=clock_addr,
            timeout_ns=int(self._timeout_s * 1e9),
            use_globaltimer=self._backend == "cuda",
            stream=self._comm_stream,
        )
        self._poison: str | None = None
        self._tuning_override: dict = {}
        self._base_tuning = program_shapes(self._backend, num_ranks)
        self._validated_handles: collections.OrderedDict = collections.OrderedDict()
        self._last_num_worst = 0
        self._ready_token = 0  # host-chosen id of the latest counting notify (see _wait_counts)
        if self._backend == "cuda":
            torch.cuda.synchronize(self._device)
        # Nobody may signal a peer before every rank has zeroed its signal region.
        bootstrap.barrier()
        resources.warn_if_open = self.explicitly_destroy
        self.runtime = _Runtime(self)

    # ------------------------------------------------------------------------------ lifetime
    def destroy(self) -> None:
        """Release all resources (collective). Only for buffers made with `explicitly_destroy=True`."""
        if not self.explicitly_destroy:
            raise EPStateError("destroy: only buffers created with explicitly_destroy=True can be destroyed explicitly")
        if self.runtime is None:
            raise EPStateError("destroy: buffer has been destroyed already")
        if self._backend == "cuda":
            torch.cuda.synchronize(self._device)
        # No peer may still be reading or writing this rank's memory when it goes, nor still map it
        # (CUDA IPC frees an allocation only once every importer has let go of it).
        self._bootstrap.barrier()
        if self._resources.peer_memory is not None:
            self._resources.peer_memory.release_peers()
            self._bootstrap.barrier()
        self._resources.warn_if_open = False
        self._resources.close()
        self._validated_handles.clear()
        self.runtime = None

    def _check_usable(self, op: str) -> None:
        if self.runtime is None:
            raise EPStateError(f"{op}: buffer has been destroyed")
        if self._poison is not None:
            remedy = (
                "destroy() it and create a new Buffer" if self.explicitly_destroy
                else "drop every reference to it (it is released when garbage-collected) and create a new Buffer"
            )
            raise EPStateError(f"{op}: buffer is unusable after an earlier device error ({self._poison}); {remedy}")
        self._raise_device_error(op)
        if self._backend == "cuda" and torch.cuda.current_device() != self._device.index:
            raise EPStateError(
                f"{op}: buffer lives on {self._device} but the current device is cuda:{torch.cuda.current_device()}"
            )

    def _raise_device_error(self, op: str, include_overflow: bool = True) -> None:
        """Turn a device report (spec §14.7) into an exception. After an error record the buffer is
        poisoned, except for a refusal (no kernel acted on it); a worst-case overflow only raises."""
        host = self._host
        overflow = int(host[protocol.HOST_OVERFLOW]) if include_overflow else 0
        if overflow:
            host[protocol.HOST_OVERFLOW] = 0
            raise EPInvalidArgument(
                f"{op}: rank {self.rank}: a worst-case dispatch received {overflow} rows but num_worst_tokens "
                f"was {self._last_num_worst}; the rows beyond it were dropped (raise num_worst_tokens)"
            )
        bad_token = int(host[protocol.HOST_BAD_EXPERT])
        if bad_token:
            k, value, num_experts = (int(v) for v in host[protocol.HOST_BAD_EXPERT + 1 : protocol.HOST_BAD_EXPERT + 4])
            host[protocol.HOST_BAD_EXPERT : protocol.HOST_BAD_EXPERT + 4] = 0
            raise EPInvalidArgument(
                f"{op}: rank {self.rank}: an earlier get_dispatch_layout on this buffer got "
                f"topk_idx[{bad_token - 1}, {k}] = {value}, which is not below num_experts={num_experts}; "
                "it was counted as -1 (no expert)"
            )
        code = int(host[protocol.HOST_ERROR + 7])
        if code == 0:
            return
        rank, peer, phase, channel, observed, expected = (
            int(v) for v in host[protocol.HOST_ERROR + 1 : protocol.HOST_ERROR + 7]
        )
        phase_name = protocol.PHASE_NAMES.get(phase, f"phase {phase}")
        where = f"{phase_name} phase" + (f", channel {channel}" if channel >= 0 else "")
        if code == protocol.ERR_TIMEOUT:
            message = (
                f"rank {rank} timed out after {self._timeout_s:g} s in the {where} waiting for rank {peer} "
                f"(progress seen {observed}, needed {expected}); TRITONEP_TIMEOUT_S sets the limit"
            )
            error = EPTimeoutError
        elif code == protocol.ERR_LAYOUT_MISMATCH:
            message = (
                f"rank {rank} found in the {where} that rank {peer} made this call with a different "
                f"geometry (hidden size, top-k, scales, dtype or config; fingerprint {observed} vs {expected})"
            )
            error = EPInvalidArgument
        elif code == protocol.ERR_REFUSED:
            host[protocol.HOST_ERROR : protocol.HOST_ERROR + protocol.ERROR_SLOTS] = 0
            raise EPUnsupported(
                f"{op}: the CPU backend runs a launch's programs one after another, so a queue must hold a "
                f"whole channel; rank {peer} needs {observed} rows but queues hold {expected}: raise "
                "num_nvl_bytes, num_max_nvl_chunked_recv_tokens or num_sms"
            )
        else:
            message = f"rank {rank}: device error code {code} in the {where}"
            error = EPStateError
        self._poison = message
        print(f"tritonep: {op}: {message}", file=sys.stderr)
        raise error(f"{op}: {message}")

    def _current_stream(self):
        """The caller's current CUDA stream; the Stream object is cached per raw handle, because
        building one (`torch.cuda.current_stream()`) costs microseconds on every call."""
        raw = torch._C._cuda_getCurrentRawStream(self._device.index)
        if raw != self._stream_cache[0]:
            self._stream_cache = (raw, torch.cuda.current_stream(self._device))
        return self._stream_cache[1]

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
        """V1's exact `num_rdma_bytes` recommendation for the low-latency mode (spec §6.5)."""
        return _config.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ------------------------------------------------------------------------ local helpers
    def get_comm_stream(self):
        """The buffer's high-priority communication stream (None on the CPU backend)."""
        return self._comm_stream

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A view (no copy) of this rank's raw buffer, starting `offset` bytes in. Contents are scratch."""
        op = "get_local_buffer_tensor"
        self._check_usable(op)
        if use_rdma_buffer:
            raise EPUnsupported(f"{op}: the RDMA buffer (low-latency / internode modes) is not implemented yet")
        peer = self._resources.peer_memory
        if peer is None:
            raise EPStateError(f"{op}: this buffer has no NVL memory (num_nvl_bytes=0)")
        if not isinstance(dtype, torch.dtype):
            fail(op, f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        itemsize = dtype.itemsize
        check_int(op, "offset", offset, minimum=0)
        if offset % itemsize != 0 or offset > self.num_nvl_bytes:
            fail(op, f"offset must be a multiple of {itemsize} within {self.num_nvl_bytes} bytes, got {offset}")
        start = self._signal.num_bytes + offset
        raw = peer.local[start : self._signal.num_bytes + self.num_nvl_bytes]
        view = raw[: (raw.numel() // itemsize) * itemsize].view(dtype)
        if size is None:
            return view
        size = torch.Size(size)
        if size.numel() > view.numel():
            fail(op, f"size {tuple(size)} needs {size.numel() * itemsize} bytes, only {view.numel() * itemsize} from offset {offset}")
        return view[: size.numel()].view(size)

    # ------------------------------------------------------------------------ rank masking
    def update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (`mask=True`) or unmask a rank for this rank's high-throughput calls (tritonep extension).

        Local, enqueued on the current stream, no host synchronisation. A masked rank is left out of
        high-throughput traffic on this rank: `get_dispatch_layout` treats its experts as not selected
        (its `num_tokens_per_rank` entry, its experts' counts and its `is_token_in_rank` column read
        zero: the dropped tokens show in the returned counts), dispatch sends it nothing and does not
        wait for it, combine neither sends to it nor waits for or adds its rows. Masks must be
        symmetric (if rank a masks b, b masks a) and every rank keeps making the same collective
        calls; a rank that masked every peer only moves its own tokens. Low-latency masks
        (`low_latency_update_mask_buffer`) are separate.
        """
        op = "update_mask_buffer"
        self._check_usable(op)
        check_int(op, "rank_to_mask", rank_to_mask)
        if not 0 <= rank_to_mask < self.group_size:
            fail(op, f"rank_to_mask must be in [0, {self.group_size}), got {rank_to_mask}")
        if mask and rank_to_mask == self.rank:
            fail(op, f"a rank cannot mask itself, got rank_to_mask={rank_to_mask} on rank {self.rank}")
        self._rank_mask[rank_to_mask] = int(bool(mask))

    def query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy this rank's high-throughput mask (1 = masked) into `mask_status`, int32 with R elements."""
        op = "query_mask_buffer"
        self._check_usable(op)
        check_tensor(op, "mask_status", mask_status, device=self._device, dtypes=(torch.int32,))
        if mask_status.numel() != self.group_size:
            fail(op, f"mask_status must have {self.group_size} elements, got {mask_status.numel()}")
        mask_status.copy_(self._rank_mask.view(mask_status.shape))

    def clean_mask_buffer(self) -> None:
        """Unmask every rank for this rank's high-throughput calls."""
        self._check_usable("clean_mask_buffer")
        self._rank_mask.zero_()

    # ------------------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Token counts per rank / node / expert and the `is_token_in_rank` mask (local, no communication).

        Arguments:
            topk_idx: `[N, K]` int64 (or int32), the experts each token selects; negative = none.
            num_experts: total experts E, divisible by the rank count.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of spec §14.5.

        Returns:
            num_tokens_per_rank: int32 `[R]`; num_tokens_per_rdma_rank: int32 `[R // nvl domain]`
            when more than one node, else None; num_tokens_per_expert: int32 `[E]`;
            is_token_in_rank: bool `[N, R]`; event: `EventOverlap`.
        """
        op = "get_dispatch_layout"
        self._check_usable(op)
        check_tensor(op, "topk_idx", topk_idx, device=self._device, dtypes=(torch.int64, torch.int32), dim=2)
        check_int(op, "num_experts", num_experts, minimum=1)
        if num_experts % self.group_size != 0:
            fail(op, f"num_experts must be divisible by the rank count {self.group_size}, got {num_experts}")
        streams = _CallStreams(self, op, previous_event, async_finish, allocate_on_comm_stream)
        slots = self._kernels.layout.scratch_slots(num_experts, self.group_size, self.num_rdma_ranks)
        if self._layout_scratch.numel() < slots:
            # Zeroed once on the comm stream; the kernel leaves it zero after every call.
            with streams.launch():
                self._layout_scratch = torch.zeros(slots, dtype=torch.int32, device=self._device)
        with streams.allocation():
            outputs = self._kernels.layout.launch_route_stats(
                topk_idx,
                num_experts,
                self.group_size,
                self.num_nvl_ranks,
                self._layout_scratch,
                self.num_rdma_ranks > 1,
                self._rank_mask,
                self._ctx.host_addr,
                stream=self._comm_stream,
            )
        event = streams.finish([topk_idx, *outputs])
        return (*outputs, event)

    # ---------------------------------------------------------------------------- dispatch
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
            x: `[N, H]` rows (any dtype, row bytes a multiple of 16), or `(x_fp8 [N, H], scales [N, S])`
                with float32 or packed-UE8M0 int32 scales of any strides.
            handle: a handle from an earlier non-cached dispatch: reuse its layout (cached mode, no host
                synchronisation, CUDA-graph capturable); the count/top-k arguments must then be omitted.
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: outputs of `get_dispatch_layout`
                (non-cached mode). `num_tokens_per_rdma_rank` is ignored for one node.
            topk_idx / topk_weights: optional `[N, K]` routing (int64/int32 and float32), forwarded with
                ids rebased to the receiver's local experts (-1 elsewhere, weight 0).
            expert_alignment: rounds up each entry of the returned per-expert list.
            num_worst_tokens: if > 0, outputs get exactly this many rows and the host never blocks
                (padding rows carry top-k -1 and weight 0).
            config: `Config`; None means `get_dispatch_config(R)`.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of spec §14.5.

        Returns:
            (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event);
            cached mode returns (recv_x, None, None, None, None, event). Rows are ordered by source rank,
            then source token. Non-cached mode without `num_worst_tokens` blocks the host until the
            received counts are known.
        """
        op = "dispatch"
        self._check_usable(op)
        if self.group_size > 8:
            return self.internode_dispatch(
                x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                config, previous_event, async_finish, allocate_on_comm_stream,
            )
        config = self._resolve_config(op, config, Buffer.get_dispatch_config)
        num_channels = config.num_sms // 2
        x_data, x_scales = self._check_dispatch_x(op, x)
        num_tokens = x_data.size(0)
        num_ranks = self.group_size
        check_int(op, "num_worst_tokens", num_worst_tokens, minimum=0)
        cached = handle is not None
        run_op = "dispatch (cached)" if cached else op  # names the call in runtime errors
        if cached:
            handle = self._check_intranode_handle(op, handle, num_channels)
            if topk_idx is not None or topk_weights is not None:
                fail(op, "topk_idx and topk_weights must be None for a cached dispatch (handle given)")
            if handle.is_token_in_rank.size(0) != num_tokens:
                fail(op, f"x must have the handle's {handle.is_token_in_rank.size(0)} tokens, got {num_tokens}")
            is_token_in_rank = handle.is_token_in_rank
            num_experts = num_ranks
        else:
            check_int(op, "expert_alignment", expert_alignment, minimum=1)
            for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                ("num_tokens_per_expert", num_tokens_per_expert)):
                if value is None:
                    fail(op, f"{name} is required for a non-cached dispatch (no handle given), got None")
            check_tensor(op, "num_tokens_per_rank", num_tokens_per_rank, device=self._device, dtypes=(torch.int32,), shape=(num_ranks,))
            check_tensor(op, "is_token_in_rank", is_token_in_rank, device=self._device, dtypes=(torch.bool,), shape=(num_tokens, num_ranks))
            check_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, device=self._device, dtypes=(torch.int32,), dim=1)
            num_experts = num_tokens_per_expert.size(0)
            if num_experts == 0 or num_experts % num_ranks != 0:
                fail(op, f"num_tokens_per_expert must have a positive multiple of {num_ranks} entries, got {num_experts}")
            if num_experts // num_ranks > protocol.MAX_LOCAL_EXPERTS:
                fail(
                    op,
                    f"num_tokens_per_expert must have at most {protocol.MAX_LOCAL_EXPERTS} x {num_ranks} entries "
                    f"({protocol.MAX_LOCAL_EXPERTS} experts per rank), got {num_experts} ({num_experts // num_ranks} per rank)",
                )
            if (topk_idx is None) != (topk_weights is None):
                fail(op, "topk_idx and topk_weights must be given together")
            if topk_idx is not None:
                check_tensor(op, "topk_idx", topk_idx, device=self._device, dtypes=(torch.int64, torch.int32), dim=2)
                if topk_idx.size(0) != num_tokens or not 0 < topk_idx.size(1) <= MAX_TOPK:
                    fail(op, f"topk_idx must have shape [{num_tokens}, K] with 1 <= K <= {MAX_TOPK}, got {tuple(topk_idx.shape)}")
                check_tensor(op, "topk_weights", topk_weights, device=self._device, dtypes=(torch.float32,), shape=tuple(topk_idx.shape))

        experts_per_rank = num_experts // num_ranks
        row_bytes = x_data.size(1) * x_data.element_size()
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        num_scales = x_scales.size(1) if x_scales is not None else 0
        topk_itemsize = topk_idx.element_size() if topk_idx is not None else 8
        layout = self._queue_layout(
            op, config, row_bytes, True, num_topk, num_topk, num_scales, topk_itemsize,
            config.num_max_nvl_chunked_send_tokens,
        )
        refuse = self._cpu_refusal(is_token_in_rank, num_channels, layout.capacity)
        key = _layout_key("dispatch", cached, row_bytes, num_topk, num_scales, topk_itemsize,
                          num_channels, layout.capacity, config.num_max_nvl_chunked_send_tokens, num_worst_tokens > 0)

        streams = _CallStreams(self, op, previous_event, async_finish, allocate_on_comm_stream)
        device = self._device
        with streams.allocation():
            if cached:
                rank_prefix_matrix = handle.rank_prefix_matrix
                channel_prefix_matrix = handle.channel_prefix_matrix
                recv_channel_prefix_matrix = handle.recv_channel_prefix_matrix
                send_head = handle.send_head
                num_recv = handle.recv_src_idx.size(0)
            else:
                rank_prefix_matrix = torch.empty((num_ranks, num_ranks), dtype=torch.int32, device=device)
                channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
                recv_channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
                send_head = torch.empty((num_tokens, num_ranks), dtype=torch.int32, device=device)
        counts = None
        if num_worst_tokens and not cached:
            self._last_num_worst = num_worst_tokens
        if not cached:
            counts = dict(
                num_tokens=num_tokens,
                num_worst_tokens=num_worst_tokens,
                experts_per_rank=experts_per_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                is_token_in_rank=is_token_in_rank,
                rank_prefix_matrix=rank_prefix_matrix,
                channel_prefix_matrix=channel_prefix_matrix,
                recv_channel_prefix_matrix=recv_channel_prefix_matrix,
            )
            self._ready_token += 1
            self._host[protocol.HOST_READY] = 0
        self._notify(key, num_channels, counts=counts, refuse=refuse, capacity=layout.capacity,
                     ready_token=self._ready_token)
        self._after_launch(run_op, include_overflow=False)  # the data kernel still has to run
        recv_counts_list = None
        if not cached:
            if num_worst_tokens > 0:
                num_recv = num_worst_tokens
                recv_counts_list = []
            else:
                num_recv, per_expert = self._wait_counts(run_op, experts_per_rank)
                recv_counts_list = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in per_expert]
        with streams.allocation():
            recv_x = torch.empty((num_recv, x_data.size(1)), dtype=x_data.dtype, device=device)
            recv_scales = (
                torch.empty((num_recv, num_scales), dtype=x_scales.dtype, device=device) if x_scales is not None else None
            )
            # A cached dispatch rewrites no handle entry (it reuses the handle's).
            recv_src_idx = None if cached else torch.empty(num_recv, dtype=torch.int32, device=device)
            recv_topk_idx = torch.empty((num_recv, num_topk), dtype=topk_idx.dtype, device=device) if num_topk else None
            recv_topk_weights = torch.empty((num_recv, num_topk), dtype=torch.float32, device=device) if num_topk else None
        tuning = self._tuning()
        self._kernels.dispatch.launch_dispatch(
            self._ctx,
            layout,
            x=x_data.view(torch.int32),
            scales=x_scales.view(torch.int32) if x_scales is not None else None,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            is_token_in_rank=is_token_in_rank,
            rank_prefix_matrix=rank_prefix_matrix,
            recv_channel_prefix_matrix=recv_channel_prefix_matrix,
            send_head=None if cached else send_head,
            rank_mask=self._rank_mask,
            recv_x=recv_x.view(torch.int32),
            recv_src_idx=recv_src_idx,
            recv_topk_idx=recv_topk_idx,
            recv_topk_weights=recv_topk_weights,
            recv_scales=recv_scales.view(torch.int32) if recv_scales is not None else None,
            num_channels=num_channels,
            chunk=config.num_max_nvl_chunked_send_tokens,
            experts_per_rank=experts_per_rank,
            worst=num_worst_tokens > 0 and not cached,
            num_warps=tuning["dispatch_warps"],
            tile_words=tuning["dispatch_tile_words"],
            prefetch=tuning["prefetch"],
        )
        self._after_launch(run_op)
        received = (recv_x, recv_scales) if x_scales is not None else recv_x
        tensors = [x_data, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                   num_tokens_per_expert, recv_x, recv_scales, recv_src_idx, recv_topk_idx, recv_topk_weights,
                   rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, send_head]
        event = streams.finish(tensors)
        if cached:
            return received, None, None, None, None, event
        new_handle = IntranodeHandle(
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head
        )
        return received, recv_topk_idx, recv_topk_weights, recv_counts_list, new_handle, event

    # ----------------------------------------------------------------------------- combine
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
            x: `[X, H]` bfloat16 (float16 and float32 also accepted) where X is the handle's row count;
                row i answers row i of the dispatch output.
            handle: the handle of the matching non-cached dispatch.
            topk_weights: optional float32 `[X, K]`, summed alongside (no bias).
            bias: None, a tensor or a pair of tensors `[N, H]` with x's dtype, added once per token.
            config: `Config` with the handle's `num_sms`; None means `get_combine_config(R)`.
            previous_event, async_finish, allocate_on_comm_stream: stream rules of spec §14.5.

        Returns:
            (combined_x `[N, H]`, combined_topk_weights `[N, K]` or None, event). The sum is accumulated
            in fp32 (bias first, then ranks in ascending order) and rounded once. No host
            synchronisation; CUDA-graph capturable.
        """
        op = "combine"
        self._check_usable(op)
        if self.group_size > 8:
            return self.internode_combine(x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream)
        config = self._resolve_config(op, config, Buffer.get_combine_config)
        num_channels = config.num_sms // 2
        handle = self._check_intranode_handle(op, handle, num_channels)
        num_rows = handle.recv_src_idx.size(0)
        num_tokens = handle.is_token_in_rank.size(0)
        check_tensor(op, "x", x, device=self._device, dtypes=(torch.bfloat16, torch.float16, torch.float32), dim=2)
        if x.size(0) != num_rows:
            fail(op, f"x must have the handle's {num_rows} rows, got {x.size(0)}")
        check_rows_aligned(op, "x", x)
        hidden = x.size(1)
        if topk_weights is not None:
            check_tensor(op, "topk_weights", topk_weights, device=self._device, dtypes=(torch.float32,), dim=2)
            if topk_weights.size(0) != num_rows or not 0 < topk_weights.size(1) <= MAX_TOPK:
                fail(op, f"topk_weights must have shape [{num_rows}, K] with 1 <= K <= {MAX_TOPK}, got {tuple(topk_weights.shape)}")
        biases = self._check_bias(op, bias, num_tokens, hidden, x.dtype)
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        row_bytes = hidden * x.element_size()
        tuning = self._tuning()
        # Receiver tile: a power of two covering the send chunk, within the queue capacity (a tile
        # larger than a queue could never be satisfied).
        tile = min(
            1 << (config.num_max_nvl_chunked_send_tokens - 1).bit_length(),
            1 << (config.num_max_nvl_chunked_recv_tokens.bit_length() - 1),
            tuning["combine_tile"],
        )
        layout = self._queue_layout(op, config, row_bytes, False, 0, num_topk, 0, 8, tile)
        refuse = self._cpu_refusal(handle.is_token_in_rank, num_channels, layout.capacity)
        key = _layout_key("combine", row_bytes, str(x.dtype), num_topk, num_channels, layout.capacity, tile,
                          config.num_max_nvl_chunked_send_tokens)
        streams = _CallStreams(self, op, previous_event, async_finish, allocate_on_comm_stream)
        with streams.allocation():
            combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self._device)
            combined_weights = (
                torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self._device) if num_topk else None
            )
        self._notify(key, num_channels, refuse=refuse, capacity=layout.capacity)
        self._after_launch(op)
        self._kernels.combine.launch_combine(
            self._ctx,
            layout,
            x=x,
            topk_weights=topk_weights,
            bias0=biases[0],
            bias1=biases[1],
            rank_prefix_matrix=handle.rank_prefix_matrix,
            recv_channel_prefix_matrix=handle.recv_channel_prefix_matrix,
            send_head=handle.send_head,
            out=combined_x,
            out_weights=combined_weights,
            rank_mask=self._rank_mask,
            num_channels=num_channels,
            chunk=config.num_max_nvl_chunked_send_tokens,
            tile=tile,
            num_warps=tuning["combine_warps"],
            tile_words=tuning["combine_tile_words"],
            prefetch=tuning["prefetch"],
        )
        self._after_launch(op)
        event = streams.finish([x, topk_weights, *biases, combined_x, combined_weights, *handle])
        return combined_x, combined_weights, event

    # --------------------------------------------------------------------- not yet available
    def internode_dispatch(self, *args, **kwargs):
        """Internode dispatch (more than 8 ranks); not implemented yet."""
        self._check_usable("internode_dispatch")
        if self.group_size <= 8:
            raise EPStateError(f"internode_dispatch: only valid with more than 8 ranks, got {self.group_size} ranks")
        raise EPUnsupported("internode_dispatch: the internode mode is not implemented yet")

    def internode_combine(self, *args, **kwargs):
        """Internode combine (more than 8 ranks); not implemented yet."""
        self._check_usable("internode_combine")
        if self.group_size <= 8:
            raise EPStateError(f"internode_combine: only valid with more than 8 ranks, got {self.group_size} ranks")
        raise EPUnsupported("internode_combine: the internode mode is not implemented yet")

    def _low_latency_unavailable(self, op: str):
        self._check_usable(op)
        if not self.low_latency_mode:
            raise EPStateError(f"{op}: the buffer was created with low_latency_mode=False")
        raise EPUnsupported(f"{op}: the low-latency mode is not implemented yet")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._low_latency_unavailable("clean_low_latency_buffer")

    def low_latency_dispatch(self, *args, **kwargs):
        self._low_latency_unavailable("low_latency_dispatch")

    def low_latency_combine(self, *args, **kwargs):
        self._low_latency_unavailable("low_latency_combine")

    def get_next_low_latency_combine_buffer(self, handle):
        self._low_latency_unavailable("get_next_low_latency_combine_buffer")

    def _mask_unavailable(self, op: str):
        self._check_usable(op)
        if not self.enable_shrink:
            raise EPStateError(f"{op}: the buffer was created with enable_shrink=False")
        raise EPUnsupported(f"{op}: the low-latency mode is not implemented yet")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._mask_unavailable("low_latency_update_mask_buffer")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        self._mask_unavailable("low_latency_query_mask_buffer")

    def low_latency_clean_mask_buffer(self) -> None:
        self._mask_unavailable("low_latency_clean_mask_buffer")

    # ------------------------------------------------------------------------- internals
    def _tuning(self) -> dict:
        """Program shapes (`program_shapes`): the interpreter wants few, small blocks; GPUs want bytes in flight.

        `tile_words` is the register tile of one copy step (4-byte words per program). Benchmarks
        may override entries through `_tuning_override`.
        """
        tuning = self._base_tuning
        return {**tuning, **self._tuning_override} if self._tuning_override else tuning

    def _resolve_config(self, op: str, config: Config | None, default: Callable[[int], Config]) -> Config:
        if config is None:
            config = default(self.group_size)
        if not isinstance(config, Config):
            fail(op, f"config must be a tritonep Config, got {type(config).__name__}")
        if config.num_sms < 2 or config.num_sms % 2 != 0:
            fail(op, f"config.num_sms must be even and >= 2, got {config.num_sms}")
        if config.num_sms // 2 > protocol.MAX_CHANNELS:
            fail(op, f"config.num_sms must be <= {2 * protocol.MAX_CHANNELS}, got {config.num_sms}")
        if self._resources.peer_memory is None:
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
            check_tensor(op, "x[1]", x_scales, device=self._device, dtypes=(torch.float32, torch.int32), dim=2, contiguous=False)
            if x_scales.size(0) != x_data.size(0):
                fail(op, f"x[1] (scales) must have {x_data.size(0)} rows, got {x_scales.size(0)}")
            check_rows_aligned(op, "x[0]", x_data)
            return x_data, x_scales
        check_tensor(op, "x", x, device=self._device, dim=2, contiguous=False)
        check_rows_aligned(op, "x", x)
        return x, None

    def _check_intranode_handle(self, op: str, handle, num_channels: int) -> IntranodeHandle:
        # Loops reuse one handle for many cached dispatches and combines: remember the last few
        # validated ones (tuples are immutable and their tensors' metadata cannot change).
        key = (id(handle), num_channels)
        hit = self._validated_handles.get(key)
        if hit is not None and hit[0] is handle:
            self._validated_handles.move_to_end(key)
            return hit[1]
        checked = self._validate_intranode_handle(op, handle, num_channels)
        if isinstance(handle, tuple):
            self._validated_handles[key] = (handle, checked)
            if len(self._validated_handles) > 8:
                self._validated_handles.popitem(last=False)
        return checked

    def _validate_intranode_handle(self, op: str, handle, num_channels: int) -> IntranodeHandle:
        if not isinstance(handle, (tuple, list)) or len(handle) != 6:
            kind = f"a {type(handle).__name__} of {len(handle)}" if isinstance(handle, (tuple, list)) else type(handle).__name__
            fail(op, f"handle must be the 6-tuple of an intranode dispatch, got {kind}")
        handle = IntranodeHandle(*handle)
        num_ranks = self.group_size
        check_tensor(op, "handle[0] (rank_prefix_matrix)", handle.rank_prefix_matrix, device=self._device, dtypes=(torch.int32,), shape=(num_ranks, num_ranks))
        check_tensor(op, "handle[1] (channel_prefix_matrix)", handle.channel_prefix_matrix, device=self._device, dtypes=(torch.int32,), shape=(num_ranks, None))
        handle_channels = handle.channel_prefix_matrix.size(1)
        if handle_channels != num_channels:
            fail(op, f"config has {num_channels} channels (num_sms={2 * num_channels}) but the handle was made with {handle_channels} (num_sms={2 * handle_channels})")
        check_tensor(op, "handle[2] (recv_channel_prefix_matrix)", handle.recv_channel_prefix_matrix, device=self._device, dtypes=(torch.int32,), shape=(num_ranks, num_channels))
        check_tensor(op, "handle[3] (recv_src_idx)", handle.recv_src_idx, device=self._device, dtypes=(torch.int32,), dim=1)
        check_tensor(op, "handle[4] (is_token_in_rank)", handle.is_token_in_rank, device=self._device, dtypes=(torch.bool,), shape=(None, num_ranks))
        check_tensor(op, "handle[5] (send_head)", handle.send_head, device=self._device, dtypes=(torch.int32,), shape=(handle.is_token_in_rank.size(0), num_ranks))
        return handle

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
                check_tensor(op, f"bias[{i}]", b, device=self._device, dtypes=(dtype,), shape=(num_tokens, hidden))
        return biases

    def _queue_layout(self, op, config, row_bytes, has_src_idx, num_topk_idx, num_topk_weights, num_scales,
                      topk_itemsize, min_capacity) -> protocol.QueueLayout:
        layout = _fit_queues(
            self.num_nvl_bytes,
            config.num_sms // 2,
            self.group_size,
            config.num_max_nvl_chunked_recv_tokens,
            row_bytes,
            has_src_idx,
            num_topk_idx,
            num_topk_weights,
            num_scales,
            topk_itemsize,
        )
        if layout.capacity < min_capacity:
            slot = protocol.QueueLayout.slot_bytes(row_bytes, has_src_idx, num_topk_idx, num_topk_weights, num_scales, topk_itemsize)
            needed = (config.num_sms // 2) * self.group_size * min_capacity * slot + 5 * protocol.ALIGN
            fail(
                op,
                f"num_nvl_bytes={self.num_nvl_bytes} is too small for this call: {config.num_sms // 2} channels x "
                f"{self.group_size} ranks x {min_capacity} slots of {slot} bytes need at least {needed} bytes",
            )
        return layout

    def _cpu_refusal(self, is_token_in_rank: torch.Tensor, num_channels: int, capacity: int) -> int:
        """CPU backend: rows one of this rank's queues would need if that exceeds `capacity`, else 0.

        The interpreter runs a launch's programs one after another, so senders cannot wait for
        receivers of the same launch: every (channel, peer) queue must hold a whole channel. Each
        rank checks the queues its own tokens use (dispatch sends, combine returns) and announces a
        refusal in its notify message, so every rank fails the call together, without a host
        collective that a stalled peer could hang.
        """
        if self._backend != "cpu" or is_token_in_rank.numel() == 0:
            return 0
        num_tokens = is_token_in_rank.size(0)
        per_channel = -(-num_tokens // num_channels)
        padded = torch.zeros((num_channels * per_channel, self.group_size), dtype=torch.int32, device="cpu")
        padded[:num_tokens] = is_token_in_rank.to(torch.int32)
        demand = padded.view(num_channels, per_channel, -1).sum(1)
        demand[:, self.rank] = 0  # this rank's own rows never use a queue
        worst = int(demand.max())
        return worst if worst > capacity else 0

    def _notify(self, key: int, num_channels: int, counts=None, refuse: int = 0, capacity: int = 0,
                ready_token: int = 0) -> None:
        self._kernels.notify.launch_notify(
            self._ctx,
            layout_key=key,
            num_channels=num_channels,
            rank_mask=self._rank_mask,
            counts=counts,
            refuse=refuse,
            capacity=capacity,
            ready_token=ready_token,
        )

    def _wait_counts(self, op: str, experts_per_rank: int) -> tuple[int, list[int]]:
        """Block (GIL released between polls) until notify publishes the received counts."""
        host = self._host
        deadline = time.monotonic() + self._timeout_s
        spins = 0
        while host[protocol.HOST_READY] != self._ready_token:
            if host[protocol.HOST_ERROR + 7] != 0:
                self._raise_device_error(op)
            spins += 1
            if spins > 1000:
                time.sleep(20e-6)
                if time.monotonic() > deadline:
                    self._poison = f"rank {self.rank}: host wait for the received counts timed out"
                    raise EPTimeoutError(
                        f"{op}: rank {self.rank} timed out after {self._timeout_s:g} s waiting for the notify "
                        "kernel to publish the received token counts (some rank has not joined this dispatch)"
                    )
        self._raise_device_error(op)
        num_recv = int(host[protocol.HOST_NUM_RECV])
        first = protocol.HOST_EXPERT_COUNTS
        per_expert = [int(v) for v in host[first : first + experts_per_rank]]
        return num_recv, per_expert

    def _after_launch(self, op: str, include_overflow: bool = True) -> None:
        # The CPU backend has finished by now, so a device report belongs to this call.
        if self._backend == "cpu":
            self._raise_device_error(op, include_overflow)

