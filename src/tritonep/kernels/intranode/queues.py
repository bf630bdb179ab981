"""Where an intranode call's ring queues sit in the NVL data region: one source of truth for the
host (sizing, refusals) and the kernels (slot addresses). Pure Python: no kernel is defined here."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ...protocol import ALIGN, align_up


@dataclass(frozen=True)
class IntranodeQueues:
    """Ring queues of one intranode dispatch or combine call inside the NVL data region.

    Queue (channel c, peer p) of this rank holds `capacity` slots. Each field is its own array
    (structure of arrays) so that every copy is a contiguous, 16-byte aligned run:
    `x[C][R][capacity][row_bytes]`, `src_idx[...]` int32, `topk_idx[...][num_topk_idx]` of
    `topk_idx_itemsize` bytes (already rebased to the receiver's local expert ids),
    `topk_weights[...][num_topk_weights]` float32, `scales[...][num_scales]` 4-byte words. Every
    field has the same per-row stride as the matching output tensor, so a sender addresses its own
    rank's output rows and a peer's queue slots with one formula. Dispatch carries all fields;
    combine carries rows and weights only.
    """

    num_channels: int
    num_ranks: int
    capacity: int
    row_bytes: int
    has_src_idx: bool
    num_topk_idx: int
    num_topk_weights: int
    num_scales: int
    topk_idx_itemsize: int = 8

    @staticmethod
    def slot_bytes(
        row_bytes, has_src_idx, num_topk_idx, num_topk_weights, num_scales, topk_idx_itemsize=8
    ) -> int:
        return (
            align_up(row_bytes, 16)
            + 4 * int(has_src_idx)
            + topk_idx_itemsize * num_topk_idx
            + 4 * num_topk_weights
            + 4 * num_scales
        )

    @classmethod
    def fit(
        cls,
        data_bytes: int,
        num_channels: int,
        num_ranks: int,
        max_capacity: int,
        row_bytes: int,
        has_src_idx: bool,
        num_topk_idx: int,
        num_topk_weights: int,
        num_scales: int,
        topk_idx_itemsize: int = 8,
    ) -> IntranodeQueues:
        """Largest capacity <= max_capacity whose queues fit into `data_bytes` (0 if none fits)."""
        queues = num_channels * num_ranks
        per_slot = cls.slot_bytes(
            row_bytes, has_src_idx, num_topk_idx, num_topk_weights, num_scales, topk_idx_itemsize
        )
        usable = data_bytes - 5 * ALIGN  # five arrays, each starting on a 128-byte boundary
        capacity = max(0, min(max_capacity, usable // max(queues * per_slot, 1)))
        return cls(
            num_channels,
            num_ranks,
            capacity,
            row_bytes,
            has_src_idx,
            num_topk_idx,
            num_topk_weights,
            num_scales,
            topk_idx_itemsize,
        )

    @functools.cached_property
    def num_slots(self) -> int:
        return self.num_channels * self.num_ranks * self.capacity

    @functools.cached_property
    def x(self) -> int:
        return 0

    @functools.cached_property
    def src_idx(self) -> int:
        return align_up(self.x + self.num_slots * align_up(self.row_bytes, 16))

    @functools.cached_property
    def topk_idx(self) -> int:
        return align_up(self.src_idx + self.num_slots * 4 * int(self.has_src_idx))

    @functools.cached_property
    def topk_weights(self) -> int:
        return align_up(self.topk_idx + self.num_slots * self.topk_idx_itemsize * self.num_topk_idx)

    @functools.cached_property
    def scales(self) -> int:
        return align_up(self.topk_weights + self.num_slots * 4 * self.num_topk_weights)

    @functools.cached_property
    def num_bytes(self) -> int:
        return align_up(self.scales + self.num_slots * 4 * self.num_scales)
