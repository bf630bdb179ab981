"""Internode high-throughput mode: dispatch and combine across nodes (NVLink inside a node, the
device layer's puts between nodes), orchestration.

Every collective call is one `notify` launch plus one data launch (`kernels/internode/`) on the
stream `runtime/streams.py` picks; arguments arrive checked by the Buffer. As in the intranode mode,
everything that depends only on the geometry (call layout, fingerprint, compiled kernels and fixed
arguments) lives in launch plans cached per geometry.

Memory: the internode structures live in the user's two byte budgets: a fixed signal area at the
top of the RDMA memory and at the start of the NVL data region (zeroed here, at Buffer
construction, before the Buffer's closing barrier), then per-call notify messages and rings
(`kernels/internode/regions.py`). Ring capacities are the config's
`num_max_*_chunked_recv_tokens`, reduced until the rings fit; a call whose rings cannot hold one
slot each is refused with the sizes needed.

Host-visible counts: the notify kernel packs `X_rdma << 32 | M` into the host block's received-row
slot (M rows this rank receives, X_rdma tokens it forwards: the row count of `send_nvl_head`).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from .._validate import fail
from ..config import Config
from ..errors import EPStateError
from ..handles import InternodeHandle
from ..runtime.host import HostBlock
from ..runtime.streams import CommStreams
from ..runtime.topology import Topology
from .contract import CombineKey, DispatchKey


@dataclass(frozen=True)
class ProgramShape:
    """Programs of the internode data kernels: warps, register tile (4-byte words per program per
    copy step), prefetching, and `fused`: all roles of a channel in one program (the interpreter,
    which runs a launch's programs one after another) or two programs per channel (GPUs)."""

    warps: int
    tile_words: int
    prefetch: bool
    fused: bool


_INTERPRETER_SHAPE = ProgramShape(1, 512, False, True)
# 4096-word tiles: the sm_90 build of dispatch then spills nothing at EP16 and 24 B at EP160 (8192:
# 16-56 B at EP16); not yet measured on a GPU.
_GPU_SHAPE = ProgramShape(8, 4096, True, False)


def program_shape(backend: str) -> ProgramShape:
    """The program shape the Buffer launches on a backend (the AOT check uses it too)."""
    return _INTERPRETER_SHAPE if backend == "cpu" else _GPU_SHAPE


def _fingerprint(*fields) -> int:
    """A 31-bit fingerprint of a call's geometry; ranks compare it in notify."""
    return zlib.crc32(repr(fields).encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class _Plans:
    notify: object
    data: object
    layout: object
    experts_per_rank: int


class InternodeMode:
    """Orchestration of internode dispatch and combine for one Buffer (`ctx`: its `LaunchContext`,
    `memory`: its `BufferMemory`).

    Attributes:
        shape: the `ProgramShape` launched (benchmarks may replace it through `set_shape`).
    """

    def __init__(
        self,
        kernels,
        ctx,
        memory,
        host: HostBlock,
        streams: CommStreams,
        backend: str,
        topology: Topology,
    ):
        self._kernels = kernels
        self._ctx = ctx
        self._memory = memory
        self._host = host
        self._streams = streams
        self._backend = backend
        self._topology = topology
        self._device = ctx.peer_bases.device
        self.shape = program_shape(backend)
        regions = kernels.internode.regions
        self._regions = regions
        # The signal area tops the whole RDMA memory, above the user's bytes (`signal_reserve`).
        self.signals = regions.SignalArea(
            topology.num_nodes, topology.ranks_per_node, memory.rdma_capacity
        )
        self._num_nvl_bytes = memory.num_nvl_bytes
        self._num_rdma_bytes = memory.num_rdma_bytes
        # Signal words must start below every epoch: the NVL data region is not zeroed otherwise
        # (the RDMA memory is). Peers signal here only after the Buffer's closing barrier.
        if self._num_nvl_bytes >= self.signals.nvl_bytes:
            memory.local_view(
                "Buffer", torch.int64, (self.signals.nvl_bytes // 8,), 0, False
            ).zero_()
        self._plans: dict = {}

    def set_shape(self, shape: ProgramShape) -> None:
        """Launch `shape` from now on (benchmark experiments); drops the plans built so far."""
        self.shape = shape
        self._plans.clear()

    # ------------------------------------------------------------------------------ plans
    def _check_memory(self, op: str) -> None:
        if self._num_rdma_bytes == 0:
            raise EPStateError(
                f"{op}: internode calls need RDMA memory (num_rdma_bytes > 0; "
                "Config.get_rdma_buffer_size_hint gives V1's size), got 0"
            )
        if self._num_nvl_bytes < self.signals.nvl_bytes:
            raise EPStateError(
                f"{op}: internode calls need NVL memory (num_nvl_bytes >= "
                f"{self.signals.nvl_bytes}), got {self._num_nvl_bytes}"
            )

    def _layout(self, op: str, config: Config, experts_per_rank: int, slot, min_rdma, min_nvl):
        regions = self._regions
        layout = regions.fit(
            self.signals,
            config.num_channels,
            experts_per_rank,
            slot,
            self._num_nvl_bytes,
            config.num_max_rdma_chunked_recv_tokens,
            config.num_max_nvl_chunked_recv_tokens,
        )
        if layout.rdma_capacity < min_rdma or layout.nvl_capacity < min_nvl:
            need = dataclasses.replace(layout, rdma_capacity=min_rdma, nvl_capacity=min_nvl)
            fail(
                op,
                f"num_rdma_bytes={self._num_rdma_bytes} / num_nvl_bytes={self._num_nvl_bytes} "
                f"are too small for this call: {config.num_channels} channels of rings of "
                f"{slot.num_bytes}-byte slots holding {min_rdma} (RDMA) / {min_nvl} (NVL) tokens "
                f"need {need.rdma_bytes - self.signals.rdma_bytes} / {need.nvl_bytes} bytes",
            )
        return layout

    def _dispatch_plans(self, op: str, key: DispatchKey) -> _Plans:
        plans = self._plans.get(key)
        if plans is not None:
            return plans
        _, cached, config, row_bytes, num_topk, topk_itemsize, num_scales, experts, worst = key
        regions = self._regions
        slot = regions.SlotLayout(
            row_bytes, num_scales, num_topk, topk_itemsize, max(3, self.signals.ranks_per_node)
        )
        layout = self._layout(op, config, 1 if cached else experts, slot, 1, 1)
        shape = self.shape
        fingerprint = _fingerprint(
            "internode dispatch",
            cached,
            row_bytes,
            num_topk,
            num_scales,
            topk_itemsize,
            config.num_channels,
            layout.rdma_capacity,
            layout.nvl_capacity,
            config.num_max_rdma_chunked_send_tokens,
            config.num_max_nvl_chunked_send_tokens,
            worst,
            shape.fused,
        )
        k = self._kernels.internode
        plans = _Plans(
            notify=k.notify.NotifyPlan(self._ctx, self._memory, layout, not cached, fingerprint),
            data=k.dispatch.DispatchPlan(
                self._ctx,
                self._memory,
                layout,
                rdma_chunk=config.num_max_rdma_chunked_send_tokens,
                nvl_chunk=config.num_max_nvl_chunked_send_tokens,
                experts_per_rank=experts,
                num_topk=num_topk,
                topk_itemsize=topk_itemsize,
                num_scales=num_scales,
                write_handle=not cached,
                worst=worst,
                fused=shape.fused,
                num_warps=shape.warps,
                tile_words=shape.tile_words,
                prefetch=shape.prefetch,
            ),
            layout=layout,
            experts_per_rank=experts,
        )
        self._plans[key] = plans
        return plans

    def _combine_plans(self, op: str, key: CombineKey) -> _Plans:
        plans = self._plans.get(key)
        if plans is not None:
            return plans
        _, config, hidden, dtype, num_topk, has_bias = key
        regions = self._regions
        slot = regions.SlotLayout(hidden * dtype.itemsize, 0, num_topk, 0, 0)
        layout = self._layout(op, config, 1, slot, 1, 1)
        shape = self.shape
        fingerprint = _fingerprint(
            "internode combine",
            hidden * dtype.itemsize,
            str(dtype),
            num_topk,
            config.num_channels,
            layout.rdma_capacity,
            layout.nvl_capacity,
            config.num_max_rdma_chunked_send_tokens,
            config.num_max_nvl_chunked_send_tokens,
            shape.fused,
        )
        k = self._kernels.internode
        plans = _Plans(
            notify=k.notify.NotifyPlan(self._ctx, self._memory, layout, False, fingerprint),
            data=k.combine.CombinePlan(
                self._ctx,
                self._memory,
                layout,
                rdma_chunk=config.num_max_rdma_chunked_send_tokens,
                nvl_chunk=config.num_max_nvl_chunked_send_tokens,
                hidden=hidden,
                dtype=dtype,
                num_topk=num_topk,
                has_bias=has_bias,
                fused=shape.fused,
                num_warps=shape.warps,
                tile_words=shape.tile_words,
                prefetch=shape.prefetch,
            ),
            layout=layout,
            experts_per_rank=1,
        )
        self._plans[key] = plans
        return plans

    # ---------------------------------------------------------------------------- dispatch
    def dispatch(
        self,
        op: str,
        key: DispatchKey,
        x_data: torch.Tensor,
        x_scales: torch.Tensor | None,
        handle: InternodeHandle | None,
        num_tokens_per_expert: torch.Tensor | None,
        is_token_in_rank: torch.Tensor,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        expert_alignment: int,
        num_worst_tokens: int,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        """Dispatch checked arguments (`handle` given: cached mode); returns the V1 6-tuple with
        the 10-tuple handle."""
        self._check_memory(op)
        config, cached = key.config, key.cached
        run_op = f"{op} (cached)" if cached else op  # names the call in runtime errors
        num_ranks = self._ctx.num_ranks
        num_nodes = self._topology.num_nodes
        d = self._topology.ranks_per_node
        num_channels = config.num_channels
        num_tokens = x_data.size(0)
        num_topk, num_scales, experts, worst = (
            key.num_topk,
            key.num_scales,
            key.experts_per_rank,
            key.worst,
        )
        plans = self._dispatch_plans(op, key)
        streams = self._streams.begin(op, previous_event, async_finish, allocate_on_comm_stream)
        device = self._device
        i32 = torch.int32
        if cached:
            h = handle
            rdma_prefix, gbl_prefix = h.rdma_channel_prefix_matrix, h.gbl_channel_prefix_matrix
            recv_rdma_prefix, recv_rdma_sum = (
                h.recv_rdma_channel_prefix_matrix,
                h.recv_rdma_rank_prefix_sum,
            )
            recv_gbl_prefix, recv_gbl_sum = (
                h.recv_gbl_channel_prefix_matrix,
                h.recv_gbl_rank_prefix_sum,
            )
            send_rdma_head = h.send_rdma_head
            plans.notify.launch(streams.launch)
            self._host.after_launch(run_op, include_overflow=False)
            num_recv, num_rdma_recv = h.recv_src_meta.size(0), h.send_nvl_head.size(0)
            recv_counts_list = None
        else:
            with streams.allocation():
                rdma_prefix = torch.empty((num_nodes, num_channels), dtype=i32, device=device)
                gbl_prefix = torch.empty((num_ranks, num_channels), dtype=i32, device=device)
                recv_rdma_prefix = torch.empty((num_nodes, num_channels), dtype=i32, device=device)
                recv_rdma_sum = torch.empty(num_nodes, dtype=i32, device=device)
                recv_gbl_prefix = torch.empty((num_ranks, num_channels), dtype=i32, device=device)
                recv_gbl_sum = torch.empty(num_ranks, dtype=i32, device=device)
                send_rdma_head = torch.empty((num_tokens, num_nodes), dtype=i32, device=device)
            counts = self._kernels.internode.notify.NotifyCounts(
                num_tokens,
                num_worst_tokens,
                num_tokens_per_expert,
                is_token_in_rank,
                rdma_prefix,
                gbl_prefix,
                recv_rdma_prefix,
                recv_rdma_sum,
                recv_gbl_prefix,
                recv_gbl_sum,
            )
            if worst:
                self._host.num_worst_tokens = num_worst_tokens
            ready_token = self._host.arm_counts()
            plans.notify.launch(streams.launch, ready_token, counts)
            # No overflow check yet: the data kernel still has to run.
            self._host.after_launch(run_op, include_overflow=False)
            if worst:
                num_recv = num_rdma_recv = num_worst_tokens
                recv_counts_list = []
            else:
                packed, per_expert = self._host.wait_counts(run_op, experts)
                num_recv, num_rdma_recv = packed & 0xFFFFFFFF, packed >> 32
                recv_counts_list = [
                    -(-c // expert_alignment) * expert_alignment for c in per_expert
                ]
        with streams.allocation():
            recv_x = torch.empty((num_recv, x_data.size(1)), dtype=x_data.dtype, device=device)
            recv_scales = (
                torch.empty((num_recv, num_scales), dtype=x_scales.dtype, device=device)
                if x_scales is not None
                else None
            )
            recv_topk_idx = (
                torch.empty((num_recv, num_topk), dtype=topk_idx.dtype, device=device)
                if num_topk
                else None
            )
            recv_topk_weights = (
                torch.empty((num_recv, num_topk), dtype=torch.float32, device=device)
                if num_topk
                else None
            )
            if cached:
                recv_src_meta = send_nvl_head = None
            else:
                recv_src_meta = torch.empty((num_recv, 8), dtype=torch.uint8, device=device)
                send_nvl_head = torch.empty((num_rdma_recv, d), dtype=i32, device=device)
        plans.data.launch(
            streams.launch,
            x_data,
            x_scales.view(torch.int32) if x_scales is not None else None,
            topk_idx,
            topk_weights,
            is_token_in_rank,
            recv_rdma_prefix,
            recv_rdma_sum,
            recv_gbl_prefix,
            recv_gbl_sum,
            None if cached else send_rdma_head,
            send_nvl_head,
            None if cached else recv_src_meta.view(torch.int32),
            recv_x,
            recv_scales.view(torch.int32) if recv_scales is not None else None,
            recv_topk_idx,
            recv_topk_weights,
        )
        self._host.after_launch(run_op)
        received = (recv_x, recv_scales) if x_scales is not None else recv_x
        if cached:
            event = streams.finish(
                (x_data, x_scales, recv_x, recv_scales, *handle) if async_finish else ()
            )
            return received, None, None, None, None, event
        new_handle = InternodeHandle(
            is_token_in_rank,
            rdma_prefix,
            gbl_prefix,
            recv_rdma_prefix,
            recv_rdma_sum,
            recv_gbl_prefix,
            recv_gbl_sum,
            recv_src_meta,
            send_rdma_head,
            send_nvl_head,
        )
        event = streams.finish(
            (
                x_data,
                x_scales,
                topk_idx,
                topk_weights,
                num_tokens_per_expert,
                recv_x,
                recv_scales,
                recv_topk_idx,
                recv_topk_weights,
                *new_handle,
            )
            if async_finish
            else ()
        )
        return received, recv_topk_idx, recv_topk_weights, recv_counts_list, new_handle, event

    # ----------------------------------------------------------------------------- combine
    def combine(
        self,
        op: str,
        key: CombineKey,
        x: torch.Tensor,
        handle: InternodeHandle,
        topk_weights: torch.Tensor | None,
        biases: tuple,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        """Combine checked arguments; returns (combined_x, combined_topk_weights, event)."""
        self._check_memory(op)
        num_tokens, hidden = handle.is_token_in_rank.size(0), x.size(1)
        num_topk = key.num_topk
        plans = self._combine_plans(op, key)
        streams = self._streams.begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with streams.allocation():
            combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self._device)
            combined_weights = (
                torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self._device)
                if num_topk
                else None
            )
        plans.notify.launch(streams.launch)
        self._host.after_launch(op)
        plans.data.launch(
            streams.launch,
            x,
            topk_weights,
            biases[0],
            biases[1],
            handle.recv_rdma_channel_prefix_matrix,
            handle.recv_rdma_rank_prefix_sum,
            handle.recv_gbl_channel_prefix_matrix,
            handle.recv_gbl_rank_prefix_sum,
            handle.send_rdma_head,
            handle.send_nvl_head,
            combined_x,
            combined_weights,
        )
        self._host.after_launch(op)
        event = streams.finish(
            (x, topk_weights, *biases, combined_x, combined_weights, *handle)
            if async_finish
            else ()
        )
        return combined_x, combined_weights, event
