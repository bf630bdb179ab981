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
def row_block(
    row_addrs, cols, ELEM_TY: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = True
):
    """Pointers `[len(row_addrs), BLOCK]` to columns `cols` (contiguous; with ALIGNED, every row
    starts 16-byte aligned, which lets the copy use 16-byte vectors)."""
    ptrs = row_addrs.to(tl.pointer_type(ELEM_TY))[:, None] + cols[None, :]
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, BLOCK])
    return ptrs


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
    below = rows[:, None] >= rows[None, :] if INCLUSIVE else rows[:, None] > rows[None, :]
    return tl.sum(tl.where(below[:, :, None], matrix[None, :, :], 0), axis=1)


@triton.jit
def _load_block(
    src_rows,
    words,
    mask,
    ROW_WORDS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CACHE: tl.constexpr,
    ALIGNED: tl.constexpr = True,
):
    m = mask[:, None] & (words[None, :] < ROW_WORDS)
    return tl.load(
        row_block(src_rows, words, tl.int32, BLOCK_W, ALIGNED), mask=m, cache_modifier=CACHE
    )


@triton.jit
def copy_rows(
    src_rows,
    dst_rows,
    mask,
    ROW_WORDS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CACHE: tl.constexpr,
    PREFETCH: tl.constexpr,
    ALIGNED: tl.constexpr = True,
):
    """Copy `ROW_WORDS` 4-byte words of each masked row from `src_rows` to `dst_rows` (byte
    addresses; 16-byte aligned rows unless ALIGNED is False).

    PREFETCH issues the loads of block i+1 before the stores of block i, doubling the bytes in
    flight per program at the same register tile (the copy is latency-bound at small SM counts).
    """
    if PREFETCH:
        words = tl.arange(0, BLOCK_W)
        vals = _load_block(src_rows, words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED)
        for w0 in range(BLOCK_W, ROW_WORDS + BLOCK_W, BLOCK_W):
            next_words = w0 + tl.arange(0, BLOCK_W)
            next_vals = _load_block(src_rows, next_words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED)
            m = mask[:, None] & (words[None, :] < ROW_WORDS)
            tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W, ALIGNED), vals, mask=m)
            vals = next_vals
            words = next_words
    else:
        for w0 in range(0, ROW_WORDS, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            vals = _load_block(src_rows, words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED)
            m = mask[:, None] & (words[None, :] < ROW_WORDS)
            tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W, ALIGNED), vals, mask=m)
