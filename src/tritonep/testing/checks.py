"""Rank-side correctness checks shared by the CPU suite, the GPU suite and the demo.

Each `check_*` function runs on every rank of a process group (as a `RankPool` task or from a
spawned benchmark process), draws fresh random inputs, runs tritonep, gathers what every rank
passed, and compares this rank's outputs with `tritonep.reference`: exact equality for everything
that is copied (rows, scales, indices, counts, handles) and for combine (fp32 sums in the spec's
order, rounded once, are deterministic), never a tolerance that could hide a wrong row.

Fresh outputs are poisoned: `poisoned_allocations()` makes `torch.empty` fill new memory with NaN /
max-int, so an output element the kernels forgot to write shows up as a mismatch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import tritonep
from tritonep import reference


def device_of(buffer) -> torch.device:
    """The device a Buffer's tensors live on."""
    index = buffer.runtime.get_local_device_id()
    return torch.device("cuda", index) if index >= 0 else torch.device("cpu")


def gather(group, tensor):
    """Every rank's value of `tensor` (moved to CPU), index = rank."""
    out = [None] * dist.get_world_size(group)
    if not isinstance(tensor, torch.Tensor):
        dist.all_gather_object(out, tensor, group=group)
        return out
    # float8 tensors do not survive pickling in torch 2.13: send their bytes.
    dist.all_gather_object(
        out,
        (
            tensor.dtype,
            tensor.cpu().view(torch.uint8) if tensor.element_size() == 1 else tensor.cpu(),
        ),
        group=group,
    )
    return [t.view(dtype) for dtype, t in out]


@contextlib.contextmanager
def poisoned_allocations(device: torch.device | None = None):
    """Inside: fresh outputs start as garbage, so an element the kernels forgot to write shows up.

    CPU: `torch.empty` fills new memory with NaN / max-int (torch's deterministic mode).
    CUDA: that fill would be a kernel on the allocating stream racing the comm stream, so instead
    the caching allocator is primed: a large block is filled with 0x7F bytes (NaN for FP8, huge for
    BF16/FP32/int) and freed, and the outputs are carved from it without any kernel.
    """
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        block = torch.empty(min(1 << 30, free // 4), dtype=torch.uint8, device=device)
        block.fill_(0x7F)
        torch.cuda.synchronize(device)
        del block
        yield
        return
    import torch.utils.deterministic as det

    was_det, was_warn, was_fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    _set_deterministic(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = was_fill
        _set_deterministic(was_det, warn_only=was_warn)


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    """`torch.use_deterministic_algorithms` without its first-call import of torch._inductor
    (4.7 s per rank process on CI's CPUs; the interpreter never runs inductor code)."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def make_routing(
    num_tokens, num_experts, num_topk, generator, device, drop=0.1, skew=0.0, idx_dtype=None
):
    """Top-k routing like DeepEP's tests: distinct experts per token, some slots -1, optional skew.

    `skew` > 0 concentrates tokens on low-numbered experts (hot experts / hot ranks).
    """
    # Everything is drawn on the CPU with explicit dtypes, so routing does not depend on a default
    # device or dtype the calling script may have set.
    scores = (
        torch.rand(
            (num_tokens, num_experts), generator=generator, dtype=torch.float32, device="cpu"
        )
        + 1.0
    )
    if skew > 0:
        scores += skew * torch.linspace(1.0, 0.0, num_experts, dtype=torch.float32, device="cpu")
    topk_idx = torch.topk(scores, num_topk, dim=-1, sorted=False).indices
    if drop > 0 and num_tokens > 0:
        dropped = (
            torch.rand(
                (num_tokens, num_topk), generator=generator, dtype=torch.float32, device="cpu"
            )
            < drop
        )
        topk_idx = topk_idx.masked_fill(dropped, -1)
    topk_weights = torch.rand(
        (num_tokens, num_topk), generator=generator, dtype=torch.float32, device="cpu"
    )
    idx_dtype = idx_dtype or tritonep.topk_idx_t
    return topk_idx.to(idx_dtype).to(device), topk_weights.to(device)


def per_token_cast_to_fp8(x: torch.Tensor):
    """DeepEP's test quantiser: per-(token, 128 channels) float32 scales, e4m3 data.

    A hidden size that is not a multiple of 128 gets a last, partial group (ceil(H / 128) scales).
    """
    num_tokens, hidden = x.shape
    num_groups = -(-hidden // 128)
    padded = torch.zeros((num_tokens, num_groups * 128), dtype=torch.float32, device=x.device)
    padded[:, :hidden] = x.float()
    groups = padded.view(num_tokens, num_groups, 128)
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    data = (
        (groups * (448.0 / amax.unsqueeze(2)))
        .to(torch.float8_e4m3fn)
        .view(num_tokens, num_groups * 128)[:, :hidden]
    )
    return data.contiguous(), (amax / 448.0).contiguous()


def get_buffer(ctx, num_nvl_bytes: int) -> tritonep.Buffer:
    """One Buffer per (rank process, size), reused across tasks."""
    key = ("buffer", num_nvl_bytes)
    buffer = ctx.state.get(key)
    if buffer is None:
        buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=num_nvl_bytes)
        ctx.state[key] = buffer
    return buffer


def _assert_equal(name, got, want):
    if got is None or want is None:
        assert got is None and want is None, (
            f"{name}: got {got is None and 'None' or 'a value'}, want the other"
        )
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    got_c, want_c = got.cpu(), want.cpu()
    if got_c.dtype.is_floating_point and got_c.element_size() == 1:
        got_c, want_c = got_c.view(torch.uint8), want_c.view(torch.uint8)
    if not torch.equal(got_c, want_c):
        diff = (got_c != want_c).nonzero()
        raise AssertionError(
            f"{name}: {diff.size(0)} elements differ, first at {diff[0].tolist()}: "
            f"{got_c[tuple(diff[0])]!r} != {want_c[tuple(diff[0])]!r}"
        )


def combine_blocks(group, rank, handle):
    """For `reference.combine`: rows of every rank j that came from `rank`, and their token ids."""
    prefixes = gather(group, handle[0])
    sources = gather(group, handle[3])
    blocks = []
    for j, (prefix, src) in enumerate(zip(prefixes, sources, strict=False)):
        first = int(prefix[rank - 1, j]) if rank > 0 else 0
        blocks.append((first, src[first : int(prefix[rank, j])]))
    return blocks


def check_intranode(
    ctx,
    *,
    num_tokens,
    hidden: int,
    num_topk: int,
    num_experts: int,
    num_sms: int = 4,
    chunk: int = 4,
    recv_capacity: int = 64,
    num_nvl_bytes: int = 8 << 20,
    seed: int = 0,
    matrix: str = "full",
    drop: float = 0.1,
    skew: float = 0.0,
    expert_alignment: int = 1,
) -> dict:
    """DeepEP V1's intranode test matrix against the reference; returns a few counts for the caller.

    num_tokens: an int, or one int per rank.
    matrix: "full" = {BF16 random, BF16 constant-per-rank, FP8} x {top-k or not} x {sync, async} x
    {previous event or not}; "pairwise" = the same kinds, with 4 of the 8 variants in which every
    pair of the three options meets (24 dispatches instead of 48); "quick" = BF16 random with
    top-k, sync. Always: layout, cached dispatch, combine with/without weights and bias,
    worst-case dispatch/combine.
    """
    group, rank = ctx.group, ctx.rank
    if isinstance(num_tokens, (list, tuple)):  # a token count per rank
        num_tokens = num_tokens[rank]
    buffer = get_buffer(ctx, num_nvl_bytes)
    device = device_of(buffer)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    config = tritonep.Config(num_sms, chunk, recv_capacity)
    x_rand = (
        torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32, device="cpu")
        .to(torch.bfloat16)
        .to(device)
    )
    x_const = torch.full((num_tokens, hidden), float(rank), dtype=torch.bfloat16, device=device)
    topk_idx, topk_weights = make_routing(
        num_tokens, num_experts, num_topk, gen, device, drop=drop, skew=skew
    )
    stats = {"dispatches": 0, "combines": 0}

    # Layout: exact against the definition.
    ntr, ntn, nte, itr = checked_layout(buffer, topk_idx, num_experts)

    all_itr = gather(group, itr)
    all_idx = gather(group, topk_idx)
    all_w = gather(group, topk_weights)

    if matrix in ("full", "pairwise"):
        kinds = [
            ("bf16_rand", x_rand),
            ("bf16_const", x_const),
            ("fp8", per_token_cast_to_fp8(x_rand)),
        ]
        variants = [(t, a, p) for t in (False, True) for a in (False, True) for p in (False, True)]
        if matrix == "pairwise":  # (with_topk, async, prev) with an even number of them set
            variants = [v for v in variants if sum(v) % 2 == 0]
    else:
        kinds = [("bf16_rand", x_rand)]
        variants = [(True, False, False)]
    handle = recv_w = None
    for kind, x in kinds:
        data = x[0] if isinstance(x, tuple) else x
        all_x = gather(group, data)
        all_scales = gather(group, x[1]) if isinstance(x, tuple) else None
        for with_topk, async_finish, with_prev in variants:
            recv_x, recv_idx, recv_w, counts, handle = dispatch_variant(
                buffer,
                x,
                dict(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte),
                topk_idx if with_topk else None,
                topk_weights if with_topk else None,
                expert_alignment,
                config,
                with_prev,
                async_finish,
            )
            stats["dispatches"] += 1
            ref = reference.dispatch(
                rank,
                num_experts,
                all_x,
                all_itr,
                all_idx if with_topk else None,
                all_w if with_topk else None,
                all_scales,
            )
            tag = f"dispatch[{kind}, topk={with_topk}, async={async_finish}, prev={with_prev}]"
            got_x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
            _assert_equal(f"{tag} recv_x", got_x, ref["recv_x"])
            if isinstance(x, tuple):
                _assert_equal(f"{tag} recv_x_scales", recv_x[1], ref["recv_scales"])
            _assert_equal(f"{tag} recv_src_idx", handle[3], ref["recv_src_idx"])
            _assert_equal(f"{tag} rank_prefix_matrix", handle[0], ref["rank_prefix_matrix"])
            assert handle[4] is itr, f"{tag}: handle[4] must be the caller's is_token_in_rank"
            assert (handle[5] < 0).cpu().eq(~itr.cpu()).all(), (
                f"{tag}: send_head must be negative exactly where not sent"
            )
            if with_topk:
                _assert_equal(f"{tag} recv_topk_idx", recv_idx, ref["recv_topk_idx"])
                _assert_equal(f"{tag} recv_topk_weights", recv_w, ref["recv_topk_weights"])
                aligned = [
                    -(-c // expert_alignment) * expert_alignment
                    for c in ref["num_recv_tokens_per_expert"]
                ]
                assert counts == aligned, (
                    f"{tag}: num_recv_tokens_per_expert_list {counts} != {aligned}"
                )
            else:
                assert recv_idx is None and recv_w is None
            # Cached dispatch with the new handle reproduces the rows exactly.
            with poisoned_allocations(device):
                cached = buffer.dispatch(x, handle=handle, config=config, async_finish=async_finish)
            if async_finish:
                cached[-1].current_stream_wait()
            assert cached[1:5] == (None, None, None, None), (
                f"{tag}: cached dispatch must return Nones"
            )
            cached_x = cached[0][0] if isinstance(cached[0], tuple) else cached[0]
            _assert_equal(f"{tag} cached recv_x", cached_x, ref["recv_x"])
            stats["dispatches"] += 1

        # Combine the BF16 rows back (with and without weights and bias).
        if kind == "fp8":
            continue
        y = recv_x if not isinstance(recv_x, tuple) else recv_x[0]
        blocks = combine_blocks(group, rank, handle)
        all_y = gather(group, y)
        all_recv_w = gather(group, recv_w) if recv_w is not None else None
        for with_weights, num_bias in ((False, 0), (True, 1), (True, 2)):
            if with_weights and recv_w is None:
                continue
            biases = tuple(
                torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32, device="cpu")
                .to(torch.bfloat16)
                .to(device)
                for _ in range(num_bias)
            )
            bias = None if num_bias == 0 else (biases[0] if num_bias == 1 else biases)
            with poisoned_allocations(device):
                combined, combined_w, event = buffer.combine(
                    y,
                    handle,
                    topk_weights=recv_w if with_weights else None,
                    bias=bias,
                    config=config,
                )
            stats["combines"] += 1
            want_x, want_w = reference.combine(
                rank,
                all_y,
                blocks,
                num_tokens,
                biases=[b.cpu() for b in biases],
                weights=all_recv_w if with_weights else None,
            )
            tag = f"combine[{kind}, weights={with_weights}, bias={num_bias}]"
            _assert_equal(f"{tag} combined_x", combined, want_x)
            _assert_equal(f"{tag} combined_topk_weights", combined_w, want_w)
            if with_weights:
                # Dispatch zeroes weights on non-owning ranks, so the sum restores the originals.
                _assert_equal(
                    f"{tag} restores topk_weights",
                    combined_w.cpu(),
                    torch.where(
                        topk_idx.cpu() >= 0,
                        topk_weights.cpu(),
                        torch.zeros_like(topk_weights.cpu()),
                    ),
                )

    stats.update(
        check_worst_case(
            ctx,
            buffer,
            config,
            x_rand,
            topk_idx,
            topk_weights,
            dict(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte),
            num_experts,
        )
    )
    stats["num_recv"] = int(handle[3].numel())
    return stats


def dispatch_variant(
    buffer,
    x,
    layout: dict,
    topk_idx,
    topk_weights,
    expert_alignment: int,
    config,
    with_prev: bool,
    async_finish: bool,
):
    """One non-cached dispatch of a test matrix into poisoned outputs, with the stream variant
    asked for (previous event captured, async or not); waits for it on the current stream and
    checks that a synchronous call returns an empty event. `layout`: the count keyword arguments
    (either high-throughput mode). Returns the dispatch's outputs without the event."""
    prev = buffer.capture() if with_prev else None
    with poisoned_allocations(device_of(buffer)):
        *outputs, event = buffer.dispatch(
            x,
            **layout,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            config=config,
            previous_event=prev,
            async_finish=async_finish,
        )
    if async_finish:
        event.current_stream_wait()
    else:
        assert event.event is None, "dispatch: a synchronous call must return an empty event"
    return outputs


def checked_layout(buffer, topk_idx, num_experts: int):
    """`get_dispatch_layout` into poisoned outputs, exact against the reference; returns
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)."""
    with poisoned_allocations(topk_idx.device):
        ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    want = reference.layout(topk_idx.cpu(), num_experts, buffer.group_size, buffer.num_nvl_ranks)
    names = (
        "num_tokens_per_rank",
        "num_tokens_per_rdma_rank",
        "num_tokens_per_expert",
        "is_token_in_rank",
    )
    for name, got, expected in zip(names, (ntr, ntn, nte, itr), want, strict=False):
        _assert_equal(name, got, expected)
    return ntr, ntn, nte, itr


def check_worst_case(
    ctx,
    buffer,
    config,
    x,
    topk_idx,
    topk_weights,
    layout: dict,
    num_experts: int,
    expected_combine=None,
    check_handle=None,
) -> dict:
    """`num_worst_tokens`: fixed row count, padding rows -1 / 0, rows [0, M) equal to the normal
    dispatch, cached dispatch and combine work with the worst-case handle. For either
    high-throughput mode: `layout` holds the count keyword arguments of the dispatch;
    `expected_combine(y, handle)` is the reference combine of rows `y` on this rank (collective;
    default: the intranode one); `check_handle(handle, num_worst)` checks the mode's handle."""
    group, rank = ctx.group, ctx.rank
    device = x.device
    num_worst = max(1, sum(gather(group, x.size(0))))  # the most any rank can receive
    all_x, all_itr = gather(group, x), gather(group, layout["is_token_in_rank"])
    all_idx, all_w = gather(group, topk_idx), gather(group, topk_weights)
    ref = reference.dispatch(rank, num_experts, all_x, all_itr, all_idx, all_w)
    num_recv = ref["recv_x"].size(0)
    with poisoned_allocations(device):
        recv_x, recv_idx, recv_w, per_expert, handle, _ = buffer.dispatch(
            x,
            **layout,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_worst_tokens=num_worst,
            config=config,
        )
    assert per_expert == [], (
        f"worst-case dispatch: the per-expert list must be [], got {per_expert}"
    )
    assert recv_x.size(0) == num_worst, (recv_x.size(0), num_worst)
    if check_handle is None:
        assert handle[3].size(0) == num_worst, (handle[3].size(0), num_worst)
    else:
        check_handle(handle, num_worst)
    _assert_equal("worst recv_x[:M]", recv_x[:num_recv], ref["recv_x"])
    _assert_equal("worst recv_topk_idx[:M]", recv_idx[:num_recv], ref["recv_topk_idx"])
    _assert_equal("worst recv_topk_weights[:M]", recv_w[:num_recv], ref["recv_topk_weights"])
    assert bool((recv_idx[num_recv:] == -1).all()), (
        "worst-case dispatch: padding rows must have top-k -1"
    )
    assert bool((recv_w[num_recv:] == 0).all()), (
        "worst-case dispatch: padding rows must have weight 0"
    )
    with poisoned_allocations(device):
        cached_x = buffer.dispatch(x, handle=handle, config=config)[0]
    _assert_equal("worst cached recv_x[:M]", cached_x[:num_recv], ref["recv_x"])
    # Combine with a worst-case handle: padding rows of the input are ignored.
    y = recv_x.clone()
    y[num_recv:] = float("nan")
    if expected_combine is None:
        blocks = combine_blocks(group, rank, handle)
        want, _ = reference.combine(rank, gather(group, y), blocks, x.size(0))
    else:
        want = expected_combine(y, handle)
    with poisoned_allocations(device):
        combined, _, _ = buffer.combine(y, handle, config=config)
    _assert_equal("worst combine", combined, want)
    return {"worst_rows": num_worst}
