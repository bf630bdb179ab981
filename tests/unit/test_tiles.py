"""`copy_ring_rows` (kernels/common/tiles.py) in the Triton interpreter: rows copied between a
linear array and a ring of slots, wrapping or not, in both directions, with spans that end inside
a block and spans of no rows. Each case is checked word for word against plain indexing, and the
words the copy must not touch keep their poison."""

import pytest
import tile_cases
import torch

POISON = -7

# (row_words, capacity, first, count, block, prefetch, into_ring)
CASES = [
    (12, 8, 0, 5, 16, True, True),  # no wrap, span ends inside a block
    (12, 8, 6, 5, 16, True, True),  # wraps after 2 rows
    (12, 8, 13, 8, 32, False, True),  # a whole ring from slot 5
    (8, 8, 3, 0, 16, True, True),  # nothing to copy
    (12, 8, 6, 5, 16, True, False),  # out of the ring, wrapping
    (4, 16, 15, 3, 64, False, False),  # one row before the wrap, block wider than the span
    (20, 6, 2, 4, 8, True, False),  # wraps exactly at the end of the span's first part
]


@pytest.mark.interpreter
def test_ring_copies_match_indexing(cpu_pool):
    results = cpu_pool(1).run(tile_cases.run_ring_copies, CASES, timeout=300)[0]
    for case, (linear, ring) in zip(CASES, results, strict=True):
        row_words, capacity, first, count, _, _, into_ring = case
        slots = [(first + i) % capacity for i in range(count)]
        gen = torch.Generator().manual_seed(first * 131 + count)
        source = torch.randint(-(2**31), 2**31 - 1, (capacity, row_words), generator=gen)
        source = source.to(torch.int32)
        if into_ring:
            want = torch.full((capacity, row_words), POISON, dtype=torch.int32)
            want[slots] = source[:count]
            assert torch.equal(ring, want), case
        else:
            want = torch.full((count + 1, row_words), POISON, dtype=torch.int32)
            want[:count] = source[slots]
            assert torch.equal(linear, want), case
