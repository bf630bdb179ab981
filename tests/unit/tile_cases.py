"""A test kernel around `tritonep.kernels.common.tiles.copy_ring_rows` and the worker task that
runs it in the Triton interpreter (`test_tiles.py` checks its output). Module-level, so the rank
workers import it with TRITON_INTERPRET=1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonep.kernels.common.tiles import copy_ring_rows


@triton.jit
def ring_copy_kernel(
    linear_addr,
    ring_addr,
    first,
    count,
    capacity,
    ROW_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTO_RING: tl.constexpr,
):
    copy_ring_rows(
        linear_addr, ring_addr, first, count, capacity, ROW_WORDS, BLOCK, "", PREFETCH, INTO_RING
    )


def run_ring_copies(ctx, cases: list[tuple[int, int, int, int, int, bool, bool]]) -> list[tuple]:
    """Each case `(row_words, capacity, first, count, block, prefetch, into_ring)`: copies
    `count` rows between a poisoned linear array and a poisoned ring; returns (linear, ring)."""
    results = []
    for row_words, capacity, first, count, block, prefetch, into_ring in cases:
        gen = torch.Generator().manual_seed(first * 131 + count)
        source = torch.randint(-(2**31), 2**31 - 1, (capacity, row_words), generator=gen)
        source = source.to(torch.int32)
        linear = source[:count].clone() if into_ring else torch.full((count + 1, row_words), -7)
        ring = torch.full((capacity, row_words), -7) if into_ring else source.clone()
        linear, ring = linear.to(torch.int32), ring.to(torch.int32)
        ring_copy_kernel[(1,)](
            linear.data_ptr(),
            ring.data_ptr(),
            first,
            count,
            capacity,
            ROW_WORDS=row_words,
            BLOCK=block,
            PREFETCH=prefetch,
            INTO_RING=into_ring,
        )
        results.append((linear, ring))
    return results
