"""Handle tuples in DeepEP V1's field order (reference §12). NamedTuples are tuples: `handle[0]`
works. `checked` turns what a user passed back into a handle, after checking every entry's dtype,
device and shape against this Buffer's topology and the call's channel count."""

from typing import NamedTuple

import torch

from ._validate import check_tensor, fail


def _check_arity(op: str, handle, size: int, mode: str) -> None:
    if not isinstance(handle, (tuple, list)) or len(handle) != size:
        kind = (
            f"a {type(handle).__name__} of {len(handle)}"
            if isinstance(handle, (tuple, list))
            else type(handle).__name__
        )
        fail(op, f"handle must be the {size}-tuple of an {mode} dispatch, got {kind}")


def _check_channels(op: str, handle_channels: int, num_channels: int) -> None:
    if handle_channels != num_channels:
        fail(
            op,
            f"config has {num_channels} channels (num_sms={2 * num_channels}) but the handle "
            f"was made with {handle_channels} (num_sms={2 * handle_channels})",
        )


def _check_entries(op: str, handle, device, entries) -> None:
    for index, name, shape, dtype in entries:
        check_tensor(
            op,
            f"handle[{index}] ({name})",
            handle[index],
            device=device,
            dtypes=(dtype,),
            shape=shape,
        )


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

    @property
    def num_recv_rows(self) -> int:
        return self.recv_src_idx.size(0)

    @classmethod
    def checked(cls, op: str, handle, num_channels: int, device, topology) -> "IntranodeHandle":
        _check_arity(op, handle, 6, "intranode")
        handle = cls(*handle)
        num_ranks = topology.num_ranks
        _check_entries(
            op,
            handle,
            device,
            [
                (0, "rank_prefix_matrix", (num_ranks, num_ranks), torch.int32),
                (1, "channel_prefix_matrix", (num_ranks, None), torch.int32),
            ],
        )
        _check_channels(op, handle.channel_prefix_matrix.size(1), num_channels)
        _check_entries(
            op,
            handle,
            device,
            [
                (2, "recv_channel_prefix_matrix", (num_ranks, num_channels), torch.int32),
                (3, "recv_src_idx", (None,), torch.int32),
                (4, "is_token_in_rank", (None, num_ranks), torch.bool),
            ],
        )
        num_tokens = handle.is_token_in_rank.size(0)
        _check_entries(op, handle, device, [(5, "send_head", (num_tokens, num_ranks), torch.int32)])
        return handle


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

    @property
    def num_recv_rows(self) -> int:
        return self.recv_src_meta.size(0)

    @classmethod
    def checked(cls, op: str, handle, num_channels: int, device, topology) -> "InternodeHandle":
        _check_arity(op, handle, 10, "internode")
        handle = cls(*handle)
        num_ranks, num_nodes = topology.num_ranks, topology.num_nodes
        _check_entries(
            op,
            handle,
            device,
            [
                (0, "is_token_in_rank", (None, num_ranks), torch.bool),
                (1, "rdma_channel_prefix_matrix", (num_nodes, None), torch.int32),
            ],
        )
        _check_channels(op, handle.rdma_channel_prefix_matrix.size(-1), num_channels)
        num_tokens = handle.is_token_in_rank.size(0)
        _check_entries(
            op,
            handle,
            device,
            [
                (2, "gbl_channel_prefix_matrix", (num_ranks, num_channels), torch.int32),
                (3, "recv_rdma_channel_prefix_matrix", (num_nodes, num_channels), torch.int32),
                (4, "recv_rdma_rank_prefix_sum", (num_nodes,), torch.int32),
                (5, "recv_gbl_channel_prefix_matrix", (num_ranks, num_channels), torch.int32),
                (6, "recv_gbl_rank_prefix_sum", (num_ranks,), torch.int32),
                (7, "recv_src_meta", (None, 8), torch.uint8),
                (8, "send_rdma_head", (num_tokens, num_nodes), torch.int32),
                (9, "send_nvl_head", (None, topology.ranks_per_node), torch.int32),
            ],
        )
        return handle
