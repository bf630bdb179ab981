"""Rank-side checks of the low-latency mode against `tritonep.reference` (CPU suite, GPU suite,
bench).

`check_low_latency` runs one dispatch -> combine round on every rank of a group with fresh random
inputs and compares this rank's outputs with the plain-torch reference computed on every rank's
gathered inputs: counts, layout ranges, source indices and BF16 rows exactly; FP8 rows and scales
exactly against the reference quantiser (they are bit-exact by design); combine exactly for BF16
rows, within DeepEP's `calc_diff` bound for LogFMT rows.
"""

from __future__ import annotations

import torch

import tritonep
from tritonep import reference
from tritonep.testing.checks import device_of, gather, make_routing


def _ll_buffer_key(max_tokens: int, hidden: int, num_experts: int, shrink: bool) -> tuple:
    return ("ll-buffer", max_tokens, hidden, num_experts, shrink)


def ll_buffer(
    ctx, max_tokens: int, hidden: int, num_experts: int, shrink: bool = False
) -> tritonep.Buffer:
    """One low-latency Buffer per (rank process, geometry), reused across tasks."""
    key = _ll_buffer_key(max_tokens, hidden, num_experts, shrink)
    buffer = ctx.state.get(key)
    if buffer is None:
        size = tritonep.Buffer.get_low_latency_rdma_size_hint(
            max_tokens, hidden, ctx.world_size, num_experts
        )
        buffer = tritonep.Buffer(
            ctx.group, num_rdma_bytes=size, low_latency_mode=True, enable_shrink=shrink
        )
        ctx.state[key] = buffer
    return buffer


def kernel_resources(ctx, **shape) -> list[dict]:
    """Registers and spilled bytes of the LL kernels this rank's buffer for `shape` has compiled
    (`LowLatencyMode.kernel_resources`; empty in the interpreter)."""
    buffer = ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"])
    return buffer._low_latency.kernel_resources()


def _valid_rows(tensor: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    return [tensor[e, : int(c)] for e, c in enumerate(counts.tolist())]


def _reference_combine(ctx, num_experts, y, topk_idx, topk_weights, handle, **options):
    """`reference.ll_combine` on this rank, with every rank's expert outputs and handles gathered
    (collective)."""
    return reference.ll_combine(
        ctx.rank,
        ctx.world_size,
        num_experts,
        gather(ctx.group, y),
        topk_idx.cpu(),
        topk_weights.cpu(),
        gather(ctx.group, handle[0]),
        gather(ctx.group, handle[1]),
        **options,
    )


def check_low_latency(
    ctx,
    *,
    num_tokens,
    hidden: int,
    num_topk: int,
    num_experts: int,
    max_tokens: int,
    use_fp8: bool = False,
    round_scale: bool = False,
    use_ue8m0: bool = False,
    hook: bool = False,
    twice: bool = False,
    use_logfmt: bool = False,
    zero_copy: bool = False,
    with_out: bool = False,
    drop: float = 0.1,
    seed: int = 0,
) -> dict:
    """One checked dispatch + combine; `twice` issues the dispatch twice in a row (two buffer
    sets). `num_tokens` and `drop` (the share of -1 entries) may be per-rank lists."""
    group, rank, num_ranks = ctx.group, ctx.rank, ctx.world_size
    if isinstance(num_tokens, (list, tuple)):
        num_tokens = num_tokens[rank]
    if isinstance(drop, (list, tuple)):
        drop = drop[rank]
    buffer = ll_buffer(ctx, max_tokens, hidden, num_experts)
    device = device_of(buffer)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32, device="cpu").to(
        torch.bfloat16
    )
    topk_idx, topk_weights = make_routing(num_tokens, num_experts, num_topk, gen, "cpu", drop=drop)
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)
    num_local = num_experts // num_ranks
    cumulative = torch.zeros(num_local, dtype=torch.int32, device=device)

    def dispatch():
        recv_x, recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
            x,
            topk_idx,
            max_tokens,
            num_experts,
            cumulative_local_expert_recv_stats=cumulative,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            return_recv_hook=hook,
        )
        return recv_x, recv_count, handle, recv_hook

    first = dispatch()
    results = [first, dispatch()] if twice else [first]
    for *_, recv_hook in results:
        if recv_hook is not None:
            recv_hook()
    recv_x, recv_count, handle, _ = results[-1]

    all_x, all_idx = gather(group, x), gather(group, topk_idx)
    want = reference.ll_dispatch(rank, num_ranks, num_experts, max_tokens, all_x, all_idx)
    for name, got in (("recv_count", recv_count), ("layout_range", handle[1])):
        key = "recv_count" if name == "recv_count" else "packed_recv_layout_range"
        assert torch.equal(got.cpu(), want[key]), f"{name}: {got.cpu()} != {want[key]}"
    counts = want["recv_count"]
    # Rows past an expert's count are never read: only the first `rows` of each expert go to the
    # host (at DeepEP's shape the whole receive tensor is 0.5 GB per rank, the valid rows ~2 MB).
    rows = int(counts.max()) if counts.numel() else 0
    for e, (got, ref) in enumerate(
        zip(
            _valid_rows(handle[0].cpu(), counts),
            _valid_rows(want["packed_recv_src_info"], counts),
            strict=False,
        )
    ):
        assert torch.equal(got, ref), f"src_info of local expert {e}: {got} != {ref}"
    ref_rows = _valid_rows(want["recv_x"], counts)
    if use_fp8:
        data, scales = recv_x
        assert scales.stride(1) == 1 and scales.stride(2) == scales.size(1), (
            "scales must be column-major"
        )
        for e, ref in enumerate(ref_rows):
            if ref.numel() == 0:
                continue
            want_data, want_scales = reference.ll_quantize(ref, round_scale, use_ue8m0)
            n = ref.size(0)
            assert torch.equal(data[e, :n].cpu().view(torch.uint8), want_data.view(torch.uint8)), (
                f"fp8 data, expert {e}"
            )
            assert torch.equal(scales[e, :n].cpu(), want_scales), f"scales, expert {e}"
        received = reference.ll_dequantize(data[:, :rows], scales[:, :rows]).to(torch.bfloat16)
    else:
        received = recv_x[:, :rows].cpu()
        for e, (got, ref) in enumerate(zip(_valid_rows(received, counts), ref_rows, strict=False)):
            assert torch.equal(got, ref), f"recv_x of local expert {e}"

    assert torch.equal(cumulative.cpu(), counts * len(results)), (
        f"cumulative stats {cumulative.tolist()}"
    )

    # Combine: each expert returns its rows scaled by (global expert id + 1) / 8; the rows past
    # its count are NaN, so a combine that reads one cannot pass.
    scale = ((rank * num_local + torch.arange(num_local, dtype=torch.float32)) + 1) / 8
    shape = recv_x[0].shape if use_fp8 else recv_x.shape
    y = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)
    y[:, :rows] = (received.float() * scale[:, None, None]).to(torch.bfloat16).to(device)
    if zero_copy:
        buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
    out = (
        torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16, device=device)
        if with_out
        else None
    )
    combined, _, combine_hook = buffer.low_latency_combine(
        y,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt=use_logfmt,
        zero_copy=zero_copy,
        return_recv_hook=hook,
        out=out,
    )
    if combine_hook is not None:
        combine_hook()
    if with_out:
        assert combined is out, "low_latency_combine must return `out` itself"
    want_combined = _reference_combine(
        ctx, num_experts, y[:, :rows], topk_idx, topk_weights, handle, use_logfmt=use_logfmt
    )
    assert combined.shape == want_combined.shape, f"combine shape {tuple(combined.shape)}"
    if use_logfmt and combined.numel():
        got = combined.cpu().float()
        bad = torch.nonzero(~got.isfinite().all(dim=1))[:, 0]
        assert bad.numel() == 0, (
            f"LogFMT combine: {bad.numel()} tokens not finite, e.g. token {int(bad[0])} "
            f"(experts {topk_idx[bad[0]].tolist()}, non-finite channels "
            f"{torch.nonzero(~got[bad[0]].isfinite())[:, 0].tolist()[:16]})"
        )
        diff = reference.calc_diff(got, want_combined.float())
        assert diff < 1e-5, f"LogFMT combine differs from the reference: calc_diff {diff}"
    elif not use_logfmt:
        assert torch.equal(combined.cpu(), want_combined), "combine differs from the reference"
    return {"recv_rows": int(counts.sum()), "num_tokens": num_tokens}


# Every combination DeepEP V1's low-latency test checks: dispatch formats x hook x issued once or
# twice in a row x combine kinds x with or without `out`.
DISPATCH_FORMATS = (
    dict(use_fp8=False),
    dict(use_fp8=True),
    dict(use_fp8=True, round_scale=True),
    dict(use_fp8=True, round_scale=True, use_ue8m0=True),
)
COMBINE_KINDS = (dict(), dict(zero_copy=True), dict(use_logfmt=True))


def full_matrix() -> list[dict]:
    return [
        {**fmt, "hook": hook, "twice": twice, **kind, "with_out": with_out}
        for fmt in DISPATCH_FORMATS
        for hook in (False, True)
        for twice in (False, True)
        for kind in COMBINE_KINDS
        for with_out in (False, True)
    ]


def pairwise_matrix() -> list[dict]:
    """The 12 of `full_matrix()`'s 96 combinations in which every pair of option values still
    meets (a greedy all-pairs cover): a failure two options cause together shows up in an eighth
    of the time. Both suites' choice: the full product, at DeepEP's shape with 2 ranks sharing
    an H200, ran past 400 s (a kernel variant compiled per option set)."""
    combos = full_matrix()
    factors = [
        lambda c: DISPATCH_FORMATS.index(
            {k: c[k] for k in ("use_fp8", "round_scale", "use_ue8m0") if k in c}
        ),
        lambda c: c["hook"],
        lambda c: c["twice"],
        lambda c: COMBINE_KINDS.index({k: c[k] for k in ("zero_copy", "use_logfmt") if k in c}),
        lambda c: c["with_out"],
    ]

    def pairs(combo):
        values = [f(combo) for f in factors]
        return {(i, values[i], j, values[j]) for i in range(5) for j in range(i + 1, 5)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def check_low_latency_matrix(ctx, combos: list[dict], **shape) -> int:
    """`check_low_latency` for each of `combos` (the same list on every rank); returns the count.
    Each combination's time goes to stderr, which a pool quotes when a rank fails or hangs (the
    first calls of a combination compile its kernel variants)."""
    import sys
    import time

    for seed, combo in enumerate(combos):
        started = time.monotonic()
        try:
            check_low_latency(ctx, seed=seed, **shape, **combo)
        except AssertionError as e:
            raise AssertionError(f"{combo}: {e}") from e
        seconds = time.monotonic() - started
        print(f"rank {ctx.rank}: {combo} checked in {seconds:.1f} s", file=sys.stderr, flush=True)
    return len(combos)


def check_low_latency_repeatable(ctx, repeats: int = 20, **shape) -> list[str]:
    """The same inputs dispatched and combined `repeats` times give identical bytes (hashes)."""
    import hashlib

    buffer = ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"])
    device = device_of(buffer)
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn((shape["num_tokens"], shape["hidden"]), generator=gen, dtype=torch.float32).to(
        torch.bfloat16
    )
    topk_idx, topk_weights = make_routing(
        shape["num_tokens"], shape["num_experts"], shape["num_topk"], gen, "cpu"
    )
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)
    digests = set()
    for _ in range(repeats):
        (data, scales), count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, shape["max_tokens"], shape["num_experts"], round_scale=True
        )
        rows = [data[e, : int(c)].view(torch.uint8).cpu() for e, c in enumerate(count.tolist())]
        y = torch.ones(data.shape, dtype=torch.bfloat16, device=device)
        combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        digest = hashlib.sha256()
        for t in (*rows, count.cpu(), handle[1].cpu(), combined.cpu().view(torch.uint8)):
            digest.update(t.contiguous().numpy().tobytes())
        digests.add(digest.hexdigest())
    return sorted(digests)


def shrink_round(ctx, dead_rank: int, stall_s: float, **shape) -> dict:
    """Shrink mode with a dead rank: `dead_rank` never calls; every other rank's dispatch and
    combine time out on it, mask it, complete without it and match the reference that leaves it
    out."""
    import time
    import warnings

    if ctx.rank == dead_rank:
        time.sleep(stall_s)
        return {"rank": ctx.rank, "stalled": True}
    rank, num_ranks = ctx.rank, ctx.world_size
    buffer = ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"], shrink=True)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn((shape["num_tokens"], shape["hidden"]), generator=gen, dtype=torch.float32).to(
        torch.bfloat16
    )
    topk_idx, topk_weights = make_routing(
        shape["num_tokens"], shape["num_experts"], shape["num_topk"], gen, "cpu", drop=0.0
    )
    device = device_of(buffer)
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, shape["max_tokens"], shape["num_experts"], use_fp8=False
        )
        # Every expert returns ones: token t must get the sum of its weights over live owners.
        combined, _, _ = buffer.low_latency_combine(
            torch.ones_like(recv_x), topk_idx, topk_weights, handle
        )
        # Waits for the kernels: on a GPU their report (the masked ranks) is read by the next call.
        count, layout_range, combined = count.cpu(), handle[1].cpu(), combined.cpu()
        mask = torch.zeros(num_ranks, dtype=torch.int32, device=device)
        buffer.low_latency_query_mask_buffer(mask)
    seconds = time.monotonic() - started
    topk_idx, topk_weights = topk_idx.cpu(), topk_weights.cpu()
    # The reference rebuilds every live rank's inputs (a collective would wait for the dead rank).
    inputs = []
    for r in range(num_ranks):
        g = torch.Generator().manual_seed(r)
        xr = torch.randn(
            (shape["num_tokens"], shape["hidden"]), generator=g, dtype=torch.float32
        ).to(torch.bfloat16)
        inputs.append(
            (
                xr,
                make_routing(
                    shape["num_tokens"], shape["num_experts"], shape["num_topk"], g, "cpu", drop=0.0
                )[0],
            )
        )
    masked = [
        [j == dead_rank and s != dead_rank for j in range(num_ranks)] for s in range(num_ranks)
    ]
    want = reference.ll_dispatch(
        rank,
        num_ranks,
        shape["num_experts"],
        shape["max_tokens"],
        [i[0] for i in inputs],
        [i[1] for i in inputs],
        mask=masked,
    )
    assert torch.equal(count, want["recv_count"]), (count, want["recv_count"])
    assert torch.equal(layout_range, want["packed_recv_layout_range"])
    live = (topk_idx // (shape["num_experts"] // num_ranks)) != dead_rank
    acc = torch.zeros(shape["num_tokens"], dtype=torch.float32)
    for k in range(topk_idx.size(1)):
        acc = acc + torch.where(live[:, k], topk_weights[:, k], 0.0)
    want_combined = acc.to(torch.bfloat16)[:, None].expand(-1, shape["hidden"])
    return {
        "rank": rank,
        "mask": mask.cpu().tolist(),
        "seconds": seconds,
        "warned": [str(w.message) for w in caught],
        "combined_ok": bool(torch.equal(combined, want_combined)),
    }


def make_ll_buffer(ctx, shrink: bool = False, **shape) -> None:
    """Build (collectively) the Buffer `ll_buffer` returns for this geometry."""
    ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"], shrink=shrink)


def timeout_round(
    ctx, dead_rank: int, stall_s: float, op: str = "dispatch", calls_before: int = 0, **shape
) -> dict:
    """Without shrink mode a rank that never calls makes the others' dispatch (`op` "dispatch")
    or clean barrier (`op` "clean") fail with a timeout that names rank and phase, and poisons
    their buffers. With `calls_before`, every rank first makes that many dispatch + combine pairs
    together, so the dead rank's signals still carry an earlier call's tag when it stops calling.
    Three calls, each followed by a device synchronisation: on the CPU backend the
    first raises the timeout and the others find the buffer unusable; on a GPU the first returns
    (its kernel reports when it gives up), the second raises the timeout, the third finds the
    buffer unusable. Any other exception (a device fault on the timeout path) propagates.
    Every rank then forgets its buffer of this geometry (the live ranks' are poisoned), so a later
    task builds a new one collectively."""
    import time

    key = _ll_buffer_key(shape["max_tokens"], shape["hidden"], shape["num_experts"], False)
    buffer = ll_buffer(ctx, shape["max_tokens"], shape["hidden"], shape["num_experts"])
    device = device_of(buffer)
    x = torch.zeros((shape["num_tokens"], shape["hidden"]), dtype=torch.bfloat16, device=device)
    topk_idx = torch.arange(shape["num_tokens"] * shape["num_topk"]).view(shape["num_tokens"], -1)
    topk_idx = (topk_idx % shape["num_experts"]).to(tritonep.topk_idx_t).to(device)
    weights = torch.ones(topk_idx.shape, dtype=torch.float32, device=device)
    for _ in range(calls_before):
        recv, _, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, shape["max_tokens"], shape["num_experts"], use_fp8=False
        )
        buffer.low_latency_combine(recv, topk_idx, weights, handle)
    if ctx.rank == dead_rank:
        time.sleep(stall_s)
        ctx.state.pop(key, None)
        return {"rank": ctx.rank}
    errors = []
    for _ in range(3):
        try:
            if op == "clean":
                buffer.clean_low_latency_buffer(
                    shape["max_tokens"], shape["hidden"], shape["num_experts"]
                )
            else:
                buffer.low_latency_dispatch(
                    x, topk_idx, shape["max_tokens"], shape["num_experts"], use_fp8=False
                )
            errors.append(None)
        except tritonep.EPError as e:
            errors.append((type(e).__name__, str(e)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ctx.state.pop(key, None)
    return {"rank": ctx.rank, "errors": errors}


def masked_combine_round(ctx, masked_rank: int, **shape) -> dict:
    """A rank masked between dispatch and combine: the combine leaves it out both ways (its rows
    are still in the handles: counted but not sent); then, masks cleared, the same round unmasked
    is exact again (so the combine's arrival counters came back to zero)."""
    rank, num_ranks = ctx.rank, ctx.world_size
    max_tokens, hidden, num_experts = shape["max_tokens"], shape["hidden"], shape["num_experts"]
    buffer = ll_buffer(ctx, max_tokens, hidden, num_experts, shrink=True)  # shrink: masks
    device = device_of(buffer)
    gen = torch.Generator().manual_seed(rank + 17)
    x = torch.randn((shape["num_tokens"], hidden), generator=gen).to(torch.bfloat16)
    topk_idx, topk_weights = make_routing(
        shape["num_tokens"], num_experts, shape["num_topk"], gen, "cpu", drop=0.2
    )
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)
    results = []
    for masked in (True, False):
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, max_tokens, num_experts, use_fp8=False
        )
        if masked:
            others = [j for j in range(num_ranks) if j != rank]
            for j in others if rank == masked_rank else [masked_rank]:
                buffer.low_latency_update_mask_buffer(j, True)
        y = (recv_x.float() * 0.5 + 1.0).to(torch.bfloat16)
        combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        buffer.low_latency_clean_mask_buffer()
        mask = [
            [masked and (s == masked_rank) != (j == masked_rank) for j in range(num_ranks)]
            for s in range(num_ranks)
        ]
        want = _reference_combine(ctx, num_experts, y, topk_idx, topk_weights, handle, mask=mask)
        results.append(bool(torch.equal(combined.cpu(), want)))
    return {"masked_ok": results[0], "after_ok": results[1]}
