"""Offsets and codes shared by host code and kernels: one source of truth for both.

Each Buffer owns an NVL allocation per rank that starts with a *signal region* (below), followed
by the data region (`num_nvl_bytes`, exposed by `get_local_buffer_tensor`; see
`runtime/memory.py`). Each rank also owns a small *host block* in host-visible memory (pinned on
GPUs) that kernels write and the CPU polls (`runtime/host.py`).

Signal region (int64 slots, offsets in bytes, all 128-byte aligned):

| region | shape | written by | meaning |
|---|---|---|---|
| epoch | [1] | this rank's notify kernel, or the data launch that opens its call | high-throughput calls so far (device side, so graph replays advance it) |
| stop | [1] (byte 8) | this rank's kernels | data kernels of epochs <= stop do no work: the epoch of a refused call, or `STOP_ALL` after a fatal error |
| ticket | [1] (byte 16) | this rank's intranode data launches that open their call | programs counted in so far; zero between launches |
| intranode inbox | [2][R][INBOX_SLOTS] | source rank s (remote) | s's notify message for epochs of parity p: flag, layout key, counts; flag = epoch, written last |
| intranode tails | [MAX_CHANNELS][R] | sender s (remote) | rows s has published into my queue (c, s): `epoch << 32 \\| count` |
| intranode heads | [MAX_CHANNELS][R] | receiver d (remote) | rows d has consumed from my channel-c stream: `epoch << 32 \\| count` |

Every counter carries the epoch in its upper 32 bits, so values left over from an earlier call are
always smaller than anything a waiter of the current call asks for: no call ever resets a counter,
no call needs a barrier to clean up after the previous one, and CUDA-graph replays stay correct
because the epoch itself lives in device memory.

Inbox message of source s (int64 slots): [flag, layout_key, num_tokens, refusal, then int32
payload packed two per slot]: `num_tokens_per_rank_s[0:R]`, `channel_prefix_s[me][0:MAX_CHANNELS]`,
`num_tokens_per_expert_s[me*L : me*L + L]`. Messages alternate between two sets by epoch parity: a
rank can run at most one call ahead of a peer's notify (it needs that peer's flag of the current
epoch to pass its own notify), so the set it writes is never the one the peer still reads.

Queue heads are first published (epoch, 0) by the notify kernel (or program 0 of a data launch
that opens its call), which runs after this rank's previous data kernel finished: a sender that sees a head of the current epoch knows the receiver no
longer reads anything of the previous call, whatever queue geometry that call used.

Host block (int64): `[ready, num_recv_tokens, error record (ERROR_SLOTS), overflow, bad expert id
record (4), ranks masked by a low-latency timeout (bits), per-expert counts (MAX_LOCAL_EXPERTS)]`.
`ready` holds the host-chosen token of the
counting notify that filled the counts. The error record is `[claim, rank, peer, phase, channel,
observed, expected, code]`: the first reporter claims it, `code` is written last.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

MAX_CHANNELS = 128  # num_sms <= 256
MAX_LOCAL_EXPERTS = 1024  # reference §15.1: E / R <= 1024
ALIGN = 128

# The low-latency launches count on two programs of each LL kernel sharing an SM: the host sizes
# the launches of up to two ranks sharing a GPU for it (`modes.low_latency.resident_program_budget`;
# more ranks take one per SM), and the kernels are compiled with at most the register file's share
# of a program per thread.
LL_PROGRAMS_PER_SM = 2
REGISTERS_PER_SM = 65536  # sm_80 to sm_100


def ll_register_cap(num_warps: int) -> int:
    """Most registers per thread that keep `LL_PROGRAMS_PER_SM` programs of `num_warps` warps on an
    SM. A fused launch whose programs are not all resident spins until its timeout, so ptxas must
    spill rather than exceed it. Without the cap the fused LogFMT combine of two ranks sharing an
    H200 timed out (Triton 3.6, 2026-12-01); with it, it passes."""
    return REGISTERS_PER_SM // (LL_PROGRAMS_PER_SM * num_warps * 32)


# Phases named in device error records (reference §14.7), and what the record's "channel" slot holds.
PHASE_NOTIFY, PHASE_DISPATCH, PHASE_COMBINE = 1, 2, 3
PHASE_LL_DISPATCH, PHASE_LL_COMBINE, PHASE_LL_CLEAN = 5, 6, 7
PHASE_NAMES = {
    PHASE_NOTIFY: "notify",
    PHASE_DISPATCH: "dispatch",
    PHASE_COMBINE: "combine",
    PHASE_LL_DISPATCH: "low-latency dispatch",
    PHASE_LL_COMBINE: "low-latency combine",
    PHASE_LL_CLEAN: "low-latency clean barrier",
}


def channel_word(phase: int) -> str:
    """What the error record's channel slot counts in `phase`: HT channels, LL local experts."""
    return "local expert" if phase in (PHASE_LL_DISPATCH, PHASE_LL_COMBINE) else "channel"


# Error codes in device error records.
ERR_TIMEOUT = 1
ERR_LAYOUT_MISMATCH = 2  # ranks disagree on the call's geometry (hidden, top-k, config ...)
ERR_REFUSED = (
    4  # a rank cannot run the call with its queues (CPU backend: a queue must hold a channel)
)
ERROR_SLOTS = 8  # [claim, rank, peer, phase, channel, observed, expected, code]

HOST_READY = 0
HOST_NUM_RECV = 1
HOST_ERROR = 2
HOST_ERROR_CODE = HOST_ERROR + ERROR_SLOTS - 1
# Rows a worst-case dispatch received beyond num_worst_tokens (dropped): a caller error that stops
# nothing, so it lives outside the error record (which stops every later kernel of the buffer).
HOST_OVERFLOW = HOST_ERROR + ERROR_SLOTS
# The first expert id >= num_experts a layout kernel met: [token + 1, k, id, num_experts]. Also a
# caller error that stops nothing; the next call on the Buffer reports it.
HOST_BAD_EXPERT = HOST_OVERFLOW + 1
# Low-latency shrink mode: bit s set when a wait on rank s timed out and the kernel masked s. The
# host warns about it at its next look and clears it.
HOST_SHRUNK = HOST_BAD_EXPERT + 4
HOST_EXPERT_COUNTS = HOST_SHRUNK + 1
HOST_SLOTS = HOST_EXPERT_COUNTS + MAX_LOCAL_EXPERTS

# The stop word (device memory, beside the epoch): kernels read it instead of the host block's error
# record, because every read of pinned host memory is a PCIe round trip, and those of a grid's
# programs queue behind each other (measured: ~8 us per program on H200).
STOP_OFFSET = 8
STOP_ALL = 1 << 62
# The ticket word (device memory, beside the stop word): the programs of a data launch that opens
# its call itself count in here, and the last one advances the epoch (kernels/intranode/notify.py,
# `open_call_in_launch`). Zero between launches.
TICKET_OFFSET = 16

INBOX_HEADER_SLOTS = 4  # flag, layout key, num_tokens, refusal (rows a queue would need, 0 = fine)


def align_up(value: int, alignment: int = ALIGN) -> int:
    return (value + alignment - 1) // alignment * alignment


def inbox_slots(num_ranks: int) -> int:
    payload_ints = num_ranks + MAX_CHANNELS + MAX_LOCAL_EXPERTS
    return align_up(INBOX_HEADER_SLOTS + (payload_ints + 1) // 2, 16)


@functools.lru_cache(maxsize=64)
def signal_layout(num_ranks: int) -> SignalLayout:
    """The (immutable, cached) signal-region layout for `num_ranks` ranks."""
    return SignalLayout(num_ranks)


@dataclass(frozen=True)
class SignalLayout:
    """Byte offsets of the signal region for `num_ranks` ranks (identical on every rank)."""

    num_ranks: int

    @functools.cached_property
    def epoch(self) -> int:
        return 0

    @functools.cached_property
    def inbox(self) -> int:
        return ALIGN

    @functools.cached_property
    def inbox_stride(self) -> int:
        """Bytes between two sources' inbox messages."""
        return inbox_slots(self.num_ranks) * 8

    @functools.cached_property
    def tails(self) -> int:
        return align_up(self.inbox + 2 * self.num_ranks * self.inbox_stride)

    @functools.cached_property
    def heads(self) -> int:
        return align_up(self.tails + MAX_CHANNELS * self.num_ranks * 8)

    @functools.cached_property
    def num_bytes(self) -> int:
        return align_up(self.heads + MAX_CHANNELS * self.num_ranks * 8)
