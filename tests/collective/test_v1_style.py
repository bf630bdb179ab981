"""DeepEP V1 user code runs unchanged: the call patterns of V1's intranode test, via `import
tritonep as deep_ep`.

Written independently in the style of V1's own test (positional constructor, dict-of-kwargs calls,
`handle[0]` block checks, constant-per-rank rows, cached dispatch, `set_num_sms` +
`get_dispatch_config`), at CPU-backend sizes.
"""

import torch
import torch.distributed as dist

from tritonep.testing import checks


def v1_style_task(ctx, num_sms=4):
    import tritonep as deep_ep

    rank, num_ranks, group = ctx.rank, ctx.world_size, ctx.group
    num_tokens, hidden, num_topk, num_experts = 24, 128, 4, (16 // num_ranks) * num_ranks
    buffer = deep_ep.Buffer(group, int(1e9), 0, low_latency_mode=False, num_qps_per_rank=1)
    torch.manual_seed(rank)
    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16) * rank
    x_rand = torch.randn((num_tokens, hidden), dtype=torch.bfloat16)
    x_fp8 = checks.per_token_cast_to_fp8(x)
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1]
    topk_weights = torch.ones((num_tokens, num_topk), dtype=torch.float32) * rank
    topk_weights_rand = torch.randn((num_tokens, num_topk), dtype=torch.float32)

    owner = topk_idx // (num_experts // num_ranks)
    is_token_in_rank = torch.stack([(owner == j).any(1) for j in range(num_ranks)], dim=1)
    num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int)
    num_tokens_per_expert = torch.stack([(topk_idx == e).sum() for e in range(num_experts)]).to(
        torch.int
    )
    gbl_per_rank = num_tokens_per_rank.clone()
    dist.all_reduce(gbl_per_rank, group=group)
    gbl_per_expert = num_tokens_per_expert.clone()
    dist.all_reduce(gbl_per_expert, group=group)

    ref_ntr, _, ref_nte, ref_itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    assert torch.allclose(ref_ntr, num_tokens_per_rank)
    assert torch.allclose(ref_nte, num_tokens_per_expert)
    assert torch.equal(ref_itr, is_token_in_rank)

    config = deep_ep.Config(num_sms, 8, 256)

    def check_blocks(received, prefix):
        # Constant-per-rank rows: block i of the output holds rank i's value only.
        start = 0
        for i in range(num_ranks):
            end = prefix[i][rank].item()
            assert (received[start:end].float() - i).abs().sum().item() == 0
            start = end

    for previous_mode in (False, True):
        for async_mode in (False, True):
            for current_x in (x_rand, x, x_fp8):
                for with_topk in (False, True):
                    args = {
                        "x": current_x,
                        "num_tokens_per_rank": num_tokens_per_rank,
                        "is_token_in_rank": is_token_in_rank,
                        "num_tokens_per_expert": num_tokens_per_expert,
                        "config": config,
                        "async_finish": async_mode,
                    }
                    if with_topk:
                        args.update(
                            {
                                "topk_idx": topk_idx,
                                "topk_weights": topk_weights_rand
                                if current_x is x_rand
                                else topk_weights,
                            }
                        )
                    if previous_mode:
                        args.update({"previous_event": buffer.capture()})
                    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, event = (
                        buffer.dispatch(**args)
                    )
                    if async_mode:
                        event.current_stream_wait()
                    if isinstance(recv_x, tuple):
                        recv_x = (
                            recv_x[0].float().view(-1, hidden // 128, 128) * recv_x[1].unsqueeze(2)
                        ).view(-1, hidden)
                    prefix = handle[0]
                    assert gbl_per_rank[rank].item() == recv_x.size(0)
                    assert gbl_per_expert.view(num_ranks, -1)[rank].tolist() == per_expert
                    if current_x is not x_rand:
                        check_blocks(recv_x, prefix)
                    if with_topk:
                        valid = recv_topk_idx.eq(-1) | (
                            (recv_topk_idx >= 0) & (recv_topk_idx < num_experts // num_ranks)
                        )
                        assert valid.all()
                        for i, count in enumerate(per_expert):
                            assert recv_topk_idx.eq(i).sum().item() == count
                        if current_x is not x_rand:
                            # As V1's test does: give the unselected slots the row's weight (in
                            # place).
                            unselected = recv_topk_idx.eq(-1)
                            row_max = recv_topk_weights.amax(dim=1, keepdim=True).expand_as(
                                recv_topk_weights
                            )
                            recv_topk_weights[unselected] = row_max[unselected]
                            check_blocks(recv_topk_weights, prefix)
                    else:
                        cached_args = {
                            "x": current_x,
                            "handle": handle,
                            "config": config,
                            "async_finish": async_mode,
                        }
                        if previous_mode:
                            cached_args.update({"previous_event": buffer.capture()})
                        cached_x, _, _, _, _, event = buffer.dispatch(**cached_args)
                        if async_mode:
                            event.current_stream_wait()
                        if isinstance(cached_x, tuple):
                            cached_x = cached_x[0]
                            assert torch.equal(
                                cached_x.view(torch.uint8),
                                buffer.dispatch(current_x, handle=handle, config=config)[0][0].view(
                                    torch.uint8
                                ),
                            )
                        elif current_x is not x_rand:
                            check_blocks(cached_x, prefix)
                    combine_args = {
                        "x": recv_x.to(torch.bfloat16),
                        "handle": handle,
                        "config": config,
                        "async_finish": async_mode,
                    }
                    if with_topk:
                        combine_args.update({"topk_weights": recv_topk_weights})
                    if previous_mode:
                        combine_args.update({"previous_event": buffer.capture()})
                    combined_x, combined_w, event = buffer.combine(**combine_args)
                    if async_mode:
                        event.current_stream_wait()
                    if current_x is not x_fp8:
                        check = combined_x.float() / is_token_in_rank.sum(dim=1).unsqueeze(1)
                        ref = x_rand if current_x is x_rand else x
                        assert torch.allclose(check, ref.float(), rtol=1e-2, atol=1e-2)
                    if with_topk:
                        if current_x is x_rand:
                            assert torch.allclose(combined_w, topk_weights_rand)
                        else:
                            assert torch.allclose(
                                combined_w / is_token_in_rank.sum(dim=1).unsqueeze(1), topk_weights
                            )

    # The default-config path of V1's tuning loop.
    deep_ep.Buffer.set_num_sms(num_sms)
    for get_config in (deep_ep.Buffer.get_dispatch_config, deep_ep.Buffer.get_combine_config):
        assert get_config(num_ranks).num_sms == num_sms
    buffer.dispatch(x, handle=handle, config=deep_ep.Buffer.get_dispatch_config(num_ranks))
    recv_x = buffer.dispatch(x, handle=handle, config=config)[0]
    buffer.combine(recv_x, handle, config=deep_ep.Buffer.get_combine_config(num_ranks))
    deep_ep.Buffer.set_num_sms(20)
    return recv_x.size(0)


def test_v1_style_intranode_cpu(cpu_pool):
    assert all(n > 0 for n in cpu_pool(2).run(v1_style_task, timeout=600))
