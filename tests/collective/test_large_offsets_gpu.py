"""Byte offsets beyond 2**31 (STYLE B2.7): a dispatch whose output exceeds 2 GiB, checked on device.

Each token row carries (source rank, token index) in its first two int32 words and the last word;
every received row must carry its own source's id in the spec's order, combine must return 2x.
"""

import pytest

from conftest import gpu_count


def large_offsets_task(ctx, num_tokens=160_000, hidden=7168):
    import torch

    import tritonep
    from tritonep.testing import checks

    rank, world = ctx.rank, ctx.world_size
    buffer = checks.get_buffer(ctx, int(2e9))
    device = checks.device_of(buffer)
    x = torch.zeros((num_tokens, hidden), dtype=torch.bfloat16, device=device)
    words = x.view(torch.int32)
    tokens = torch.arange(num_tokens, device=device, dtype=torch.int32)
    words[:, 0] = rank
    words[:, 1] = tokens
    words[:, -1] = tokens
    # Every token goes to every rank: each rank receives world * num_tokens rows (> 2 GiB).
    topk_idx = (torch.arange(world, device=device) * 2).repeat(num_tokens, 1)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 2 * world)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        config=tritonep.Config(24, 6, 256),
    )
    assert recv_x.numel() * recv_x.element_size() > 2**31
    got = recv_x.view(torch.int32)
    want_rank = torch.arange(world, device=device, dtype=torch.int32).repeat_interleave(num_tokens)
    want_token = tokens.repeat(world)
    assert torch.equal(got[:, 0], want_rank) and torch.equal(got[:, 1], want_token)
    assert torch.equal(got[:, -1], want_token)
    combined, _, _ = buffer.combine(recv_x, handle, config=tritonep.Config(24, 4, 256))
    # Columns from 2 on are the same on every rank (word 0 holds the rank): the sum is world x.
    assert torch.equal(combined[-1, 2:], (x[-1, 2:].float() * world).to(torch.bfloat16))
    del recv_x, got, combined
    torch.cuda.empty_cache()
    return True


@pytest.mark.gpu
def test_outputs_beyond_2gib_gpu(gpu_pool):
    assert all(gpu_pool(gpu_count()).run(large_offsets_task, timeout=400))
