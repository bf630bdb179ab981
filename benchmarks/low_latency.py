"""Low-latency mode: correctness, CUDA-graph replays and timings in DeepEP's conventions
(docs/benchmarks.md §2).

    # ranks share the GPUs if needed
    python benchmarks/low_latency.py --ranks 2 --json ll.json
    # every peer through NVSHMEM puts
    TRITONEP_FORCE_PUT=1 python benchmarks/low_latency.py --ranks 2

Shape: DeepEP's decode test, 128 tokens x hidden 7168, top-8 of 288 experts, a few -1 entries.
Each rank first checks a set of combinations against the plain-torch reference
(`tritonep.testing.low_latency`), then captures dispatch -> hook -> combine -> hook in one CUDA
graph and replays it `--replays` times with fresh inputs copied into the captured tensors, checking
every replay, then times:
  * dispatch FP8 and combine BF16 kernel time: profiler device time per call (non-hook calls),
  queued behind a barrier and a large matmul as DeepEP's `barrier_comm_profiling` does;
  * dispatch + combine: CUDA-event time of one non-hook pair (50 warm-ups, L2 flushed, mean of
  2-50);
  * hook mode: send and receive launches, from the profiler's trace (even / odd launches);
  * graph replay: event time of one replay of the captured step, and of a captured non-hook
  dispatch + combine pair (the pair's launches without the host's launch path).
Bytes (§17.3): dispatch `sum_t sel_t * (H + H/128*4 + 16)`, combine `sum_t sel_t * 2H`.
Ranks sharing one GPU run under MPS (start `nvidia-cuda-mps-control -d` first); the GPU is then a
proxy for NVLink: bytes cross HBM, latency and signalling are what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def _split_hook_times(prof, word: str) -> tuple[float, float]:
    """Mean device time (us) of even and odd launches of the kernel named `word`: send, receive."""
    from tritonep.bench import kernel_times

    times = kernel_times(prof.events(), word)
    send, recv = times[0::2], times[1::2]
    return sum(send) / max(len(send), 1), sum(recv) / max(len(recv), 1)


def _rank_main(rank, world_size, port, args, results_path):
    from tritonep.bench import (
        bench_events,
        bench_kernels,
        gather_records,
        hold_device_while_host_queues,
        host_us,
        join_group,
    )
    from tritonep.testing.dist import RankContext

    group = join_group(rank, world_size, port, "cuda")
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from tritonep.testing import low_latency as ll
    from tritonep.testing.checks import make_routing

    ctx = RankContext(rank, world_size, group)
    shape = dict(
        num_tokens=args.tokens,
        hidden=args.hidden,
        num_topk=args.topk,
        num_experts=args.experts,
        max_tokens=args.tokens,
    )
    record = {"rank": rank}
    if args.check:
        combos = (
            ll.full_matrix()
            if args.full
            else [
                dict(
                    use_fp8=True,
                    round_scale=True,
                    use_ue8m0=True,
                    hook=True,
                    twice=True,
                    use_logfmt=True,
                ),
                dict(use_fp8=True, zero_copy=True, with_out=True),
                dict(use_fp8=False, hook=True),
                dict(use_fp8=True, round_scale=True, twice=True),
            ]
        )
        record["checked_combinations"] = ll.check_low_latency_matrix(
            ctx, combos, drop=0.01, **shape
        )
    buffer = ll.ll_buffer(ctx, args.tokens, args.hidden, args.experts)
    gen = torch.Generator().manual_seed(rank)
    topk_idx, topk_weights = make_routing(
        args.tokens, args.experts, args.topk, gen, "cuda", drop=10 / (128 * 8)
    )
    x = (
        torch.randn((args.tokens, args.hidden), generator=gen, dtype=torch.float32)
        .to(torch.bfloat16)
        .cuda()
    )
    T, E = args.tokens, args.experts

    # CUDA graph: the whole step captured once, replayed with fresh inputs, checked every replay.
    static_x, static_idx, static_w = x.clone(), topk_idx.clone(), topk_weights.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compile) outside the capture
            recv, _, handle, _, hook = buffer.low_latency_dispatch(
                static_x, static_idx, T, E, use_fp8=False, return_recv_hook=True
            )
            hook()
            out, _, hook = buffer.low_latency_combine(
                recv, static_idx, static_w, handle, return_recv_hook=True
            )
            hook()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            recv, _, handle, _, hook = buffer.low_latency_dispatch(
                static_x, static_idx, T, E, use_fp8=False, return_recv_hook=True
            )
            hook()
            static_out, _, hook = buffer.low_latency_combine(
                recv, static_idx, static_w, handle, return_recv_hook=True
            )
            hook()
    torch.cuda.current_stream().wait_stream(stream)
    bad = 0
    for replay in range(args.replays):
        g = torch.Generator().manual_seed(10_000 * (replay + 1) + rank)
        idx_r, w_r = make_routing(T, E, args.topk, g, "cuda", drop=0.05)
        static_x.copy_(torch.randn((T, args.hidden), generator=g).to(torch.bfloat16).cuda())
        static_idx.copy_(idx_r)
        static_w.copy_(w_r)
        graph.replay()
        # Identity experts: out[t] = sum over selected k of w[t, k] * x[t], summed in k order in
        # fp32.
        acc = torch.zeros((T, args.hidden), dtype=torch.float32, device="cuda")
        for k in range(args.topk):
            acc = (
                acc
                + torch.where(static_idx[:, k : k + 1] >= 0, static_w[:, k : k + 1], 0.0)
                * static_x.float()
            )
        bad += int(not torch.equal(static_out, acc.to(torch.bfloat16)))
    dist.barrier(group)
    record["graph_replays"] = args.replays
    record["graph_replays_wrong"] = bad

    def dispatch_fp8():
        return buffer.low_latency_dispatch(x, topk_idx, T, E, use_fp8=True)

    recv_fp8, _, handle, _, _ = dispatch_fp8()
    y = (recv_fp8[0].float() * 0 + 1).to(torch.bfloat16)  # any expert output of the right shape

    def combine():
        return buffer.low_latency_combine(y, topk_idx, topk_weights, handle)

    def pair():
        _, _, h, _, _ = dispatch_fp8()
        buffer.low_latency_combine(y, topk_idx, topk_weights, h)

    selections = int((topk_idx >= 0).sum())
    dispatch_bytes = selections * (args.hidden + args.hidden // 128 * 4 + 16)
    combine_bytes = selections * 2 * args.hidden

    def time_pair() -> tuple[float, float]:
        """(event seconds, host us) of one pair. The host's own time per pair (no events): above
        the pair's kernel time, the events measure the host."""
        dist.barrier(group)
        event_t = bench_events(pair)[0]
        dist.barrier(group)
        host = host_us(pair, calls=200)
        dist.barrier(group)
        return event_t, host

    # DeepEP's order: the events of the pair first, then the profiler (a process that has run
    # the profiler may launch slower afterwards; the pair is timed again after it to show that).
    pair_t, pair_host = time_pair()
    kernel = bench_kernels(dispatch_fp8, ("::dispatch",), group=group)["::dispatch"]
    dist.barrier(group)
    kernel_combine = bench_kernels(combine, ("::combine",), group=group)["::combine"]
    pair_t_after, pair_host_after = time_pair()
    # The kernels of that pair loop as it runs (no alignment of the ranks): a kernel's time there
    # includes its wait for the peer's launch of the same call.
    loop_kernels = bench_kernels(pair, ("::dispatch", "::combine"))
    dist.barrier(group)

    def hooked():
        _, _, h, _, dispatch_hook = buffer.low_latency_dispatch(
            x, topk_idx, T, E, use_fp8=True, return_recv_hook=True
        )
        dispatch_hook()
        _, _, combine_hook = buffer.low_latency_combine(
            y, topk_idx, topk_weights, h, return_recv_hook=True
        )
        combine_hook()

    for _ in range(5):
        hooked()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        hold_device_while_host_queues(group)  # as bench_kernels: launches back to back
        for _ in range(20):
            hooked()
        torch.cuda.synchronize()
    send_d, recv_d = _split_hook_times(prof, "::dispatch")
    send_c, recv_c = _split_hook_times(prof, "::combine")
    dist.barrier(group)
    replay_t = bench_events(graph.replay)[0]
    # The non-hook pair as a CUDA graph: the same two launches with the host's launch path out of
    # the way (what a serving stack that captures its decode step sees).
    pair_stream = torch.cuda.Stream()
    pair_stream.wait_stream(torch.cuda.current_stream())
    pair_graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(pair_stream):
        pair()
        with torch.cuda.graph(pair_graph, stream=pair_stream):
            pair()
    torch.cuda.current_stream().wait_stream(pair_stream)
    dist.barrier(group)
    pair_graph_t = bench_events(pair_graph.replay)[0]
    dist.barrier(group)
    record.update(
        {
            "dispatch_fp8_kernel_us": kernel * 1e6,
            "dispatch_GBps": dispatch_bytes / 1e9 / kernel,
            "combine_bf16_kernel_us": kernel_combine * 1e6,
            "combine_GBps": combine_bytes / 1e9 / kernel_combine,
            "dispatch_combine_event_us": pair_t * 1e6,
            "dispatch_combine_GBps": (dispatch_bytes + combine_bytes) / 1e9 / pair_t,
            "dispatch_combine_host_us": pair_host,
            "dispatch_combine_event_us_after_profiler": pair_t_after * 1e6,
            "dispatch_combine_host_us_after_profiler": pair_host_after,
            "pair_loop_dispatch_kernel_us": loop_kernels["::dispatch"] * 1e6,
            "pair_loop_combine_kernel_us": loop_kernels["::combine"] * 1e6,
            "hook_dispatch_send_us": send_d,
            "hook_dispatch_recv_us": recv_d,
            "hook_combine_send_us": send_c,
            "hook_combine_recv_us": recv_c,
            "graph_replay_us": replay_t * 1e6,
            "dispatch_combine_graph_us": pair_graph_t * 1e6,
            "selections": selections,
            # This machine's builds: whether two programs of each fit an SM (see
            # protocol.ll_register_cap).
            "kernel_resources": buffer._low_latency.kernel_resources(),
        }
    )
    gather_records(record, group, rank, results_path)
    torch.cuda.synchronize()
    dist.barrier(group)
    ctx.state.clear()
    buffer = graph = pair_graph = None
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ranks", type=int, default=2, help="rank processes (they share GPUs when there are fewer)"
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank (also T)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument(
        "--replays", type=int, default=100, help="CUDA-graph replays checked one by one"
    )
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the reference checks"
    )
    parser.add_argument(
        "--full", action="store_true", help="check DeepEP's whole combination matrix"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from tritonep.bench import gpu_run_meta, spawn_ranks

    ranks = spawn_ranks(_rank_main, args.ranks, args)
    meta = gpu_run_meta(
        args.ranks,
        {"tokens": args.tokens, "hidden": args.hidden, "topk": args.topk, "experts": args.experts},
        "kernel: profiler device time per call; pair and graph: CUDA events, DeepEP's bench "
        "(benchmarks §2)",
    )
    print(
        f"low-latency, {args.ranks} ranks on {meta['gpus']} GPU(s), force_put={meta['force_put']}, "
        f"{args.tokens} x {args.hidden}, top-{args.topk} of {args.experts}"
    )
    keys = (
        "dispatch_fp8_kernel_us",
        "combine_bf16_kernel_us",
        "dispatch_combine_event_us",
        "dispatch_combine_host_us",
        "dispatch_combine_event_us_after_profiler",
        "dispatch_combine_host_us_after_profiler",
        "pair_loop_dispatch_kernel_us",
        "pair_loop_combine_kernel_us",
        "hook_dispatch_send_us",
        "hook_dispatch_recv_us",
        "hook_combine_send_us",
        "hook_combine_recv_us",
        "graph_replay_us",
        "dispatch_combine_graph_us",
    )
    for r in ranks:
        print(
            f"rank {r['rank']}: checked {r.get('checked_combinations', 0)} combos, graph replays "
            f"wrong {r['graph_replays_wrong']}/{r['graph_replays']}; "
            + ", ".join(f"{k} {r[k]:.1f}" for k in keys)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ranks": ranks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
