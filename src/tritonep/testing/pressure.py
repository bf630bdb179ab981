"""Pressure test: many randomized dispatch/combine rounds, each checked and hashed twice.

    tritonep pressure --rounds 10000 --json benchmarks/results/pressure.json
    python -m tritonep.testing.pressure --rounds 20 --backend cpu --ranks 3   # the same command

Every round draws a geometry from its seed (tokens, hidden size, top-k, experts, SM count, chunk,
queue capacity; BF16 or FP8; routing with -1 slots and skewed experts; non-cached, cached or
worst-case dispatch), runs layout -> dispatch -> cached dispatch -> combine, compares every output
with the plain-torch reference (exactly), and then runs the same round again: the two runs must
hash identically (a moving result is a race). The summary reports rounds, failures and a digest of
all round hashes, which is identical for identical seeds.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Callable

import torch

import tritonep
from tritonep import reference
from tritonep.testing import checks

# Queue capacities: small ones make the GPU wrap its rings under back-pressure; the interpreter
# needs a queue to hold a whole channel (it runs a launch's programs one after another).
# On the GPU every new hidden size, top-k or chunk tile is a new compile (seconds): the GPU space
# draws them from short lists so that compiles amortise and rounds stay cheap; token counts,
# experts, SMs, queue sizes, routing and modes vary freely.
GPU_SPACE = dict(
    tokens=(0, 3000),
    hidden=(256, 2048, 7168),
    topk=(1, 8),
    experts_per_rank=(1, 48),
    sms=(2, 48),
    chunks=(3, 8),
    capacities=("chunk+1", "2chunk", 64, 256),
)
CPU_SPACE = dict(
    tokens=(0, 24),
    hidden=range(16, 161, 16),
    topk=range(1, 5),
    experts_per_rank=(1, 4),
    sms=(2, 6),
    chunks=range(1, 9),
    capacities=(64, 256),
)


def draw_case(seed: int, num_ranks: int, space: dict) -> dict:
    """The round's geometry; identical on every rank for one seed."""
    rng = random.Random(seed)
    hidden = rng.choice(space["hidden"])
    experts = num_ranks * rng.randint(*space["experts_per_rank"])
    chunk = rng.choice(space["chunks"])
    return dict(
        num_tokens=[rng.randint(*space["tokens"]) for _ in range(num_ranks)],
        hidden=hidden,
        num_topk=min(rng.choice(space["topk"]), experts),
        num_experts=experts,
        num_sms=2 * rng.randint(1, space["sms"][1] // 2),
        chunk=chunk,
        capacity={"chunk+1": chunk + 1, "2chunk": 2 * chunk}.get(
            c := rng.choice(space["capacities"]), c
        ),
        fp8=hidden % 128 == 0 and rng.random() < 0.4,
        mode=rng.choice(["plain", "plain", "cached", "worst"]),
        drop=rng.choice([0.0, 0.1, 0.5]),
        skew=rng.choice([0.0, 0.0, 3.0]),
    )


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _run_once(buffer, case, x, topk_idx, topk_weights, config):
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, case["num_experts"])
    worst = sum(case["num_tokens"]) if case["mode"] == "worst" else 0
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_worst_tokens=max(worst, 0),
        config=config,
    )
    if case["mode"] == "cached":
        recv_x = buffer.dispatch(x, handle=handle, config=config)[0]
    data = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    y = data if not case["fp8"] else data.to(torch.float32).to(torch.bfloat16)
    combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, config=config)
    return dict(
        itr=itr,
        recv_x=recv_x,
        recv_idx=recv_idx,
        recv_w=recv_w,
        counts=counts,
        handle=handle,
        y=y,
        combined=combined,
        combined_w=combined_w,
    )


def pressure_round(ctx, seed: int, space: dict) -> str:
    """One checked, twice-run round on this rank; returns its output hash."""
    num_ranks, rank, group = ctx.world_size, ctx.rank, ctx.group
    case = draw_case(seed, num_ranks, space)
    buffer = checks.get_buffer(ctx, int(2e9) if space is GPU_SPACE else 16 << 20)
    device = checks.device_of(buffer)
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    num_tokens = case["num_tokens"][rank]
    x = torch.randn((num_tokens, case["hidden"]), generator=gen).to(torch.bfloat16).to(device)
    if case["fp8"]:
        x = checks.per_token_cast_to_fp8(x)
    topk_idx, topk_weights = checks.make_routing(
        num_tokens,
        case["num_experts"],
        case["num_topk"],
        gen,
        device,
        drop=case["drop"],
        skew=case["skew"],
    )
    config = tritonep.Config(case["num_sms"], case["chunk"], case["capacity"])
    first = _run_once(buffer, case, x, topk_idx, topk_weights, config)
    data = first["recv_x"][0] if case["fp8"] else first["recv_x"]
    num_recv = int(first["handle"][0][-1, rank])
    ref = reference.dispatch(
        rank,
        case["num_experts"],
        checks.gather(group, x[0] if case["fp8"] else x),
        checks.gather(group, first["itr"]),
        checks.gather(group, topk_idx),
        checks.gather(group, topk_weights),
        checks.gather(group, x[1]) if case["fp8"] else None,
    )
    tag = f"pressure round {seed} {case}"
    assert torch.equal(data[:num_recv].cpu().view(torch.uint8), ref["recv_x"].view(torch.uint8)), (
        f"{tag}: recv_x"
    )
    if case["fp8"]:
        assert torch.equal(first["recv_x"][1][:num_recv].cpu(), ref["recv_scales"]), (
            f"{tag}: scales"
        )
    assert torch.equal(first["recv_idx"][:num_recv].cpu(), ref["recv_topk_idx"]), (
        f"{tag}: recv_topk_idx"
    )
    assert torch.equal(first["recv_w"][:num_recv].cpu(), ref["recv_topk_weights"]), (
        f"{tag}: recv_topk_weights"
    )
    if case["mode"] == "plain":
        assert first["counts"] == ref["num_recv_tokens_per_expert"], f"{tag}: per-expert counts"
    blocks = checks.combine_blocks(group, rank, first["handle"])
    want, want_w = reference.combine(
        rank,
        checks.gather(group, first["y"]),
        blocks,
        num_tokens,
        weights=checks.gather(group, first["recv_w"]),
    )
    assert torch.equal(first["combined"].cpu(), want), f"{tag}: combined_x"
    assert torch.equal(first["combined_w"].cpu(), want_w), f"{tag}: combined_topk_weights"
    digest = _digest(
        data[:num_recv], first["handle"][3][:num_recv], first["combined"], first["combined_w"]
    )
    second = _run_once(buffer, case, x, topk_idx, topk_weights, config)
    data2 = second["recv_x"][0] if case["fp8"] else second["recv_x"]
    again = _digest(
        data2[:num_recv], second["handle"][3][:num_recv], second["combined"], second["combined_w"]
    )
    assert again == digest, (
        f"{tag}: a rerun of the same inputs hashed differently ({digest} vs {again})"
    )
    return digest


def run_rounds(
    ctx,
    first_seed: int,
    num_rounds: int,
    space: dict,
    seconds: float = 0.0,
    on_round: Callable[[int, bool], None] | None = None,
) -> dict:
    """Run rounds [first_seed, first_seed + num_rounds); returns count, failures and a digest.

    `seconds` > 0: no round starts once rank 0 has spent that long (the ranks agree each round).
    `on_round(seed, failed_so_far)` runs after each round (the CLI's progress report). Five
    failures stop the run.
    """
    overall = hashlib.sha256()
    failures = []
    started = time.perf_counter()
    rounds = 0
    for seed in range(first_seed, first_seed + num_rounds):
        if seconds > 0 and checks.gather(ctx.group, time.perf_counter() - started > seconds)[0]:
            break
        rounds += 1
        try:
            overall.update(pressure_round(ctx, seed, space).encode())
        except AssertionError as e:
            failures.append(str(e)[:500])
        if on_round is not None:
            on_round(seed, bool(failures))
        if len(failures) >= 5:
            break
    return {
        "rounds": rounds,
        "failures": failures,
        "digest": overall.hexdigest()[:16],
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    from tritonep.cli import main

    sys.exit(main(["pressure", *sys.argv[1:]]))
