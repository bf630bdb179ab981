"""Handle tuples in DeepEP V1's field order (reference §12). NamedTuples are tuples: `handle[0]`
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


class InternodeHandle(NamedTuple):
    """10-tuple returned by a non-cached internode dispatch (reference §12.2); R_n nodes, C
    channels.

    is_token_in_rank: bool `[N, R]`, the caller's mask.
    rdma_channel_prefix_matrix: int32 `[R_n, C]`, this rank's tokens of channels `<= c` to node n.
    gbl_channel_prefix_matrix: int32 `[R, C]`, this rank's tokens of channels `<= c` to rank j.
    recv_rdma_channel_prefix_matrix: int32 `[R_n, C]`, tokens of channels `<= c` that reach this
        node from node n's rank with this rank's local index (they pass through this rank).
    recv_rdma_rank_prefix_sum: int32 `[R_n]`, inclusive prefix over nodes of those token counts.
    recv_gbl_channel_prefix_matrix: int32 `[R, C]`, first output row of (source rank j, channel c).
    recv_gbl_rank_prefix_sum: int32 `[R]`, inclusive prefix over source ranks of received rows.
    recv_src_meta: uint8 `[X, 8]`, per received row: int32 source node, int32 mask of the ranks of
        this node that received the token (little-endian).
    send_rdma_head: int32 `[N, R_n]`, token t's index in its channel's stream to node n, -1 if it
        does not go there.
    send_nvl_head: int32 `[X_rdma, d]`, for each token forwarded by this rank, its index in the
        combine stream of each local rank, -1 where that rank did not receive it.
    """

    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    recv_rdma_channel_prefix_matrix: torch.Tensor
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: torch.Tensor
    recv_gbl_rank_prefix_sum: torch.Tensor
    recv_src_meta: torch.Tensor
    send_rdma_head: torch.Tensor
    send_nvl_head: torch.Tensor
