"""What a high-throughput call's launch plans depend on (intranode and internode modes alike).

A mode builds its launch plans (ring or queue layout, kernel arguments, compiled-kernel choice)
once per key and reuses them for every later call with an equal key, so a cached dispatch in a
training loop costs one dict lookup. Keys are NamedTuples: typed fields, and hashing and equality
at the cost of a plain tuple. The two kinds never compare equal (different lengths, and `kind`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import Config


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
