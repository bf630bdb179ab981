"""GPU resource hygiene: 100 create/destroy cycles leave device memory where it was."""

import pytest
from conftest import gpu_count


def create_destroy_cycles_task(ctx, cycles=100):
    import torch

    import tritonep

    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    free_before = torch.cuda.mem_get_info()[0]
    for i in range(cycles):
        buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=64 << 20, explicitly_destroy=True)
        if i % 25 == 0:  # move some data now and then, so the kernels' allocations are part of it
            topk_idx = torch.randint(0, 8 * ctx.world_size, (64, 2), device="cuda")
            ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 8 * ctx.world_size)
            x = torch.randn((64, 256), dtype=torch.bfloat16, device="cuda")
            recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=ntr, is_token_in_rank=itr,
                                                         num_tokens_per_expert=nte)
            buffer.combine(recv_x, handle)
            del topk_idx, ntr, nte, itr, x, recv_x, handle
        buffer.destroy()
        del buffer
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {
        "allocated_growth": torch.cuda.memory_allocated() - allocated_before,
        "free_drop": free_before - torch.cuda.mem_get_info()[0],
    }


@pytest.mark.gpu
def test_create_destroy_cycles_do_not_grow_gpu_memory(gpu_pool):
    for result in gpu_pool(gpu_count()).run(create_destroy_cycles_task, timeout=400):
        assert result["allocated_growth"] <= 0, result
        # Peer memory lives outside the caching allocator: the driver's free memory must come back
        # too (a little slack for the CUDA context's own lazily created state).
        assert result["free_drop"] < 64 << 20, result
