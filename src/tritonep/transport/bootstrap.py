"""Host-side collectives used while a Buffer is set up: a torch process group or an mpi4py comm."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..errors import EPInvalidArgument


class Bootstrap:
    """Host-side collectives used while setting a buffer up: a torch process group or an mpi4py
    comm.

    Only small Python objects travel through it (sizes, names, flags), never tensors.
    """

    def __init__(self, group: Any = None, comm: Any = None):
        if group is None and comm is None:
            raise EPInvalidArgument(
                "Buffer: a torch process group (group) or an mpi4py communicator (comm) is "
                "required, got group=None and comm=None"
            )
        self.group = group
        self.comm = comm if group is None else None
        if self.group is not None:
            self.rank = group.rank()
            self.world_size = group.size()
        else:
            self.rank = comm.Get_rank()
            self.world_size = comm.Get_size()

    @property
    def process_group(self):
        return self.group

    def all_gather_object(self, obj: Any) -> list:
        if self.group is None:
            return list(self.comm.allgather(obj))
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is None:
            self.comm.Barrier()
        else:
            # all_gather_object works for every backend without touching a device stream.
            self.all_gather_object(None)
