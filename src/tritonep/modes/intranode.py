"""Intranode high-throughput mode: dispatch and combine among the ranks of one NVLink domain.

A non-cached dispatch is a counting `notify` launch plus one data launch; a cached dispatch and a
combine are one data launch that opens its call itself (`kernels/intranode/notify.py`,
`dispatch.py`, `combine.py`), on the stream `runtime/streams.py` picks. The
arguments reaching this module are already checked by the Buffer.

The host path is built for loops that repeat one geometry (every layer of a training step, every
decode step): everything that depends only on the geometry — queue layout, the geometry
fingerprint ranks compare, program shapes, the compiled kernels and their fixed arguments — lives
in a launch plan built on first use and cached per geometry. A cached dispatch or a combine then
costs a plan lookup, one or two output allocations and one direct launch.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from dataclasses import dataclass

import torch

from .. import _env, protocol
from .._validate import fail
from ..config import Config
from ..handles import IntranodeHandle
from ..kernels.intranode.queues import IntranodeQueues
from ..runtime.host import HostBlock
from ..runtime.streams import CommStreams
from .contract import CombineKey, DispatchKey


@dataclass(frozen=True)
class ProgramShape:
    """Warps, register tiles and prefetching of the intranode data kernels.

    `dispatch_warps`: a dispatch whose rows carry per-row fields (top-k, FP8 scales, the source
    index a non-cached dispatch records); `dispatch_rows_only_warps`: one that moves bare rows (a
    cached dispatch of unscaled rows). `*_tile_words`: 4-byte words of one copy step's register
    tile per program; `combine_tile`: tokens a combine receiver reduces per step; `prefetch`: issue
    the next step's loads before the current step's stores (more bytes in flight at the same
    register budget); `combine_receiver_stages`: depth of the combine receivers' load pipeline (1:
    none).
    """

    dispatch_warps: int
    dispatch_tile_words: int
    combine_warps: int
    combine_tile_words: int
    combine_tile: int = 8
    prefetch: bool = True
    combine_receiver_stages: int = 1
    dispatch_rows_only_warps: int = 8

    def warps_of_dispatch(self, rows_only: bool) -> int:
        """Warps of a dispatch launch: `rows_only` when its rows carry no per-row fields."""
        return self.dispatch_rows_only_warps if rows_only else self.dispatch_warps


# The interpreter wants few, small blocks; GPUs want bytes in flight.
_INTERPRETER_SHAPE = ProgramShape(1, 512, 1, 512, dispatch_rows_only_warps=1)
_GPU_SHAPE = ProgramShape(8, 8192, 8, 8192)
# Up to two ranks the combine kernel fits 16 warps x 64 KB tiles without spilling (128 registers),
# and more bytes in flight per program pay: 24 SMs, two ranks under MPS on one H200, 282 -> 339
# GB/s (benchmarks/results/2026-11-23-h200-mps-ep2-1dd5e47.json). With more ranks it spills.
# Reducing 16 tokens per step instead of 8: combine kernel 365 -> 348 us at 24 SMs on 2xH200
# (4 per step: 491 us; TRITONEP_PROGRAM_SHAPE sweep, 2026-11-30-h200x2-shapes-f363e47.json).
# Combine receivers pipelined 3 stages deep (Triton's cp.async pipeline, 128 KB of shared memory):
# V1's chunk 10 424 -> 444 GB/s, chunk 16 429 -> 474 on the same proxy
# (2026-12-02-h200-bench-ep2-mps-{receiver-stages1-,}5aefbb8.json); the same pipeline in the
# dispatch senders and the combine senders' spans lost (dispatch BF16 427 -> 394, FP8 312 -> 272,
# ...-stages3-c1df92e.json), so those keep the register prefetch.
# A cached BF16 dispatch in 16 warps instead of 8 (the same 32 KB tile, 128 registers, no spill):
# 450.4 -> 474.5 GB/s on that proxy (benchmarks/results/2026-12-03-h200-bench-ep2-mps-warps-*.json).
# With top-k or FP8 scales the sender's per-row field tiles spill 72-184 B at 128 registers, and
# an FP8 dispatch lost 355 -> 330 GB/s, so those keep 8 warps.
_GPU_SHAPE_TWO_RANKS = dataclasses.replace(
    _GPU_SHAPE,
    dispatch_rows_only_warps=16,
    combine_warps=16,
    combine_tile_words=16384,
    combine_tile=16,
    combine_receiver_stages=3,
)


def program_shape(backend: str, num_ranks: int) -> ProgramShape:
    """The program shape the Buffer launches for a backend and rank count (the AOT check uses it
    too)."""
    if backend == "cpu":
        return _INTERPRETER_SHAPE
    shape = _GPU_SHAPE_TWO_RANKS if num_ranks <= 2 else _GPU_SHAPE
    overrides = _env.program_shape_overrides(
        tuple(field.name for field in dataclasses.fields(ProgramShape))
    )
    return dataclasses.replace(
        shape, **{name: type(getattr(shape, name))(value) for name, value in overrides.items()}
    )


def _fingerprint(*fields) -> int:
    """A 31-bit fingerprint of a call's geometry; ranks compare it when they open the call
    (collective consistency)."""
    return zlib.crc32(repr(fields).encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class _DispatchPlans:
    notify: object  # the counting notify; None for a cached dispatch (its data launch opens it)
    data: object
    capacity: int
    experts_per_rank: int


@dataclass(frozen=True)
class _CombinePlans:
    data: object
    capacity: int


class IntranodeMode:
    """Orchestration of intranode dispatch and combine for one Buffer.

    Attributes:
        shape: the `ProgramShape` launched; benchmarks may replace it to compare shapes (plans
            built afterwards use the new one).
    """

    def __init__(
        self, kernels, ctx, host: HostBlock, streams: CommStreams, backend: str, num_nvl_bytes: int
    ):
        self._kernels = kernels
        self._ctx = ctx
        self._host = host
        self._streams = streams
        self._backend = backend
        self._num_nvl_bytes = num_nvl_bytes
        self._device = ctx.peer_bases.device
        self.shape = program_shape(backend, ctx.num_ranks)
        self._plans: dict = {}

    def set_shape(self, shape: ProgramShape) -> None:
        """Launch `shape` from now on (benchmark experiments); drops the plans built so far."""
        self.shape = shape
        self._plans.clear()

    # ------------------------------------------------------------------------------ plans
    def _queues(
        self,
        op: str,
        config: Config,
        row_bytes: int,
        has_src_idx: bool,
        num_topk_idx: int,
        num_topk_weights: int,
        num_scales: int,
        topk_itemsize: int,
        min_capacity: int,
    ):
        queues = _fit_queues(
            self._num_nvl_bytes,
            config.num_channels,
            self._ctx.num_ranks,
            config.num_max_nvl_chunked_recv_tokens,
            row_bytes,
            has_src_idx,
            num_topk_idx,
            num_topk_weights,
            num_scales,
            topk_itemsize,
        )
        if queues.capacity < min_capacity:
            slot = IntranodeQueues.slot_bytes(
                row_bytes, has_src_idx, num_topk_idx, num_topk_weights, num_scales, topk_itemsize
            )
            needed = (
                config.num_channels * self._ctx.num_ranks * min_capacity * slot + 5 * protocol.ALIGN
            )
            fail(
                op,
                f"num_nvl_bytes={self._num_nvl_bytes} is too small for this call: "
                f"{config.num_channels} channels x {self._ctx.num_ranks} ranks x {min_capacity} "
                f"slots of {slot} bytes need at least {needed} bytes",
            )
        return queues

    def _dispatch_plans(self, op: str, key: DispatchKey) -> _DispatchPlans:
        plans = self._plans.get(key)
        if plans is not None:
            return plans
        (
            _,
            cached,
            config,
            row_bytes,
            num_topk,
            topk_itemsize,
            num_scales,
            experts_per_rank,
            worst,
        ) = key
        queues = self._queues(
            op,
            config,
            row_bytes,
            True,
            num_topk,
            num_topk,
            num_scales,
            topk_itemsize,
            config.num_max_nvl_chunked_send_tokens,
        )
        chunk = config.num_max_nvl_chunked_send_tokens
        fingerprint = _fingerprint(
            "dispatch",
            cached,
            row_bytes,
            num_topk,
            num_scales,
            topk_itemsize,
            config.num_channels,
            queues.capacity,
            chunk,
            worst,
        )
        k = self._kernels.intranode
        plans = _DispatchPlans(
            notify=None
            if cached
            else k.notify.NotifyPlan(
                self._ctx, config.num_channels, experts_per_rank, fingerprint, queues.capacity
            ),
            data=k.dispatch.DispatchPlan(
                self._ctx,
                queues,
                num_channels=config.num_channels,
                chunk=chunk,
                experts_per_rank=experts_per_rank,
                row_words=row_bytes // 4,
                num_topk=num_topk,
                topk_itemsize=topk_itemsize,
                num_scales=num_scales,
                write_handle=not cached,
                worst=worst,
                num_warps=self.shape.warps_of_dispatch(
                    rows_only=cached and num_topk == 0 and num_scales == 0
                ),
                tile_words=self.shape.dispatch_tile_words,
                prefetch=self.shape.prefetch,
                layout_key=fingerprint,
            ),
            capacity=queues.capacity,
            experts_per_rank=experts_per_rank,
        )
        self._plans[key] = plans
        return plans

    def _combine_plans(self, op: str, key: CombineKey) -> _CombinePlans:
        plans = self._plans.get(key)
        if plans is not None:
            return plans
        _, config, hidden, dtype, num_topk, has_bias = key
        row_bytes = hidden * dtype.itemsize
        # Receiver tile: a power of two covering the send chunk, within the queue capacity (a tile
        # larger than a queue could never be satisfied).
        chunk = config.num_max_nvl_chunked_send_tokens
        tile = min(
            1 << (chunk - 1).bit_length(),
            1 << (config.num_max_nvl_chunked_recv_tokens.bit_length() - 1),
            self.shape.combine_tile,
        )
        queues = self._queues(op, config, row_bytes, False, 0, num_topk, 0, 8, tile)
        fingerprint = _fingerprint(
            "combine",
            row_bytes,
            str(dtype),
            num_topk,
            config.num_channels,
            queues.capacity,
            tile,
            chunk,
        )
        k = self._kernels.intranode
        plans = _CombinePlans(
            data=k.combine.CombinePlan(
                self._ctx,
                queues,
                num_channels=config.num_channels,
                chunk=chunk,
                tile=tile,
                hidden=hidden,
                dtype=dtype,
                num_topk=num_topk,
                has_bias=has_bias,
                num_warps=self.shape.combine_warps,
                tile_words=self.shape.combine_tile_words,
                prefetch=self.shape.prefetch,
                receiver_stages=self.shape.combine_receiver_stages,
                layout_key=fingerprint,
            ),
            capacity=queues.capacity,
        )
        self._plans[key] = plans
        return plans

    def _refusal(self, is_token_in_rank: torch.Tensor, num_channels: int, capacity: int) -> int:
        """CPU backend: rows one of this rank's queues would need if that exceeds `capacity`, else
        0.

        The interpreter runs a launch's programs one after another, so senders cannot wait for
        receivers of the same launch: every (channel, peer) queue must hold a whole channel. Each
        rank checks the queues its own tokens use (dispatch sends, combine returns) and announces a
        refusal in its notify message, so every rank fails the call together, without a host
        collective that a stalled peer could hang.
        """
        if self._backend != "cpu" or is_token_in_rank.numel() == 0:
            return 0
        num_tokens, num_ranks = is_token_in_rank.shape
        per_channel = -(-num_tokens // num_channels)
        padded = torch.zeros(
            (num_channels * per_channel, num_ranks), dtype=torch.int32, device="cpu"
        )
        padded[:num_tokens] = is_token_in_rank.to(torch.int32)
        demand = padded.view(num_channels, per_channel, -1).sum(1)
        demand[:, self._ctx.rank] = 0  # this rank's own rows never use a queue
        worst = int(demand.max())
        return worst if worst > capacity else 0

    # ---------------------------------------------------------------------------- dispatch
    def dispatch(
        self,
        op: str,
        key: DispatchKey,
        x_data: torch.Tensor,
        x_scales: torch.Tensor | None,
        handle: IntranodeHandle | None,
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
        """Dispatch checked arguments (`handle` given: cached mode); returns the V1 6-tuple."""
        config, cached = key.config, key.cached
        run_op = "dispatch (cached)" if cached else op  # names the call in runtime errors
        num_ranks = self._ctx.num_ranks
        num_channels = config.num_channels
        num_tokens = x_data.size(0)
        num_topk, num_scales, experts_per_rank, worst = (
            key.num_topk,
            key.num_scales,
            key.experts_per_rank,
            key.worst,
        )
        plans = self._dispatch_plans(op, key)
        refuse = self._refusal(is_token_in_rank, num_channels, plans.capacity)
        streams = self._streams.begin(op, previous_event, async_finish, allocate_on_comm_stream)
        device = self._device
        recv_counts_list = None
        if cached:
            num_recv = handle.recv_src_idx.size(0)
            rank_prefix_matrix, channel_prefix_matrix = (
                handle.rank_prefix_matrix,
                handle.channel_prefix_matrix,
            )
            recv_channel_prefix_matrix, send_head = (
                handle.recv_channel_prefix_matrix,
                handle.send_head,
            )
        else:
            with streams.allocation():
                rank_prefix_matrix = torch.empty(
                    (num_ranks, num_ranks), dtype=torch.int32, device=device
                )
                channel_prefix_matrix = torch.empty(
                    (num_ranks, num_channels), dtype=torch.int32, device=device
                )
                recv_channel_prefix_matrix = torch.empty(
                    (num_ranks, num_channels), dtype=torch.int32, device=device
                )
                send_head = torch.empty((num_tokens, num_ranks), dtype=torch.int32, device=device)
            counts = self._kernels.intranode.notify.NotifyCounts(
                num_tokens,
                num_worst_tokens,
                num_tokens_per_expert,
                is_token_in_rank,
                rank_prefix_matrix,
                channel_prefix_matrix,
                recv_channel_prefix_matrix,
            )
            if worst:
                self._host.num_worst_tokens = num_worst_tokens
            plans.notify.launch(streams.launch, refuse, self._host.arm_counts(), counts)
            # The data kernel still has to run: no overflow to report yet.
            self._host.after_launch(run_op, include_overflow=False)
            if worst:
                num_recv, recv_counts_list = num_worst_tokens, []
            else:
                num_recv, per_expert = self._host.wait_counts(run_op, experts_per_rank)
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
            # A cached dispatch rewrites no handle entry (it reuses the handle's).
            recv_src_idx = (
                None if cached else torch.empty(num_recv, dtype=torch.int32, device=device)
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
        plans.data.launch(
            streams.launch,
            x_data,
            x_scales.view(torch.int32) if x_scales is not None else None,
            topk_idx,
            topk_weights,
            is_token_in_rank,
            rank_prefix_matrix,
            recv_channel_prefix_matrix,
            None if cached else send_head,
            recv_x,
            recv_src_idx,
            recv_topk_idx,
            recv_topk_weights,
            recv_scales.view(torch.int32) if recv_scales is not None else None,
            refuse,
        )
        self._host.after_launch(run_op)
        received = (recv_x, recv_scales) if x_scales is not None else recv_x
        if cached:
            event = streams.finish(
                (x_data, x_scales, is_token_in_rank, recv_x, recv_scales, *handle)
                if async_finish
                else ()
            )
            return received, None, None, None, None, event
        event = streams.finish(
            (
                x_data,
                x_scales,
                topk_idx,
                topk_weights,
                is_token_in_rank,
                num_tokens_per_expert,
                recv_x,
                recv_scales,
                recv_src_idx,
                recv_topk_idx,
                recv_topk_weights,
                rank_prefix_matrix,
                channel_prefix_matrix,
                recv_channel_prefix_matrix,
                send_head,
            )
            if async_finish
            else ()
        )
        new_handle = IntranodeHandle(
            rank_prefix_matrix,
            channel_prefix_matrix,
            recv_channel_prefix_matrix,
            recv_src_idx,
            is_token_in_rank,
            send_head,
        )
        return received, recv_topk_idx, recv_topk_weights, recv_counts_list, new_handle, event

    # ----------------------------------------------------------------------------- combine
    def combine(
        self,
        op: str,
        key: CombineKey,
        x: torch.Tensor,
        handle: IntranodeHandle,
        topk_weights: torch.Tensor | None,
        biases: tuple,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        """Combine checked arguments; returns (combined_x, combined_topk_weights, event)."""
        config = key.config
        num_tokens, hidden = handle.is_token_in_rank.size(0), x.size(1)
        num_topk = key.num_topk
        plans = self._combine_plans(op, key)
        refuse = self._refusal(handle.is_token_in_rank, config.num_channels, plans.capacity)
        streams = self._streams.begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with streams.allocation():
            combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self._device)
            combined_weights = (
                torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self._device)
                if num_topk
                else None
            )
        plans.data.launch(
            streams.launch,
            x,
            topk_weights,
            biases[0],
            biases[1],
            handle.rank_prefix_matrix,
            handle.recv_channel_prefix_matrix,
            handle.send_head,
            combined_x,
            combined_weights,
            refuse,
        )
        self._host.after_launch(op)
        event = streams.finish(
            (x, topk_weights, *biases, combined_x, combined_weights, *handle)
            if async_finish
            else ()
        )
        return combined_x, combined_weights, event


# The queue layout of a geometry never changes; computing it is pure.
_fit_queues = functools.lru_cache(maxsize=1024)(IntranodeQueues.fit)
