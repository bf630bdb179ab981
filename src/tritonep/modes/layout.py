"""`get_dispatch_layout` for both high-throughput modes: routing statistics of this rank's tokens.

Local (no communication): one `route_stats` launch (`kernels/layout.py`) per call, planned per
geometry, into outputs from the Buffer's pools (`runtime/outputs.py`: fresh whenever the caller
still holds the previous ones). The arguments are checked once per call signature (shape and
dtype of the routing, the expert count: `runtime/calls.py`). The kernel keeps a persistent int32
accumulator that is zero between calls, zeroed once when it is first needed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._validate import check_int, check_tensor, fail
from ..runtime.calls import CheckedCalls
from ..runtime.host import HostBlock
from ..runtime.outputs import OutputPools, addressed
from ..runtime.streams import CommStreams
from ..runtime.topology import Topology


@dataclass(frozen=True, slots=True)
class _LayoutCall:
    """What the signature of a layout call (the routing's shape and dtype, the expert count)
    fixes, once checked: the launch plan, the token count and the output pool (key and
    allocator)."""

    plan: object
    num_tokens: int
    pool_key: tuple
    allocate: Callable


class RoutingLayout:
    """The layout call of one Buffer."""

    def __init__(
        self,
        kernels,
        topology: Topology,
        host: HostBlock,
        streams: CommStreams,
        rank_mask: torch.Tensor,
        device: torch.device,
        outputs: OutputPools,
    ):
        self._kernels = kernels
        self._topology = topology
        self._host = host
        self._streams = streams
        self._rank_mask = rank_mask
        self._device = device
        self._outputs = outputs
        # The kernel's persistent accumulator (grown as needed) and the rank mask, with their
        # addresses for the launches.
        self._fixed = addressed((torch.zeros(0, dtype=torch.int32, device=device), rank_mask))
        self._plans: dict = {}
        self._calls = CheckedCalls(device)

    def __call__(
        self,
        op: str,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        signature = None
        if type(topk_idx) is torch.Tensor:
            signature = (topk_idx.shape, topk_idx.dtype, type(num_experts), num_experts)
        call = self._calls.get(signature, topk_idx)
        if call is None:
            call = self._check(op, signature, topk_idx, num_experts)
        plan = call.plan
        streams = self._streams.begin(op, previous_event, async_finish, allocate_on_comm_stream)
        if self._fixed.tensors[0].numel() < plan.scratch_slots:
            # Zeroed once, in stream order before the launch; the kernel leaves it zero after every
            # call.
            with (
                torch.cuda.stream(streams.launch)
                if streams.launch is not None
                else contextlib.nullcontext()
            ):
                scratch = torch.zeros(plan.scratch_slots, dtype=torch.int32, device=self._device)
            self._fixed = addressed((scratch, self._rank_mask))
        with streams.allocation():
            outputs = self._outputs.take(call.pool_key, call.allocate, 3, streams.caller)
        plan.launch(
            streams.launch, topk_idx, call.num_tokens, self._fixed, self._host.address, outputs
        )
        outputs = outputs.tensors
        event = streams.finish((topk_idx, *outputs) if async_finish else ())
        return (*outputs, event)

    def _check(self, op: str, signature, topk_idx, num_experts) -> _LayoutCall:
        """Check a call's arguments and return what their signature fixes (cached under it)."""
        check_tensor(
            op, "topk_idx", topk_idx, device=self._device, dtypes=(torch.int64, torch.int32), dim=2
        )
        check_int(op, "num_experts", num_experts, minimum=1)
        topology = self._topology
        if num_experts % topology.num_ranks != 0:
            fail(
                op,
                f"num_experts must be divisible by the rank count {topology.num_ranks}, got "
                f"{num_experts}",
            )
        num_tokens, num_topk = topk_idx.shape
        # Token blocks never exceed 64 tokens: past that the plan does not depend on N.
        key = (
            min(1 << max(0, num_tokens - 1).bit_length(), 64),
            num_topk,
            topk_idx.dtype,
            num_experts,
        )
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._kernels.layout.plan_route_stats(
                num_tokens,
                num_topk,
                num_experts,
                topology.num_ranks,
                topology.ranks_per_node,
                topology.is_internode,
            )
        call = _LayoutCall(
            plan=plan,
            num_tokens=num_tokens,
            pool_key=("get_dispatch_layout", key, num_tokens),
            allocate=functools.partial(allocate_outputs, plan, num_tokens, self._device),
        )
        self._calls.remember(signature, call)
        return call


def allocate_outputs(plan, num_tokens: int, device: torch.device) -> list:
    """Fresh outputs of a layout call: [num_tokens_per_rank, num_tokens_per_node or None,
    num_tokens_per_expert, is_token_in_rank]."""
    return [
        torch.empty(plan.num_ranks, dtype=torch.int32, device=device),
        torch.empty(plan.num_nodes, dtype=torch.int32, device=device) if plan.with_nodes else None,
        torch.empty(plan.num_experts, dtype=torch.int32, device=device),
        torch.empty((num_tokens, plan.num_ranks), dtype=torch.bool, device=device),
    ]
