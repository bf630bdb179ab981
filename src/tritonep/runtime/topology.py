"""Where a Buffer's ranks sit: nodes, local indices, the mode a high-throughput call takes, and
which backend (GPU or CPU interpreter) runs the kernels.

One object decides the node arithmetic for every caller: the layout's per-node counts, the routing
of `dispatch`/`combine` (more than one node -> internode), the `rdma_rank`/`nvl_rank` attributes.
A "node" is an NVLink domain of `ranks_per_node` consecutive ranks (V1: 8 when R > 8; here
`TRITONEP_NVL_DOMAIN_SIZE`, default min(R, 8)), so internode semantics can be exercised on one
host (e.g. 2 nodes x 1 rank on two GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _env


@dataclass(frozen=True)
class Topology:
    """Rank `rank` of `num_ranks`, in nodes of `ranks_per_node` consecutive ranks."""

    rank: int
    num_ranks: int
    ranks_per_node: int

    @classmethod
    def from_env(cls, rank: int, num_ranks: int) -> Topology:
        return cls(rank, num_ranks, _env.nvl_domain_size(num_ranks))

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def node(self) -> int:
        """V1's `rdma_rank`: the node this rank belongs to."""
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        """V1's `nvl_rank`: this rank's index inside its node."""
        return self.rank % self.ranks_per_node

    @property
    def is_internode(self) -> bool:
        """High-throughput calls take the internode path when the ranks span several nodes."""
        return self.num_nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node


def select_backend() -> str:
    """`cuda` where CUDA is usable, else `cpu` (Triton interpreter); `TRITONEP_BACKEND` overrides.

    The group's own backend does not decide: DeepEP runs on the GPUs with whatever group it is
    given, and ranks sharing one GPU need a gloo group because NCCL refuses them.
    """
    requested = _env.backend()
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
