"""Handle tuples in DeepEP V1's field order (spec §12). NamedTuples are tuples: `handle[0]`
works."""

from typing import NamedTuple

import torch


class IntranodeHandle(NamedTuple):
    """6-tuple returned by a non-cached intranode dispatch.

    rank_prefix_matrix: int32 `[R, R]`, `[i][j]` = rows rank j received from ranks `<= i`.
    channel_prefix_matrix: int32 `[R, C]`, this rank's tokens of channels `<= c` going to rank j.
    recv_channel_prefix_matrix: int32 `[R, C]`, offset of (source s, channel c) inside s's block.
    recv_src_idx: int32 `[X]`, each received row's token index on its source rank.
    is_token_in_rank: bool `[N, R]`, the caller's mask.
    send_head: int32 `[N, R]`, token t's position in its channel's stream to rank j, -1 if not sent.
    """

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor
