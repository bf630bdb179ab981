"""Rank masking in the high-throughput mode (tritonep extension; issue 4).

Three ranks: rank 2 is masked by ranks 0 and 1 and masks both of them in turn; every rank keeps
making the same calls. Results must equal the reference in which each rank's experts on masked
ranks are unselected, nobody may wait for a masked rank, and after `clean_mask_buffer` the full
exchange must be exact again.
"""

import torch

import tritonep
from tritonep import reference
from tritonep.testing import checks


def _effective_routing(topk_idx, masked_ranks, experts_per_rank):
    owner = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, -1)
    dropped = torch.zeros_like(topk_idx, dtype=torch.bool)
    for r in masked_ranks:
        dropped |= owner == r
    return topk_idx.masked_fill(dropped, -1)


def masked_round_task(ctx, seed, num_tokens=12, hidden=64, num_topk=3, num_experts=12):
    group, rank, world = ctx.group, ctx.rank, ctx.world_size
    buffer = checks.get_buffer(ctx, (8 << 20) + 128)  # its own buffer: masks are per Buffer
    device = checks.device_of(buffer)
    experts_per_rank = num_experts // world
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16).to(device)
    topk_idx, topk_weights = checks.make_routing(
        num_tokens, num_experts, num_topk, gen, device, drop=0.0
    )
    masked = {2} if rank != 2 else set(range(world)) - {2}
    for r in masked:
        buffer.update_mask_buffer(r, True)
    status = torch.empty(world, dtype=torch.int32, device=device)
    buffer.query_mask_buffer(status)
    assert status.tolist() == [int(r in masked) for r in range(world)], status
    config = tritonep.Config(4, 4, 64)

    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    effective = _effective_routing(topk_idx.cpu(), masked, experts_per_rank)
    want = reference.layout(effective, num_experts, world, world)
    for name, got, ref in zip(
        ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
        (ntr, nte, itr),
        (want[0], want[2], want[3]),
        strict=False,
    ):
        assert torch.equal(got.cpu(), ref), f"masked layout {name}: {got} != {ref}"
    assert int(ntr[2 if rank != 2 else 0]) == 0, "a masked rank must receive no tokens"

    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        config=config,
    )
    all_itr = checks.gather(group, itr)
    all_x = checks.gather(group, x)
    all_idx = checks.gather(group, topk_idx)
    all_w = checks.gather(group, topk_weights)
    # What reaches this rank: nothing from ranks it masked (their columns for us are zero as well).
    sources = [s for s in range(world) if s not in masked]
    ref_x = torch.cat([all_x[s][all_itr[s][:, rank]] for s in sources])
    assert torch.equal(recv_x.cpu(), ref_x), "masked dispatch: rows differ from the reference"
    ref = reference.dispatch(
        rank,
        num_experts,
        [all_x[s] if s in sources else all_x[s][:0] for s in range(world)],
        [all_itr[s] if s in sources else all_itr[s][:0] for s in range(world)],
        [all_idx[s] if s in sources else all_idx[s][:0] for s in range(world)],
        [all_w[s] if s in sources else all_w[s][:0] for s in range(world)],
    )
    assert torch.equal(recv_idx.cpu(), ref["recv_topk_idx"]) and torch.equal(
        recv_w.cpu(), ref["recv_topk_weights"]
    )
    assert counts == ref["num_recv_tokens_per_expert"], (counts, ref["num_recv_tokens_per_expert"])
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, config=config)
    # Each token comes back once from every unmasked rank it went to.
    copies = itr.cpu().sum(1, keepdim=True)
    want_x = (x.cpu().float() * copies).to(torch.bfloat16)
    assert torch.equal(combined.cpu(), want_x), "masked combine differs"
    restored = torch.where(effective >= 0, topk_weights.cpu(), torch.zeros_like(topk_weights.cpu()))
    assert torch.equal(combined_w.cpu(), restored), "masked combine weights differ"

    # Unmask and run the full exchange again.
    buffer.clean_mask_buffer()
    buffer.query_mask_buffer(status)
    assert status.tolist() == [0] * world
    return checks.check_intranode(
        ctx,
        num_tokens=num_tokens,
        hidden=hidden,
        num_topk=num_topk,
        num_experts=num_experts,
        num_nvl_bytes=(8 << 20) + 128,
        matrix="quick",
        seed=seed,
    )["num_recv"]


def mask_argument_task(ctx):
    buffer = checks.get_buffer(ctx, (8 << 20) + 128)
    problems = []
    for args, word in (
        ((ctx.rank, True), "itself"),
        ((ctx.world_size, True), "rank_to_mask"),
        ((-1, False), "rank_to_mask"),
    ):
        try:
            buffer.update_mask_buffer(*args)
            problems.append(f"update_mask_buffer{args} did not raise")
        except tritonep.EPInvalidArgument as e:
            if word not in str(e):
                problems.append(f"update_mask_buffer{args}: message {e} does not mention {word}")
    try:
        buffer.query_mask_buffer(torch.empty(ctx.world_size + 1, dtype=torch.int32))
        problems.append("query_mask_buffer with a wrong size did not raise")
    except tritonep.EPInvalidArgument:
        pass
    return problems


def test_masked_rank_is_left_out_cpu(cpu_pool):
    pool = cpu_pool(3)
    for seed in (1, 2):
        results = pool.run(masked_round_task, seed, timeout=300)
        assert all(r > 0 for r in results), results
    assert pool.run(mask_argument_task, timeout=60) == [[], [], []]
