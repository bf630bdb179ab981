"""`get_dispatch_layout` for both high-throughput modes: routing statistics of this rank's tokens.

Local (no communication): one `route_stats` launch (`kernels/layout.py`) per call, planned per
geometry, into outputs from the Buffer's pools (`runtime/outputs.py`: fresh whenever the caller
still holds the previous ones). The kernel keeps a persistent int32 accumulator that is zero
between calls, zeroed once when it is first needed.
"""

from __future__ import annotations

import contextlib

import torch

from ..runtime.host import HostBlock
from ..runtime.outputs import OutputPools, addressed
from ..runtime.streams import CommStreams
from ..runtime.topology import Topology


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

    def __call__(
        self,
        op: str,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ):
        num_tokens, num_topk = topk_idx.shape
        # Token blocks never exceed 64 tokens: past that the plan does not depend on N.
        key = (
            min(1 << max(0, num_tokens - 1).bit_length(), 64),
            num_topk,
            topk_idx.dtype,
            num_experts,
        )
        plan = self._plans.get(key)
        topology = self._topology
        if plan is None:
            plan = self._plans[key] = self._kernels.layout.plan_route_stats(
                num_tokens,
                num_topk,
                num_experts,
                topology.num_ranks,
                topology.ranks_per_node,
                topology.is_internode,
            )
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
            outputs = self._outputs.take(
                ("get_dispatch_layout", key, num_tokens),
                lambda: allocate_outputs(plan, num_tokens, self._device),
                3,
            )
        plan.launch(streams.launch, topk_idx, num_tokens, self._fixed, self._host.address, outputs)
        outputs = outputs.tensors
        event = streams.finish((topk_idx, *outputs) if async_finish else ())
        return (*outputs, event)


def allocate_outputs(plan, num_tokens: int, device: torch.device) -> list:
    """Fresh outputs of a layout call: [num_tokens_per_rank, num_tokens_per_node or None,
    num_tokens_per_expert, is_token_in_rank]."""
    return [
        torch.empty(plan.num_ranks, dtype=torch.int32, device=device),
        torch.empty(plan.num_nodes, dtype=torch.int32, device=device) if plan.with_nodes else None,
        torch.empty(plan.num_experts, dtype=torch.int32, device=device),
        torch.empty((num_tokens, plan.num_ranks), dtype=torch.bool, device=device),
    ]
