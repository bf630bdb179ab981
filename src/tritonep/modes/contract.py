"""The contract between `Buffer` and the high-throughput modes (intranode and internode alike).

`ThroughputMode` is what `Buffer.dispatch` / `combine` route to once their arguments are checked;
`DispatchKey` / `CombineKey` say what a call's launch plans depend on. A mode builds its launch
plans (ring or queue layout, kernel arguments, compiled-kernel choice) once per key and reuses them
for every later call with an equal key, so a cached dispatch in a training loop costs one dict
lookup. Keys are NamedTuples: typed fields, and hashing and equality at the cost of a plain tuple.
The two kinds never compare equal (different lengths, and `kind`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ..config import Config
from ..event import EventOverlap


class DispatchKey(NamedTuple):
    """The geometry of one dispatch: rows, scales, top-k and experts, the config, cached or not."""

    kind: str
    cached: bool
    config: Config
    row_bytes: int
    num_topk: int
    topk_itemsize: int
    num_scales: int
    experts_per_rank: int
    worst: bool  # num_worst_tokens > 0 on a non-cached call: outputs of a fixed size

    @classmethod
    def of(
        cls,
        config: Config,
        x_data: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        num_tokens_per_expert: torch.Tensor | None,
        num_ranks: int,
        num_worst_tokens: int,
        cached: bool,
    ) -> DispatchKey:
        return cls(
            "dispatch",
            cached,
            config,
            x_data.size(1) * x_data.element_size(),
            topk_idx.size(1) if topk_idx is not None else 0,
            topk_idx.element_size() if topk_idx is not None else 8,
            x_scales.size(1) if x_scales is not None else 0,
            1 if cached else num_tokens_per_expert.size(0) // num_ranks,
            num_worst_tokens > 0 and not cached,
        )


class CombineKey(NamedTuple):
    """The geometry of one combine: row width and dtype, top-k weights, which biases."""

    kind: str
    config: Config
    hidden: int
    dtype: torch.dtype
    num_topk: int
    has_bias: tuple[bool, bool]

    @classmethod
    def of(
        cls, config: Config, x: torch.Tensor, topk_weights: torch.Tensor | None, biases
    ) -> CombineKey:
        return cls(
            "combine",
            config,
            x.size(1),
            x.dtype,
            topk_weights.size(1) if topk_weights is not None else 0,
            (biases[0] is not None, biases[1] is not None),
        )


class ThroughputMode(Protocol):
    """What serves `dispatch` / `combine` for one topology: `IntranodeMode` (one node) or
    `InternodeMode` (several). Arguments arrive checked; handles as the mode's NamedTuple."""

    def dispatch(
        self,
        op: str,
        key: DispatchKey,
        x_data: torch.Tensor,
        x_scales: torch.Tensor | None,
        handle: tuple | None,
        num_tokens_per_expert: torch.Tensor | None,
        is_token_in_rank: torch.Tensor,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        expert_alignment: int,
        num_worst_tokens: int,
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ) -> tuple:
        """V1's 6-tuple `(recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event)`."""
        ...

    def combine(
        self,
        op: str,
        key: CombineKey,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None,
        biases: tuple,
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
    ) -> tuple:
        """`(combined_x, combined_topk_weights, event)`."""
        ...
