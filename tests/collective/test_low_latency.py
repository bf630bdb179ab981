"""Low-latency mode against the plain-torch reference (`tritonep.testing.low_latency`).

CPU: rank processes in the Triton interpreter, tiny shapes: DeepEP V1's whole combination matrix
on 2 ranks, a quick subset on 3 and 4 ranks, the emulated put path (`TRITONEP_FORCE_PUT=1`), odd
shapes (hidden not a multiple of 512, one top-k slot, a rank with no tokens), repeatability,
shrink mode with a dead rank, a timeout without it.
GPU: the same checks at DeepEP's shape with ranks sharing one GPU (see test_low_latency_gpu.py).
"""

import re

import pytest

from tritonep.testing import low_latency as ll

SHAPE = dict(num_tokens=5, hidden=640, num_topk=3, max_tokens=8)
QUICK = [
    dict(use_fp8=True, round_scale=True, use_ue8m0=True, hook=True, twice=True, use_logfmt=True),
    dict(use_fp8=False, zero_copy=True, with_out=True),
    dict(use_fp8=True, hook=True),
]


def check_matrix(pool, combos, timeout=600, **shape) -> None:
    """Every rank of `pool` checks every combination of `combos` at `shape`."""
    results = pool.run(ll.check_low_latency_matrix, combos, **shape, timeout=timeout)
    assert results == [len(combos)] * pool.world_size


def test_low_latency_pairwise_matrix_two_ranks_cpu(cpu_pool):
    """Every pair of option values together (the full 96-combination product runs on GPUs)."""
    check_matrix(cpu_pool(2), ll.pairwise_matrix(), timeout=900, num_experts=8, **SHAPE)


@pytest.mark.parametrize("world_size", [pytest.param(3, marks=pytest.mark.slow), 4])
def test_low_latency_quick_cpu(cpu_pool, world_size):
    check_matrix(cpu_pool(world_size), QUICK, num_experts=2 * world_size, **SHAPE)


def test_low_latency_emulated_put_path_cpu(cpu_pool):
    """Every peer through the put path (what another node gets), emulated over /dev/shm."""
    check_matrix(cpu_pool(2, TRITONEP_FORCE_PUT="1"), QUICK, num_experts=6, **SHAPE)


@pytest.mark.parametrize(
    "put", [pytest.param(False, marks=pytest.mark.slow), True], ids=["stores", "put"]
)
def test_low_latency_logfmt_rows_in_several_steps_cpu(cpu_pool, put):
    """LogFMT rows longer than one encode / decode step (G = 10 groups, 8 per step at top-8): the
    partial last step of every row, on both sides, over stores and over the put path's ring."""
    pool = cpu_pool(2, TRITONEP_FORCE_PUT="1") if put else cpu_pool(2)
    combos = [dict(use_logfmt=True, with_out=True), dict(use_fp8=True, use_logfmt=True, hook=True)]
    check_matrix(
        pool, combos, num_tokens=6, hidden=1280, num_topk=8, num_experts=8, max_tokens=8, drop=0.2
    )


def test_low_latency_odd_shapes_cpu(cpu_pool):
    combos = [
        dict(use_fp8=True, round_scale=True, use_ue8m0=True),
        dict(use_logfmt=True, hook=True),
    ]
    check_matrix(
        cpu_pool(3),
        combos,
        num_tokens=[4, 0, 7],
        hidden=384,
        num_topk=1,
        num_experts=3,
        max_tokens=7,
    )


def test_low_latency_partial_round_experts_shared_cpu(cpu_pool):
    """3 local experts on the 2 receivers of a hook: the third expert's row tiles are split
    between both programs (`kernels/low_latency/dispatch.py`); about 10 rows each, 3 tiles."""
    combos = [dict(use_fp8=True, hook=True), dict(use_fp8=False, hook=True, twice=True)]
    check_matrix(
        cpu_pool(2), combos, num_tokens=8, hidden=256, num_topk=4, num_experts=6, max_tokens=8
    )


def test_low_latency_is_repeatable_cpu(cpu_pool):
    digests = cpu_pool(2).run(
        ll.check_low_latency_repeatable,
        repeats=20,
        num_tokens=6,
        hidden=256,
        num_topk=2,
        num_experts=4,
        max_tokens=8,
        timeout=600,
    )
    assert all(len(d) == 1 for d in digests), digests


SHRINK_SHAPE = dict(num_tokens=4, hidden=128, num_topk=2, num_experts=6, max_tokens=4)


def check_shrink_round(pool, shape: dict) -> None:
    """Rank 2 of 3 never calls: the others mask it, complete within 10 s, match the reference
    without it and warn about it (the shrink-mode buffer of `shape` already built)."""
    results = pool.run(ll.shrink_round, dead_rank=2, stall_s=12.0, **shape, timeout=120)
    for result in results[:2]:
        assert result["mask"] == [0, 0, 1], result
        assert result["combined_ok"], result
        assert result["seconds"] < 10, result
        assert any("rank(s) [2]" in w and "masked" in w for w in result["warned"]), result


def test_shrink_mode_masks_a_dead_rank_and_completes_cpu(cpu_pool):
    pool = cpu_pool(3, TRITONEP_TIMEOUT_S="2")
    pool.run(ll.make_ll_buffer, shrink=True, **SHRINK_SHAPE, timeout=120)
    check_shrink_round(pool, SHRINK_SHAPE)


@pytest.mark.parametrize(
    "op, phase, calls_before",
    [
        ("dispatch", "low-latency dispatch", 0),
        # The dead rank's signals then carry the previous call's tag: the quoted progress must
        # not read that call's counts as this call's (on an H200: "seen 3, needed 1").
        ("dispatch", "low-latency dispatch", 1),
        ("clean", "low-latency clean barrier", 0),
    ],
)
def test_low_latency_timeout_names_rank_and_phase_cpu(cpu_pool, op, phase, calls_before):
    pool = cpu_pool(2, TRITONEP_TIMEOUT_S="2")
    pool.run(ll.make_ll_buffer, **SHRINK_SHAPE, timeout=120)
    first = pool.run(
        ll.timeout_round,
        dead_rank=1,
        stall_s=6.0,
        op=op,
        calls_before=calls_before,
        **SHRINK_SHAPE,
        timeout=120,
    )[0]
    assert first["errors"][0] is not None, "the interpreter reports the timeout on the same call"
    check_timeout_errors(first["errors"], phase)
    if op == "dispatch":
        assert "it had not reached this call" in first["errors"][0][1], first["errors"][0]


def check_timeout_errors(errors: list, phase: str = "low-latency dispatch") -> None:
    """`ll.timeout_round`'s errors on rank 0: the timeout naming both ranks and the phase, then
    only 'unusable' refusals."""
    reported = [e for e in errors if e is not None]
    assert errors.index(reported[0]) <= 1, f"no timeout reported by the second call: {errors}"
    (kind, message), *later = reported
    assert (
        kind == "EPTimeoutError"
        and "rank 0" in message
        and phase in message
        and "rank 1" in message
    ), message
    # The quoted progress is that of one waiting lane (with a lane per expert and rank, a pick by
    # rank alone once added several up: "progress seen 6, needed 2").
    progress = re.findall(r"progress seen (-?\d+), needed (-?\d+)", message)
    assert progress and all(int(seen) < int(needed) for seen, needed in progress), message
    assert later and all(k == "EPStateError" and "unusable" in m for k, m in later), later


# Row-owning combine senders (S = 2 on the CPU): about 40 rows per sender, so more than one tile
# of 32 arrivals; rank 1's entries are all -1, so every block from rank 1 is empty and is signalled
# by block id alone; the emulated put path too.
ROWS_SHAPE = dict(num_tokens=30, hidden=256, num_topk=7, num_experts=8, max_tokens=32)
ROWS_COMBOS = [dict(), dict(zero_copy=True, hook=True), dict(use_logfmt=True, with_out=True)]


@pytest.mark.parametrize(
    "put", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["stores", "put"]
)
def test_low_latency_combine_rows_cpu(cpu_pool, put):
    pool = cpu_pool(2, TRITONEP_FORCE_PUT="1") if put else cpu_pool(2)
    results = pool.run(
        ll.check_low_latency_matrix, ROWS_COMBOS, **ROWS_SHAPE, drop=[0.2, 1.0], timeout=600
    )
    assert results == [len(ROWS_COMBOS)] * 2


def test_low_latency_combine_with_rank_masked_after_dispatch_cpu(cpu_pool):
    results = cpu_pool(3).run(
        ll.masked_combine_round,
        masked_rank=2,
        num_tokens=6,
        hidden=128,
        num_topk=3,
        num_experts=6,
        max_tokens=8,
        timeout=600,
    )
    for result in results:
        assert result["masked_ok"] and result["after_ok"], result


# Routings the random generator never draws, per rank (E=4 experts on 2 ranks, T=4, K=3): a token
# selecting one expert twice or three times (rows in k order), a token of -1 only, experts no
# pair selects (count 0), an expert with more pairs than a block's T rows (only the first T of a
# source are sent), a rank without tokens. Issued back to back, so the per-expert arrival counters
# of both buffer sets must return to 0 after every call.
CRAFTED = [
    ([[1, 1, -1], [-1, -1, -1], [3, 0, 3], [1, -1, 1]], [[0, 0, 0], [-1, -1, -1], [3, -1, -1]]),
    ([[1, 1, 1], [1, 1, 1], [1, 0, 1], [2, 1, 1]], [[1, 2, 2], [2, 2, 2]]),
    ([[-1, -1, -1], [3, 3, -1]], []),
    ([], [[2, 0, 1], [1, 2, 0], [0, 1, 2], [3, 3, 3]]),
]


def _capped_dispatch(rank, num_ranks, num_experts, max_rows, idxs):
    """Per local expert its rows' (source rank, token) pairs, the counts and the layout ranges of
    `reference.ll_dispatch`, keeping only the first T pairs of each (expert, source) block (the
    reference assumes no block overflows)."""
    import torch

    num_local = num_experts // num_ranks
    per_expert, counts, layout = [], [], torch.zeros((num_local, num_ranks), dtype=torch.int64)
    for local in range(num_local):
        rows = []
        for src in range(num_ranks):
            kept = torch.nonzero(idxs[src] == rank * num_local + local)[:max_rows, 0]
            layout[local, src] = (len(rows) << 32) | kept.numel()
            rows += [(src, t) for t in kept.tolist()]
        per_expert.append(rows)
        counts.append(len(rows))
    return per_expert, counts, layout


def crafted_routing_task(ctx, hidden: int, num_experts: int, max_tokens: int) -> int:
    import torch

    import tritonep
    from tritonep import reference
    from tritonep.testing.checks import device_of, gather
    from tritonep.testing.low_latency import ll_buffer

    rank, num_ranks = ctx.rank, ctx.world_size
    buffer = ll_buffer(ctx, max_tokens, hidden, num_experts)
    device = device_of(buffer)
    calls = 0
    for case, routing in enumerate(CRAFTED):
        for use_fp8, hook in ((False, False), (True, True), (True, False)):
            idx = torch.tensor(routing[rank], dtype=tritonep.topk_idx_t).view(-1, 3)
            gen = torch.Generator().manual_seed(case * 10 + rank)
            x = torch.randn((idx.size(0), hidden), generator=gen).to(torch.bfloat16)
            recv_x, recv_count, handle, _, recv_hook = buffer.low_latency_dispatch(
                x.to(device),
                idx.to(device),
                max_tokens,
                num_experts,
                use_fp8=use_fp8,
                return_recv_hook=hook,
            )
            if recv_hook is not None:
                recv_hook()
            xs, idxs = gather(ctx.group, x), gather(ctx.group, idx)
            per_expert, counts, layout = _capped_dispatch(
                rank, num_ranks, num_experts, max_tokens, idxs
            )
            where = f"case {case}, use_fp8={use_fp8}, hook={hook}"
            assert recv_count.cpu().tolist() == counts, f"{where}: counts {recv_count} != {counts}"
            assert torch.equal(handle[1].cpu(), layout), f"{where}: layout {handle[1]} != {layout}"
            for local, rows in enumerate(per_expert):
                n, tokens = len(rows), [t for _, t in rows]
                got_src = handle[0][local, :n].cpu().tolist()
                assert got_src == tokens, f"{where}: src_info of {local}: {got_src} != {tokens}"
                if n == 0:
                    continue
                want = torch.stack([xs[src][t] for src, t in rows])
                if use_fp8:
                    data, scales = recv_x
                    want_data, want_scales = reference.ll_quantize(want)
                    assert torch.equal(
                        data[local, :n].cpu().view(torch.uint8), want_data.view(torch.uint8)
                    ), f"{where}: fp8 rows of {local}"
                    assert torch.equal(scales[local, :n].cpu(), want_scales), f"{where}: scales"
                else:
                    assert torch.equal(recv_x[local, :n].cpu(), want), f"{where}: rows of {local}"
            calls += 1
    return calls


@pytest.mark.parametrize("force_put", ["0", "1"])
def test_low_latency_crafted_routing_cpu(cpu_pool, force_put):
    """Repeated experts within a token, tokens of -1 only, idle experts, overfull blocks, a rank
    without tokens; over stores and over the emulated put path."""
    results = cpu_pool(2, TRITONEP_FORCE_PUT=force_put).run(
        crafted_routing_task, hidden=256, num_experts=4, max_tokens=4, timeout=600
    )
    assert results == [3 * len(CRAFTED)] * 2


def _small_counters_task(ctx, **shape) -> int:
    from tritonep.modes import low_latency as mode

    mode._ARRIVAL_EXPERTS = 2  # this rank process only: the first plan must grow the counters
    checked = ll.check_low_latency_matrix(ctx, [dict(), dict(use_fp8=True, hook=True)], **shape)
    buffer = ll.ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"])
    assert buffer._low_latency._arrivals.shape == (2, 2 * shape["num_experts"])
    return checked


def test_low_latency_counters_grow_for_more_experts_cpu(cpu_pool):
    """A call with more experts than the arrival counters hold grows them (zeroed), and the
    dispatch and combine after it are still exact."""
    results = cpu_pool(2).run(
        _small_counters_task,
        num_tokens=5,
        hidden=128,
        num_topk=3,
        num_experts=8,
        max_tokens=5,
        timeout=600,
    )
    assert results == [2, 2]


def repeated_expert_combine_task(ctx, hidden: int, num_experts: int, max_tokens: int) -> int:
    """Combine after routings with tokens that select one expert two or three times, and expert
    outputs that differ row by row: every selection of (e, t) reads the row of the pair's last
    occurrence, whichever sender program stores last. (On 2 ranks with S = 2 row senders, rank
    1's three rows for expert 0 are flat rows 2, 3, 4: program 0 stores 2 and 4, program 1 the
    middle one after them.)"""
    import torch

    import tritonep
    from tritonep.testing.checks import device_of, gather
    from tritonep.testing.low_latency import ll_buffer

    rank, num_ranks = ctx.rank, ctx.world_size
    num_local = num_experts // num_ranks
    buffer = ll_buffer(ctx, max_tokens, hidden, num_experts)
    device = device_of(buffer)
    routing = (
        [[1, 1, -1], [0, -1, -1], [3, 0, 3], [1, -1, 1]],
        [[0, 0, 0], [-1, -1, -1], [3, -1, -1]],
    )
    idx = torch.tensor(routing[rank], dtype=tritonep.topk_idx_t).view(-1, 3)
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn((idx.size(0), hidden), generator=gen).to(torch.bfloat16)
    weights = torch.rand(idx.shape, generator=gen)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
        x.to(device), idx.to(device), max_tokens, num_experts, use_fp8=False
    )
    rows = torch.arange(1, recv_x.size(1) + 1, dtype=torch.float32, device=device)
    y = (recv_x.float() * rows[None, :, None]).to(torch.bfloat16)  # every row differs
    combined, _, _ = buffer.low_latency_combine(y, idx.to(device), weights.to(device), handle)
    ys, src_infos, ranges = (
        gather(ctx.group, y),
        gather(ctx.group, handle[0]),
        gather(ctx.group, handle[1]),
    )
    want = torch.zeros((idx.size(0), hidden), dtype=torch.float32)
    for t in range(idx.size(0)):
        for k in range(idx.size(1)):
            expert = int(idx[t, k])
            if expert < 0:
                continue
            owner, local = divmod(expert, num_local)
            begin, count = (
                int(ranges[owner][local, rank]) >> 32,
                int(ranges[owner][local, rank]) & 0xFFFFFFFF,
            )
            block = src_infos[owner][local, begin : begin + count]
            last = begin + int(torch.nonzero(block == t)[-1, 0])
            want[t] = want[t] + (weights[t, k] * ys[owner][local, last].float())
    assert torch.equal(combined.cpu(), want.to(torch.bfloat16)), f"rank {rank}: repeated experts"
    return 1


@pytest.mark.parametrize("force_put", ["0", "1"])
def test_low_latency_combine_of_repeated_experts_cpu(cpu_pool, force_put):
    results = cpu_pool(2, TRITONEP_FORCE_PUT=force_put).run(
        repeated_expert_combine_task, hidden=256, num_experts=4, max_tokens=4, timeout=600
    )
    assert results == [1, 1]
