"""What every communication launcher needs to know about its buffer, gathered once per Buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchContext:
    """Peer memory, host block and timing of one Buffer, as kernels see them.

    peer_bases: int64 `[R]` base address of every rank's allocation (signal region at offset 0).
    data_offset: byte offset of the data region inside each allocation.
    host_addr: address of this rank's host block (pinned host memory on GPUs).
    clock_addr: interpreter clock cell (0 on GPUs, which read `%globaltimer`).
    stream: the Buffer's comm stream, where every kernel runs (None on the CPU backend).
    """

    peer_bases: torch.Tensor
    rank: int
    num_ranks: int
    data_offset: int
    host_addr: int
    clock_addr: int
    timeout_ns: int
    use_globaltimer: bool
    stream: torch.cuda.Stream | None = None
