"""Where the internode structures sit in a Buffer's two memories (host side, plain Python).

Both memories hold a **fixed signal area** whose layout depends only on the Buffer (`R_n` nodes
of `d` ranks, its memory sizes), never on a call's geometry: at the *top* of the RDMA memory and at
the start of the NVL data region. Every other byte is carved per call geometry (`CallLayout`):
below the RDMA signals, after the NVL ones. Offsets are bytes from the start of the RDMA memory
(identical on every rank: a local symmetric address is `rdma_base + offset`) and from the start of
the NVL *data region* (`peer_bases[j] + data_offset + offset`).

Why the top of the RDMA memory: the low-latency mode shares it (a Buffer made with
`low_latency_mode=True`) and keeps its signal words at the bottom; V1 code runs internode calls,
then `clean_low_latency_buffer`, then low-latency calls. Growing from the top, internode calls never
write those words as long as both layouts fit the memory, which they do at V1's size hints. The
signal area itself lies above the user's `num_rdma_bytes` (`signal_reserve`: the runtime allocates
it there), so low-latency data, which may fill every user byte, never lands on these never-reset
words when low-latency calls come first.

Fixed signal areas (int64 words, epoch-tagged `epoch << 32 | value`, zeroed at Buffer
construction, only ever growing):

| memory | word | index | written by | meaning |
|---|---|---|---|---|
| RDMA | started | [R_n] | column peer n' | it began notify of epoch e: payloads may come |
| RDMA | flags | [R_n] | column peer n' | its notify message of epoch e is in inbox slot n' |
| RDMA | tails | [MAX_CHANNELS][R_n] | column peer n' | slots it filled in my ring (c, n') |
| RDMA | heads | [MAX_CHANNELS][R_n] | column peer n' | slots it consumed of my stream (c) to it |
| NVL | started | [d] | node peer l' | as above, inside the node |
| NVL | flags | [d] | node peer l' | its notify message of epoch e is in inbox slot l' |
| NVL | tails | [MAX_CHANNELS][d] | node peer l' | slots it filled in my ring (c, l') |
| NVL | heads | [MAX_CHANNELS][d] | node peer l' | slots it consumed of my stream (c) to it |

"Column peers" of rank (n, l) are the ranks (n', l) with the same local index: the only ranks it
exchanges RDMA traffic with. "Node peers" are the ranks (n, l') of its node.

Per-call areas (after the signal areas): the notify inbox and, in the RDMA memory, the staging
copies that notify puts from; then the rings of the data kernel. A ring (c, p) holds `capacity`
slots, one token (dispatch) or one partial sum (combine) each, stored contiguously so a chunk of
tokens is one put (two when it wraps). Dispatch and combine never run at once on a Buffer, so
their areas overlap freely; a call's notify area never overlaps its own rings.

Why per-call areas may overlap a previous call's: notify of epoch e first raises `started` in every
peer that writes into this rank, and a peer writes any payload of epoch e only after it saw this
rank's `started >= e`, i.e. after this rank finished every kernel of call e - 1 (stream order).
Only the signal words are written late (a head may land after its receiver's kernel ended), and
they live in the fixed areas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ... import protocol

MAX_CHANNELS = protocol.MAX_CHANNELS
HEADER_BYTES = 16  # notify message header: int64 layout key, int64 reserved


def _align(value: int, alignment: int = 128) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class SignalArea:
    """Fixed signal words of `num_nodes` nodes of `ranks_per_node` ranks (byte offsets), at the top
    of an RDMA memory of `num_rdma_bytes` and at the start of the NVL data region."""

    num_nodes: int
    ranks_per_node: int
    num_rdma_bytes: int

    # RDMA memory: the top `rdma_bytes`
    @property
    def rdma_bytes(self) -> int:
        return 2 * _align(8 * self.num_nodes) + 2 * _align(8 * MAX_CHANNELS * self.num_nodes)

    @property
    def rdma_started(self) -> int:
        return self.num_rdma_bytes - self.rdma_bytes

    @property
    def rdma_flags(self) -> int:
        return self.rdma_started + _align(8 * self.num_nodes)

    @property
    def rdma_tails(self) -> int:
        return self.rdma_flags + _align(8 * self.num_nodes)

    @property
    def rdma_heads(self) -> int:
        return self.rdma_tails + _align(8 * MAX_CHANNELS * self.num_nodes)

    # NVL data region
    @property
    def nvl_started(self) -> int:
        return 0

    @property
    def nvl_flags(self) -> int:
        return _align(8 * self.ranks_per_node)

    @property
    def nvl_tails(self) -> int:
        return self.nvl_flags + _align(8 * self.ranks_per_node)

    @property
    def nvl_heads(self) -> int:
        return self.nvl_tails + _align(8 * MAX_CHANNELS * self.ranks_per_node)

    @property
    def nvl_bytes(self) -> int:
        return self.nvl_heads + _align(8 * MAX_CHANNELS * self.ranks_per_node)


def signal_reserve(topology) -> int:
    """RDMA bytes the runtime adds above the user's `num_rdma_bytes` for the signal area."""
    return SignalArea(topology.num_nodes, topology.ranks_per_node, 0).rdma_bytes


@dataclass(frozen=True)
class SlotLayout:
    """One ring slot: a token of a dispatch or a partial sum of a combine, 16-byte aligned.

    Dispatch: `[row | scales S x 4 | top-k ids K x id bytes | weights K x 4 | meta]`. In an RDMA
    ring the meta holds `d` int32: the token's position in its (source rank, channel) stream to each
    rank of the destination node, -1 where it does not go. In an NVL ring it holds
    `[position, source node, mask of the node's ranks that receive the token]`.
    Combine: `[row | weights K x 4]` (no meta).
    """

    row_bytes: int
    num_scales: int = 0
    num_topk: int = 0
    topk_itemsize: int = 8
    meta_words: int = 0

    @property
    def scales(self) -> int:
        return _align(self.row_bytes, 16)

    @property
    def topk_idx(self) -> int:
        return self.scales + 4 * self.num_scales

    @property
    def topk_weights(self) -> int:
        return self.topk_idx + self.topk_itemsize * self.num_topk

    @property
    def meta(self) -> int:
        return self.topk_weights + 4 * self.num_topk

    @property
    def num_bytes(self) -> int:
        return _align(self.meta + 4 * self.meta_words, 16)


@dataclass(frozen=True)
class CallLayout:
    """Notify messages and rings of one call geometry.

    RDMA notify message from column peer (n', l) to rank (n, l): header, then int32
    `node_prefix[C]` (its tokens to node n, inclusive prefix over channels), `rank_prefix[d][C]`
    (its tokens to each rank of node n) and, when counting, `experts[d * L]` (its
    `num_tokens_per_expert` of node n's experts). NVL notify message from node peer l'' to rank
    (n, l'): `keys[R_n]` int64 (layout key of each column peer (n', l'') as l'' saw it, -1 if
    absent), then int32 `rank_prefix[R_n][C]` (each (n', l'')'s tokens to this rank) and
    `experts[L]` (summed over n').
    """

    signals: SignalArea
    num_channels: int
    experts_per_rank: int
    slot: SlotLayout
    rdma_capacity: int
    nvl_capacity: int

    @property
    def rdma_msg_bytes(self) -> int:
        d, c, e = self.signals.ranks_per_node, self.num_channels, self.experts_per_rank
        return _align(HEADER_BYTES + 4 * (c + d * c + d * e), 16)

    @property
    def nvl_msg_bytes(self) -> int:
        n, c, e = self.signals.num_nodes, self.num_channels, self.experts_per_rank
        return _align(8 * n + 4 * (n * c + e), 16)

    # RDMA areas, from the bottom of the call's block up; the block ends where the signals begin.
    @property
    def _rdma_staging_rel(self) -> int:
        return _align(self.signals.num_nodes * self.rdma_msg_bytes)

    @property
    def _rdma_ring_rel(self) -> int:
        return self._rdma_staging_rel + _align(self.signals.num_nodes * self.rdma_msg_bytes)

    @property
    def rdma_ring_bytes(self) -> int:
        return self.num_channels * self.signals.num_nodes * self.rdma_capacity * self.slot.num_bytes

    @property
    def _rdma_data_staging_rel(self) -> int:
        return self._rdma_ring_rel + _align(self.rdma_ring_bytes)

    @property
    def _rdma_block(self) -> int:
        return self._rdma_data_staging_rel + _align(self.rdma_ring_bytes)

    @property
    def rdma_inbox(self) -> int:
        return self.signals.rdma_started - self._rdma_block

    @property
    def rdma_msg_staging(self) -> int:
        return self.rdma_inbox + self._rdma_staging_rel

    @property
    def rdma_ring(self) -> int:
        return self.rdma_inbox + self._rdma_ring_rel

    @property
    def rdma_staging(self) -> int:
        return self.rdma_inbox + self._rdma_data_staging_rel

    @property
    def rdma_bytes(self) -> int:
        """RDMA bytes this call uses (the top of the memory)."""
        return self.signals.rdma_bytes + self._rdma_block

    @property
    def nvl_inbox(self) -> int:
        return self.signals.nvl_bytes

    @property
    def nvl_ring(self) -> int:
        return _align(self.nvl_inbox + self.signals.ranks_per_node * self.nvl_msg_bytes)

    @property
    def nvl_bytes(self) -> int:
        ring = (
            self.num_channels
            * self.signals.ranks_per_node
            * self.nvl_capacity
            * self.slot.num_bytes
        )
        return _align(self.nvl_ring + ring)


@functools.lru_cache(maxsize=256)
def fit(
    signals: SignalArea,
    num_channels: int,
    experts_per_rank: int,
    slot: SlotLayout,
    num_nvl_bytes: int,
    max_rdma_capacity: int,
    max_nvl_capacity: int,
) -> CallLayout:
    """The largest ring capacities (at most the config's) whose areas fit the two memories; a
    capacity of 0 means not even one slot per ring fits."""
    probe = CallLayout(signals, num_channels, experts_per_rank, slot, 0, 0)
    rdma_rings = 2 * num_channels * signals.num_nodes * slot.num_bytes
    nvl_rings = num_channels * signals.ranks_per_node * slot.num_bytes
    rdma_free = signals.num_rdma_bytes - probe.rdma_bytes - 2 * 128  # two 128-aligned areas
    nvl_free = num_nvl_bytes - probe.nvl_ring - 128
    rdma_capacity = max(0, min(max_rdma_capacity, rdma_free // rdma_rings))
    nvl_capacity = max(0, min(max_nvl_capacity, nvl_free // nvl_rings))
    return CallLayout(signals, num_channels, experts_per_rank, slot, rdma_capacity, nvl_capacity)
