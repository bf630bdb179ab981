"""Where the low-latency structures sit in the RDMA memory, for one geometry (T, H, E, R).

All offsets are bytes from this rank's RDMA base (identical on every rank). Two buffer sets are
used in turn (reference §14.4); set p holds:

| region | size | written by | holds |
|---|---|---|---|
| signals[p] | E int64 | peers | dispatch: count of (local expert e, source s) at `e * R + s`, as `epoch << 32 \\| (count + 1)`; combine: "expert g's rows are here" at g, as `epoch << 32 \\| 1` |
| recv[p] | E * T slots | peers | dispatch: message i of (local expert e, source s) in slot `(e * R + s) * T + i`; combine: the row expert g returned for token t in slot `g * T + t` |
| send[p] | max(E*T*2H, T*slot) | this rank | the zero-copy combine buffer `[L, R*T, H]` bf16; put-path staging |

plus one `barrier` array (R int64: the clean barrier's arrivals, by source rank) before them.

Slot: a dispatch message is a 16-byte header (int32 source token index) then the payload (FP8 row
and `G = ceil(H / 128)` fp32 scales, or the BF16 row); a combine row is BF16 or LogFMT-10
(`codecs.logfmt_row_bytes`, 2H + 4G). So a slot is max(2H + 16, 2H + 4G) bytes: V1's own message
sizes, which is why the whole layout fits in `get_low_latency_rdma_size_hint(T, H, R, E)` for every
geometry (checked by tests/unit/test_ll_regions.py). Regions are only 16-byte aligned (128-byte
alignment would overflow the hint for small T); slots are 16-byte aligned when H % 512 == 0.

Signals only ever grow (each call of a set has a larger epoch), so no call resets them and a
stale value can never satisfy a wait of a later call.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER_BYTES = 16
SIGNAL_BYTES = 8


def _align16(value: int) -> int:
    return -(-value // 16) * 16


@dataclass(frozen=True)
class LowLatencyRegions:
    """Byte offsets of the low-latency structures for `T` tokens per rank, hidden `H`, `E` experts
    and `R` ranks."""

    max_tokens: int
    hidden: int
    num_experts: int
    num_ranks: int

    @property
    def num_groups(self) -> int:
        return -(-self.hidden // 128)

    @property
    def slot_bytes(self) -> int:
        return max(2 * self.hidden + HEADER_BYTES, 2 * self.hidden + 4 * self.num_groups)

    @property
    def barrier(self) -> int:
        return 0

    @property
    def signals0(self) -> int:
        return _align16(self.num_ranks * SIGNAL_BYTES)

    @property
    def signals_stride(self) -> int:
        return self.num_experts * SIGNAL_BYTES

    @property
    def recv0(self) -> int:
        return self.signals0 + 2 * self.signals_stride

    @property
    def recv_stride(self) -> int:
        return self.num_experts * self.max_tokens * self.slot_bytes

    @property
    def send0(self) -> int:
        return self.recv0 + 2 * self.recv_stride

    @property
    def send_stride(self) -> int:
        return max(
            self.num_experts * self.max_tokens * 2 * self.hidden, self.max_tokens * self.slot_bytes
        )

    @property
    def num_bytes(self) -> int:
        return self.send0 + 2 * self.send_stride

    def signals(self, parity: int) -> int:
        return self.signals0 + parity * self.signals_stride

    def recv(self, parity: int) -> int:
        return self.recv0 + parity * self.recv_stride

    def send(self, parity: int) -> int:
        return self.send0 + parity * self.send_stride
