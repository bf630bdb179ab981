"""Where an intranode dispatch put the rows of each source (dispatch, cached dispatch, combine)."""

import triton
import triton.language as tl


@triton.jit
def received_blocks(
    rank_prefix_matrix_ptr,
    recv_channel_prefix_matrix_ptr,
    ranks,
    rank,
    c,
    num_channels,
    NUM_RANKS: tl.constexpr,
):
    """Where this rank's received rows sit, per source rank s (lanes), from a dispatch handle.

    Returns (block_begin, block_end): rows `[block_begin[s], block_end[s])` of the dispatch output
    came from s; and (chan_begin, chan_end): channel c of s occupies `block_begin[s] +
    [chan_begin[s], chan_end[s])`.
    """
    rank_ok = ranks < NUM_RANKS
    prev = tl.maximum(ranks - 1, 0)
    block_begin = tl.load(
        rank_prefix_matrix_ptr + prev * NUM_RANKS + rank, mask=rank_ok & (ranks > 0), other=0
    )
    block_end = tl.load(rank_prefix_matrix_ptr + ranks * NUM_RANKS + rank, mask=rank_ok, other=0)
    chan_begin = tl.load(
        recv_channel_prefix_matrix_ptr + ranks * num_channels + c, mask=rank_ok, other=0
    )
    last = c + 1 >= num_channels
    chan_end = tl.load(
        recv_channel_prefix_matrix_ptr + ranks * num_channels + c + 1, mask=rank_ok & ~last, other=0
    )
    chan_end = tl.where(last, block_end - block_begin, chan_end)
    return block_begin, block_end, chan_begin, chan_end
