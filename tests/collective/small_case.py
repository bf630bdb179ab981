"""Small hand-checkable round trips and leak checks shared by the lifecycle and fault tests."""

from __future__ import annotations

import torch

import tritonep
from tritonep.transport.shm import process_alive as pid_alive
from tritonep.transport.shm import tritonep_files

NUM_TOKENS, NUM_TOPK, NUM_EXPERTS = 6, 2, 4


def shm_leaks(own_pids=()) -> list[str]:
    """tritonep's /dev/shm files, minus those a *live* process of another test session is creating
    right now. A file counts as leaked if its creator is one of `own_pids`, if its creator no
    longer exists, or if its name does not carry a creator pid at all.
    """
    return [
        path
        for path, pid in tritonep_files()
        if pid is None or pid in own_pids or not pid_alive(pid)
    ]


def routing(rank: int, seed: int) -> torch.Tensor:
    """Distinct experts per token, one slot -1; every rank can rebuild every rank's routing."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    idx = torch.topk(torch.rand((NUM_TOKENS, NUM_EXPERTS), generator=gen), NUM_TOPK, dim=-1).indices
    idx[0, NUM_TOPK - 1] = -1
    return idx.to(tritonep.topk_idx_t)


def tokens(rank: int, hidden: int) -> torch.Tensor:
    """Rows exact in bf16 (and after summing two copies): 16 * rank + token + (column % 4) / 4."""
    rows = (16 * rank + torch.arange(NUM_TOKENS, dtype=torch.float32))[:, None]
    cols = (torch.arange(hidden, dtype=torch.float32) % 4 / 4)[None, :]
    return (rows + cols).to(torch.bfloat16)


def in_rank(idx: torch.Tensor, num_ranks: int) -> torch.Tensor:
    owner = torch.where(idx >= 0, idx // (NUM_EXPERTS // num_ranks), -1)
    return torch.stack([(owner == j).any(1) for j in range(num_ranks)], dim=1)
