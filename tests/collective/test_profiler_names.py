"""Profiling-name contract (reference §16): DeepEP's `bench_kineto` harness finds each kernel by
name.

Replays the harness: profile `fn()` with torch.profiler (CUDA activity), 30 calls per step, record
the second step, read `key_averages().table(sort_by='cuda_time_total', max_name_column_width=100)`
and require exactly one line containing each of 'dispatch', 'combine', 'notify' where the call
launches them, and none of them for `get_dispatch_layout`.
"""

import pytest

from conftest import gpu_count

WORDS = ("dispatch", "combine", "notify")


def _rows_with(fn, num_calls=30):
    import torch

    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA], schedule=schedule
    ) as prof:
        for _ in range(2):
            for _ in range(num_calls):
                fn()
            prof.step()
    table = prof.key_averages().table(sort_by="cuda_time_total", max_name_column_width=100)
    return {word: [line for line in table.splitlines() if word in line] for word in WORDS}


def profile_names_task(ctx):
    import torch

    import tritonep
    from tritonep.testing import checks

    buffer = checks.get_buffer(ctx, int(1e9))
    device = checks.device_of(buffer)
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn((1024, 2048), generator=gen).to(torch.bfloat16).to(device)
    topk_idx, topk_weights = checks.make_routing(1024, 64, 4, gen, device)
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, 64)
    config = tritonep.Config(24, 6, 256)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=ntr,
        is_token_in_rank=itr,
        num_tokens_per_expert=nte,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        config=config,
    )
    windows = {
        "layout": (lambda: buffer.get_dispatch_layout(topk_idx, 64), ()),
        # A cached dispatch and a combine open their call in their data launch: no notify.
        "cached dispatch": (
            lambda: buffer.dispatch(x, handle=handle, config=config),
            ("dispatch",),
        ),
        "dispatch": (
            lambda: buffer.dispatch(
                x,
                num_tokens_per_rank=ntr,
                is_token_in_rank=itr,
                num_tokens_per_expert=nte,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                config=config,
            ),
            ("dispatch", "notify"),
        ),
        "combine": (lambda: buffer.combine(recv_x, handle, config=config), ("combine",)),
    }
    problems = []
    for name, (fn, expected) in windows.items():
        rows = _rows_with(fn)
        for word in WORDS:
            want = 1 if word in expected else 0
            if len(rows[word]) != want:
                problems.append(
                    f"{name}: {len(rows[word])} profiler rows contain {word!r}, want {want}: "
                    f"{rows[word]}"
                )
        for word in expected:
            name_part = rows[word][0].split()[0] if rows[word] else ""
            if not name_part.startswith("tritonep::"):
                problems.append(
                    f"{name}: the {word!r} row is not namespace-qualified: {rows[word]}"
                )
    torch.cuda.synchronize()
    return problems


@pytest.mark.gpu
def test_profiler_names_gpu(gpu_pool):
    results = gpu_pool(gpu_count()).run(profile_names_task, timeout=300)
    assert results == [[]] * len(results), results
