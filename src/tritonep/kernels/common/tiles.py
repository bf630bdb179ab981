"""Tile helpers shared by the data kernels: row-block pointers from raw addresses, lane picks.

Rows live in peer buffers, queues and output tensors that kernels reach through raw int64
addresses. `row_block` turns a vector of row addresses into a `[rows, cols]` pointer tile and
states what the compiler cannot prove on its own: each row starts 16-byte aligned and its columns
are contiguous. Without those hints every copy compiles to 4-byte accesses; with them to 16-byte
vectors (checked in the sm_90 AOT test).
"""

import triton
import triton.language as tl

# No eviction hint, as a default of string constexprs: triton 3.6 does not wrap a plain string
# default, and the kernels calling without it failed to compile.
NO_HINT = tl.constexpr("")


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
def discard_rows(row_addrs, row_ok, NUM_BYTES: tl.constexpr, BLOCK_LINES: tl.constexpr):
    """Drop from L2, without writing them back, the 128-byte lines lying wholly inside each row
    `[addr, addr + NUM_BYTES)` of `row_addrs` where `row_ok` (lines shared with a neighbour stay).

    For received messages that are dead once read: the next write to their slot comes in a later
    call. Left dirty, each would be written back to HBM when L2 evicts it, which on a GPU that
    several ranks share is bandwidth the next phase needs. The caller's threads must have finished
    reading the rows (their loaded values already used, then a block barrier). BLOCK_LINES: a
    power of two above NUM_BYTES / 128. Compiled code only (PTX `discard.global.L2`)."""
    lines = tl.arange(0, BLOCK_LINES)
    first = (row_addrs + 127) // 128
    count = (row_addrs + NUM_BYTES) // 128 - first
    live = row_ok[:, None] & (lines[None, :] < count[:, None])
    tl.inline_asm_elementwise(
        "{ .reg .pred live; setp.ne.b32 live, $2, 0; @live discard.global.L2 [$1], 128; "
        "mov.u32 $0, 0; }",
        "=r,l,r",
        [(first[:, None] + lines[None, :]) * 128, live.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


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
    EVICT: tl.constexpr = NO_HINT,
):
    m = mask[:, None] & (words[None, :] < ROW_WORDS)
    return tl.load(
        row_block(src_rows, words, tl.int32, BLOCK_W, ALIGNED),
        mask=m,
        cache_modifier=CACHE,
        eviction_policy=EVICT,
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
    LOAD_EVICT: tl.constexpr = NO_HINT,
):
    """Copy `ROW_WORDS` 4-byte words of each masked row from `src_rows` to `dst_rows` (byte
    addresses; 16-byte aligned rows unless ALIGNED is False).

    PREFETCH issues the loads of block i+1 before the stores of block i, doubling the bytes in
    flight per program at the same register tile (the copy is latency-bound at small SM counts).
    LOAD_EVICT: the loads' eviction hint (L1 and L2), e.g. "evict_first" for rows read once; PTX
    takes no `.cg` beside it, so CACHE is then "".
    """
    if PREFETCH:
        words = tl.arange(0, BLOCK_W)
        vals = _load_block(src_rows, words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED, LOAD_EVICT)
        for w0 in range(BLOCK_W, ROW_WORDS + BLOCK_W, BLOCK_W):
            next_words = w0 + tl.arange(0, BLOCK_W)
            next_vals = _load_block(
                src_rows, next_words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED, LOAD_EVICT
            )
            m = mask[:, None] & (words[None, :] < ROW_WORDS)
            tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W, ALIGNED), vals, mask=m)
            vals = next_vals
            words = next_words
    else:
        for w0 in range(0, ROW_WORDS, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            vals = _load_block(
                src_rows, words, mask, ROW_WORDS, BLOCK_W, CACHE, ALIGNED, LOAD_EVICT
            )
            m = mask[:, None] & (words[None, :] < ROW_WORDS)
            tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W, ALIGNED), vals, mask=m)


@triton.jit
def _span_pointers(addr, words):
    """Pointers to 4-byte `words` from byte address `addr` (16-byte aligned), marked contiguous so
    the accesses compile to 16-byte vectors."""
    ptrs = (addr + words.to(tl.int64) * 4).to(tl.pointer_type(tl.int32))
    return tl.max_contiguous(tl.multiple_of(ptrs, [16]), [16])


@triton.jit
def _span_block(addr, words, num_words, CACHE: tl.constexpr):
    return tl.load(_span_pointers(addr, words), mask=words < num_words, cache_modifier=CACHE)


@triton.jit
def _store_span_block(addr, words, num_words, vals):
    tl.store(_span_pointers(addr, words), vals, mask=words < num_words)


@triton.jit
def copy_span(
    src_addr,
    dst_addr,
    num_words,
    BLOCK: tl.constexpr,
    CACHE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Copy `num_words` 4-byte words (a multiple of 4) from byte address `src_addr` to `dst_addr`,
    both 16-byte aligned, in flat `[BLOCK]` steps.

    Consecutive rows of a queue or an output form one span: n rows then cost
    `cdiv(n * row_words, BLOCK)` full steps, where a `[pow2(n), BLOCK_W]` row tile spends lanes on
    masked rows (10 of 16 rows valid at V1's combine chunk) and on the row's last partial block.
    PREFETCH as in `copy_rows`.
    """
    if PREFETCH:
        words = tl.arange(0, BLOCK)
        vals = _span_block(src_addr, words, num_words, CACHE)
        for w0 in range(BLOCK, num_words + BLOCK, BLOCK):
            next_words = w0 + tl.arange(0, BLOCK)
            next_vals = _span_block(src_addr, next_words, num_words, CACHE)
            _store_span_block(dst_addr, words, num_words, vals)
            vals = next_vals
            words = next_words
    else:
        for w0 in range(0, num_words, BLOCK):
            words = w0 + tl.arange(0, BLOCK)
            _store_span_block(
                dst_addr, words, num_words, _span_block(src_addr, words, num_words, CACHE)
            )


@triton.jit
def copy_ring_rows(
    linear_addr,
    ring_addr,
    first,
    count,
    capacity,
    ROW_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    CACHE: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTO_RING: tl.constexpr,
):
    """Copy `count` consecutive rows of `ROW_WORDS` words between a linear array (its row 0 at
    byte address `linear_addr`) and a ring of `capacity` row slots at `ring_addr`, the ring side
    starting at slot `first % capacity`; INTO_RING gives the direction. At most two flat spans,
    split where the ring wraps."""
    ROW_BYTES: tl.constexpr = ROW_WORDS * 4
    at = first % capacity
    before_wrap = tl.minimum(count, capacity - at)
    rest = count - before_wrap
    wrapped_linear = linear_addr + before_wrap.to(tl.int64) * ROW_BYTES
    at_addr = ring_addr + at.to(tl.int64) * ROW_BYTES
    if INTO_RING:
        copy_span(linear_addr, at_addr, before_wrap * ROW_WORDS, BLOCK, CACHE, PREFETCH)
        copy_span(wrapped_linear, ring_addr, rest * ROW_WORDS, BLOCK, CACHE, PREFETCH)
    else:
        copy_span(at_addr, linear_addr, before_wrap * ROW_WORDS, BLOCK, CACHE, PREFETCH)
        copy_span(ring_addr, wrapped_linear, rest * ROW_WORDS, BLOCK, CACHE, PREFETCH)
