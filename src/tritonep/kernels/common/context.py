"""What launchers need to know about their Buffer, gathered once per Buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchContext:
    """NVL memory, high-throughput rank mask, host block and timing of one Buffer, as kernels see
    them (low-latency launchers use rank, host block and timing only).

    peer_bases: int64 `[R]` base address of every rank's NVL allocation (signal region at offset 0).
    data_offset: byte offset of the NVL data region inside each allocation.
    rank_mask: int32 `[R]`, this rank's high-throughput mask (non-zero = masked).
    host_addr: address of this rank's host block (pinned host memory on GPUs).
    clock_addr: interpreter clock cell (0 on GPUs, which read `%globaltimer`).
    all_ranks_on_gpu: every rank of the Buffer runs on this GPU (under MPS); its signals may then
        be ordered at GPU scope (`sync.memory_scope`).
    early_launch: compiled kernels on Hopper or later: a launch may be a programmatic dependent
        of the kernel before it (`sync.wait_previous_launch`).
    """

    peer_bases: torch.Tensor
    rank: int
    num_ranks: int
    data_offset: int
    rank_mask: torch.Tensor
    host_addr: int
    clock_addr: int
    timeout_ns: int
    use_globaltimer: bool
    all_ranks_on_gpu: bool = False
    early_launch: bool = False
