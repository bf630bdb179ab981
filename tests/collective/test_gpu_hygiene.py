"""GPU resource hygiene: 100 create/destroy cycles leave device memory where it was.

One thing is not ours to free: torch's symmetric-memory rendezvous keeps two small device pointer
arrays per rendezvous (512-byte blocks of the caching allocator) after the allocation is freed.
The test measures that bookkeeping with bare torch calls in the same process and allows exactly
that much, so every byte tritonep itself allocates must come back.
"""

import pytest

from conftest import gpu_count


def torch_rendezvous_bookkeeping(group) -> int:
    """Bytes of `torch.cuda.memory_allocated` one bare symm_mem allocate + rendezvous + free
    leaves."""
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tensor = symm_mem.empty(1 << 20, dtype=torch.uint8, device="cuda")
    handle = symm_mem.rendezvous(tensor, group)
    del handle, tensor
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def create_destroy_cycles_task(ctx, cycles=100):
    import torch
    import torch.distributed as dist

    import tritonep

    # Symmetric memory when every rank has a GPU of its own (whatever the machine's GPU count);
    # ranks sharing a GPU use CUDA IPC, where symmetric memory's rendezvous would refuse to run.
    devices = [None] * ctx.world_size
    dist.all_gather_object(
        devices,
        str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid),
        group=ctx.group,
    )
    uses_symm_mem = len(set(devices)) == ctx.world_size
    allowance = torch_rendezvous_bookkeeping(ctx.group) * cycles if uses_symm_mem else 0
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    free_before = torch.cuda.mem_get_info()[0]
    for i in range(cycles):
        buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=64 << 20, explicitly_destroy=True)
        if i % 25 == 0:  # move some data now and then, so the kernels' allocations are part of it
            topk_idx = torch.randint(0, 8 * ctx.world_size, (64, 2), device="cuda")
            ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 8 * ctx.world_size)
            x = torch.randn((64, 256), dtype=torch.bfloat16, device="cuda")
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte
            )
            buffer.combine(recv_x, handle)
            del topk_idx, ntr, nte, itr, x, recv_x, handle
        buffer.destroy()
        del buffer
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {
        "allocated_growth": torch.cuda.memory_allocated() - allocated_before - allowance,
        "torch_rendezvous_allowance": allowance,
        "free_drop": free_before - torch.cuda.mem_get_info()[0],
    }


def check_no_growth(results) -> None:
    for result in results:
        assert result["allocated_growth"] <= 0, result
        assert result["torch_rendezvous_allowance"] <= 2048 * 100, (
            result
        )  # two 512-byte blocks a cycle at most
        # Symmetric memory lives outside the caching allocator: the driver's free memory must come
        # back too (a little slack for the CUDA context's own lazily created state).
        assert result["free_drop"] < 64 << 20, result


@pytest.mark.gpu
def test_create_destroy_cycles_do_not_grow_gpu_memory(gpu_pool):
    check_no_growth(gpu_pool(gpu_count()).run(create_destroy_cycles_task, timeout=400))
