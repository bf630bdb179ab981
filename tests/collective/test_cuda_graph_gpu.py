"""CUDA graphs (reference §14.8): cached dispatch, combine and worst-case dispatch capture and
replay.

The notify kernel advances the epoch in device memory, so replays of one captured call keep the
ranks' queue counters consistent; every replay is checked against the reference.
"""

import pytest

from conftest import gpu_count


def graph_task(ctx, num_tokens=1024, hidden=2048, num_topk=4, num_experts_per_rank=8, replays=3):
    import torch

    import tritonep
    from tritonep import reference
    from tritonep.testing import checks

    group, rank, world = ctx.group, ctx.rank, ctx.world_size
    num_experts = num_experts_per_rank * world
    buffer = checks.get_buffer(ctx, int(1e9))
    device = checks.device_of(buffer)
    gen = torch.Generator().manual_seed(rank)
    topk_idx, topk_weights = checks.make_routing(num_tokens, num_experts, num_topk, gen, device)
    x = torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16).to(device)
    config = tritonep.Config(24, 6, 256)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    _, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte, config=config
    )
    worst = num_tokens * world
    static_x = x.clone()

    def calls():
        recv = buffer.dispatch(static_x, handle=handle, config=config)[0]
        combined = buffer.combine(recv, handle, config=config)[0]
        worst_x, worst_idx, _, _, _, _ = buffer.dispatch(
            static_x,
            num_tokens_per_rank=ntr,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_worst_tokens=worst,
            config=config,
        )
        return recv, combined, worst_x, worst_idx

    calls()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv, combined, worst_x, worst_idx = calls()
    for i in range(replays):
        fresh = torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16).to(device)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.dispatch(
            rank,
            num_experts,
            checks.gather(group, fresh),
            checks.gather(group, itr),
            checks.gather(group, topk_idx),
            checks.gather(group, topk_weights),
        )
        num_recv = ref["recv_x"].size(0)
        assert torch.equal(recv.cpu(), ref["recv_x"]), f"replay {i}: cached dispatch"
        assert torch.equal(worst_x[:num_recv].cpu(), ref["recv_x"]), (
            f"replay {i}: worst-case dispatch"
        )
        assert torch.equal(worst_idx[:num_recv].cpu(), ref["recv_topk_idx"]), (
            f"replay {i}: worst-case top-k"
        )
        assert bool((worst_idx[num_recv:] == -1).all()), f"replay {i}: worst-case padding"
        want = (fresh.float() * itr.sum(1, keepdim=True)).to(torch.bfloat16)
        assert torch.equal(combined, want), f"replay {i}: combine"
    return replays


@pytest.mark.gpu
def test_cuda_graph_replays_gpu(gpu_pool):
    assert all(r == 3 for r in gpu_pool(gpu_count()).run(graph_task, timeout=300))
