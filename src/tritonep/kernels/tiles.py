"""Tile helpers shared by the data kernels: row-block pointers from raw addresses, lane picks.

Rows live in peer buffers, queues and output tensors that kernels reach through raw int64
addresses. `row_block` turns a vector of row addresses into a `[rows, cols]` pointer tile and
states what the compiler cannot prove on its own: each row starts 16-byte aligned and its columns
are contiguous. Without those hints every copy compiles to 4-byte accesses; with them to 16-byte
vectors (checked in the sm_90 AOT test).
"""

import triton
import triton.language as tl


@triton.jit
def row_block(row_addrs, cols, ELEM_TY: tl.constexpr, BLOCK: tl.constexpr):
    """Pointers `[len(row_addrs), BLOCK]` to columns `cols` (contiguous, 16-byte aligned start)."""
    ptrs = row_addrs.to(tl.pointer_type(ELEM_TY))[:, None] + cols[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, BLOCK])


@triton.jit
def column(matrix, lanes, j):
    """`matrix[:, j]` of a `[rows, lanes]` tile (a masked row-sum keeps it in registers)."""
    return tl.sum(tl.where(lanes[None, :] == j, matrix, 0), axis=1)


@triton.jit
def lane(vector, lanes, j):
    """`vector[j]` of a `[lanes]` vector."""
    return tl.sum(tl.where(lanes == j, vector, 0), axis=0)


@triton.jit
def cumsum_rows(matrix, ROWS: tl.constexpr, INCLUSIVE: tl.constexpr):
    """Prefix sums down the rows of a small `[ROWS, lanes]` integer tile.

    A masked `[ROWS, ROWS, lanes]` reduction instead of `tl.cumsum(axis=0)`, whose lowering fails
    (ScanOpToLLVM assertion) in triton 3.6 for some tile layouts of the dispatch kernel.
    """
    rows = tl.arange(0, ROWS)
    if INCLUSIVE:
        below = rows[:, None] >= rows[None, :]
    else:
        below = rows[:, None] > rows[None, :]
    return tl.sum(tl.where(below[:, :, None], matrix[None, :, :], 0), axis=1)
