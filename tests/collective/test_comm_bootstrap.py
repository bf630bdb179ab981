"""`Buffer(None, comm=...)`: bootstrap through an mpi4py-style communicator instead of a process
group.

mpi4py is not a dependency, so the communicator here is a stand-in with mpi4py's methods
(`Get_rank`, `Get_size`, `allgather`, `Barrier`) carried by the test's gloo group.
"""

import torch
import torch.distributed as dist

import tritonep
from tritonep import reference
from tritonep.testing import checks


class GlooComm:
    def __init__(self, group):
        self.group = group

    def Get_rank(self):
        return self.group.rank()

    def Get_size(self):
        return self.group.size()

    def allgather(self, obj):
        out = [None] * self.group.size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def Barrier(self):
        dist.barrier(group=self.group)


def comm_round_task(ctx):
    comm = GlooComm(ctx.group)
    buffer = tritonep.Buffer(None, num_nvl_bytes=4 << 20, comm=comm, explicitly_destroy=True)
    assert buffer.group is comm and buffer.rank == ctx.rank and buffer.group_size == ctx.world_size
    gen = torch.Generator().manual_seed(7 + ctx.rank)
    x = torch.randn((10, 64), generator=gen).to(torch.bfloat16)
    topk_idx, topk_weights = checks.make_routing(10, 8, 2, gen, torch.device("cpu"))
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 8)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        config=tritonep.Config(2, 4, 64),
    )
    ref = reference.dispatch(
        ctx.rank, 8, checks.gather(ctx.group, x), checks.gather(ctx.group, itr)
    )
    assert torch.equal(recv_x, ref["recv_x"])
    combined, _, _ = buffer.combine(recv_x, handle, config=tritonep.Config(2, 4, 64))
    assert torch.equal(combined, (x.float() * itr.sum(1, keepdim=True)).to(torch.bfloat16))
    buffer.destroy()
    return recv_x.size(0)


def test_comm_bootstrap_cpu(cpu_pool):
    assert all(n >= 0 for n in cpu_pool(2).run(comm_round_task, timeout=120))
