"""Demo and benchmark of intranode dispatch/combine, measured like DeepEP's tests.

    python -m tritonep.bench                 # GPUs if present (one rank per GPU), else CPU backend
    python -m tritonep.bench --ranks 2 --json benchmarks/results/run.json

Each rank first checks dispatch/combine against the plain-torch reference on fresh random inputs
(`tritonep.testing.checks`), then times, on DeepEP's default shape (4096 tokens, hidden 7168, top-8
of 256 experts):
  * layout: CUDA-event time of `get_dispatch_layout`;
  * dispatch BF16 / FP8 and combine BF16: CUDA-event time around one *cached* call (notify + data
    kernel + stream hand-offs + host launch gaps), DeepEP's method: 50 warm-ups, L2 flushed by
    zeroing 256 MB, 50 timed calls, first dropped, mean;
at `--num-sms` (default 24, DeepEP's test setting) and a sweep of SM counts and chunk sizes, next to
the plain NCCL pipeline (`all_to_all_single` + gather / scatter-add) on the same routing.
Bandwidth = bytes received by the rank (own rows included) / time; FP8 rows count
`hidden * (1 + 4/128)` bytes (spec §17.1). Rank 0 prints the table; `--json` records every figure.
On the CPU backend the same code runs in the Triton interpreter at a toy shape (timings are CPU
timings, printed for completeness only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

FP8_FACTOR = (1 + 4 / 128) / 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_events(fn, num_warmups: int = 50, num_tests: int = 50) -> tuple[float, float, float]:
    """DeepEP's `bench`: (mean, min, max) seconds of `fn` between CUDA events, first sample
    dropped."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        times = []
        for _ in range(min(num_warmups, 2)):
            fn()
        for _ in range(max(2, min(num_tests, 5))):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times = times[1:]
        return sum(times) / len(times), min(times), max(times)
    torch.cuda.synchronize()
    cache = torch.empty(int(256e6 // 4), dtype=torch.int32, device="cuda")
    for _ in range(num_warmups):
        fn()
    cache.zero_()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
    for i in range(num_tests):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=False)][1:]
    return sum(times) / len(times), min(times), max(times)


def bench_kernels(fn, names: tuple[str, ...], num_calls: int = 30) -> dict[str, float]:
    """Device time per call (s) of the kernels whose names contain each of `names`, from the
    profiler.

    DeepEP's `bench_kineto` convention: the profiler's per-kernel totals over `num_calls` calls,
    divided by the number of calls; the kernel-only figure beside the event time of `bench_events`.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(num_calls):
            fn()
        torch.cuda.synchronize()
    totals = dict.fromkeys(names, 0.0)
    for event in prof.key_averages():
        for name in names:
            if name in event.key:
                totals[name] += event.device_time_total  # microseconds
    return {name: total / num_calls / 1e6 for name, total in totals.items()}


class _Ctx:
    """The same shape as a RankPool context, so the shared checks run unchanged."""

    def __init__(self, rank, world_size, group):
        self.rank, self.world_size, self.group, self.state = rank, world_size, group, {}


def gpus_shared(backend: str, world_size: int) -> bool:
    """More GPU ranks than GPUs: ranks share GPUs round-robin (correctness runs; timings are not
    NVLink's)."""
    import torch

    return backend == "cuda" and world_size > torch.cuda.device_count()


def join_group(rank: int, world_size: int, port: int, backend: str):
    """A spawned rank's setup for `backend` ('cpu' or 'cuda'): environment, device, process group.

    CPU: Triton interpreter, gloo. CUDA: one GPU per rank and NCCL, or, with more ranks than GPUs,
    gloo (NCCL refuses two ranks on one GPU) and CUDA IPC peer memory. Returns the WORLD group.
    """
    shared = gpus_shared(backend, world_size)
    if backend == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["TRITONEP_BACKEND"] = "cpu"
    elif shared:
        os.environ["TRITONEP_BACKEND"] = "cuda"
    import torch
    import torch.distributed as dist

    if backend == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if backend == "cuda" and not shared else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    return dist.group.WORLD


def _rank_main(
    rank: int, world_size: int, port: int, args: argparse.Namespace, results_path: str
) -> None:
    use_gpu = args.backend == "cuda"
    group = join_group(rank, world_size, port, args.backend)
    import torch
    import torch.distributed as dist

    import tritonep
    from tritonep.testing import checks

    if use_gpu:
        # As DeepEP's tests do: every torch call then goes through the default-device mode, and
        # the Buffer must still name its own devices.
        torch.set_default_device("cuda")
    ctx = _Ctx(rank, world_size, group)
    record = {"rank": rank, "checks": None, "layout_us": None, "rows": []}
    tokens, hidden, topk, experts = args.tokens, args.hidden, args.topk, args.experts

    buffer = tritonep.Buffer(group, num_nvl_bytes=args.nvl_bytes)
    ctx.state[("buffer", args.nvl_bytes)] = buffer
    device = checks.device_of(buffer)
    if args.check:
        started = time.perf_counter()
        record["checks"] = checks.check_intranode(
            ctx,
            num_tokens=tokens,
            hidden=hidden,
            num_topk=topk,
            num_experts=experts,
            num_sms=args.num_sms,
            chunk=tritonep.Buffer.get_dispatch_config(world_size).num_max_nvl_chunked_send_tokens,
            recv_capacity=256,
            num_nvl_bytes=args.nvl_bytes,
            seed=args.seed,
            matrix=args.matrix,
        )
        record["checks"]["seconds"] = time.perf_counter() - started

    gen = torch.Generator().manual_seed(args.seed + rank)
    x = torch.randn((tokens, hidden), generator=gen, device="cpu").to(torch.bfloat16).to(device)
    x_fp8 = checks.per_token_cast_to_fp8(x)
    topk_idx, topk_weights = checks.make_routing(tokens, experts, topk, gen, device, drop=0.0)
    layout_t = bench_events(lambda: buffer.get_dispatch_layout(topk_idx, experts))[0]
    record["layout_us"] = layout_t * 1e6
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, experts)

    def measure(config, ops=("dispatch_bf16", "dispatch_fp8", "combine")):
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=ntr,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            config=config,
        )
        recv_bytes = recv_x.numel() * 2
        row = {
            "num_sms": config.num_sms,
            "nvl_chunk": config.num_max_nvl_chunked_send_tokens,
            "nvl_buffer": config.num_max_nvl_chunked_recv_tokens,
            "recv_rows": recv_x.size(0),
        }
        for op in ops:
            if op == "dispatch_bf16":
                fn, nbytes = (lambda: buffer.dispatch(x, handle=handle, config=config)), recv_bytes
            elif op == "dispatch_fp8":
                fn, nbytes = (
                    (lambda: buffer.dispatch(x_fp8, handle=handle, config=config)),
                    recv_bytes * FP8_FACTOR,
                )
            else:
                fn, nbytes = (lambda: buffer.combine(recv_x, handle, config=config)), recv_bytes
            t = bench_events(fn)[0]
            row[op] = {"us": t * 1e6, "GBps": nbytes / 1e9 / t}
            if use_gpu:
                data_kernel = "combine" if op == "combine" else "dispatch"
                kernel = bench_kernels(fn, ("notify", data_kernel))
                row[op]["kernel_us"] = {name: v * 1e6 for name, v in kernel.items()}
                row[op]["kernel_GBps"] = (
                    nbytes / 1e9 / kernel[data_kernel] if kernel[data_kernel] else None
                )
        return row

    dispatch_cfg = tritonep.Buffer.get_dispatch_config(world_size)
    combine_cfg = tritonep.Buffer.get_combine_config(world_size)
    sm_counts = [args.num_sms] + (
        [s for s in args.sweep_sms if s != args.num_sms] if args.sweep else []
    )
    for num_sms in sm_counts:
        d = measure(
            tritonep.Config(num_sms, dispatch_cfg.num_max_nvl_chunked_send_tokens, 256),
            ("dispatch_bf16", "dispatch_fp8"),
        )
        c = measure(
            tritonep.Config(num_sms, combine_cfg.num_max_nvl_chunked_send_tokens, 256), ("combine",)
        )
        d["combine"] = c["combine"]
        d["combine_chunk"] = c["nvl_chunk"]
        d["kind"] = "sms"
        record["rows"].append(d)
    base_shape = buffer._intranode.shape
    for variant in args.variants:
        # Program-shape experiments: same figures under another shape (recorded with the row).
        buffer._intranode.set_shape(dataclasses.replace(base_shape, **variant))
        d = measure(
            tritonep.Config(args.num_sms, dispatch_cfg.num_max_nvl_chunked_send_tokens, 256),
            ("dispatch_bf16", "dispatch_fp8"),
        )
        c = measure(
            tritonep.Config(args.num_sms, combine_cfg.num_max_nvl_chunked_send_tokens, 256),
            ("combine",),
        )
        d["combine"], d["combine_chunk"], d["kind"], d["tuning"] = (
            c["combine"],
            c["nvl_chunk"],
            "variant",
            variant,
        )
        record["rows"].append(d)
    buffer._intranode.set_shape(base_shape)
    if args.sweep:
        for chunk in args.sweep_dispatch_chunks:
            row = measure(tritonep.Config(args.num_sms, chunk, 256), ("dispatch_bf16",))
            row["kind"] = "dispatch_chunk"
            record["rows"].append(row)
        for chunk in args.sweep_combine_chunks:
            row = measure(tritonep.Config(args.num_sms, chunk, 256), ("combine",))
            row["kind"] = "combine_chunk"
            record["rows"].append(row)

    if use_gpu and world_size > 1 and not gpus_shared(args.backend, world_size):
        record["nccl"] = nccl_baseline(group, x, itr)

    everyone = [None] * world_size
    dist.all_gather_object(everyone, record, group=group)
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(everyone, f)
    if use_gpu:
        torch.cuda.synchronize()
    dist.barrier(group)
    ctx.state.clear()
    buffer = None  # release peer memory before the process group goes
    dist.destroy_process_group()


def nccl_baseline(group, x, is_token_in_rank) -> dict:
    """The plain NCCL pipeline a user would write without tritonep, timed the same way.

    Dispatch: gather each destination's rows (source-token order), `all_to_all_single`. Combine:
    `all_to_all_single` back, fp32 `index_add_` into the tokens, cast to BF16. Split sizes are
    exchanged once outside the timing (like a cached handle).
    """
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    dests, tokens = is_token_in_rank.T.nonzero(as_tuple=True)  # sorted by destination, then token
    send_counts = torch.bincount(dests, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv = torch.empty((sum(recv_splits), x.size(1)), dtype=x.dtype, device=x.device)
    back = torch.empty((len(tokens), x.size(1)), dtype=x.dtype, device=x.device)

    def dispatch():
        dist.all_to_all_single(
            recv, x.index_select(0, tokens), recv_splits, send_splits, group=group
        )

    def combine():
        dist.all_to_all_single(back, recv, send_splits, recv_splits, group=group)
        out = torch.zeros((x.size(0), x.size(1)), dtype=torch.float32, device=x.device)
        out.index_add_(0, tokens, back.float())
        return out.to(x.dtype)

    nbytes = recv.numel() * 2
    result = {}
    for name, fn in (("dispatch_bf16", dispatch), ("combine", combine)):
        t = bench_events(fn)[0]
        result[name] = {"us": t * 1e6, "GBps": nbytes / 1e9 / t}
    return result


def git_commit() -> str:
    if os.environ.get("TRITONEP_COMMIT"):  # copies without .git (e.g. a GPU machine's working tree)
        return os.environ["TRITONEP_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _print_table(meta: dict, ranks: list) -> None:
    r0 = ranks[0]
    print(
        f"\ntritonep {meta['tritonep']} | {meta['device']} | ranks {meta['ranks']} | backend "
        f"{meta['backend']}"
    )
    print(
        f"shape: {meta['tokens']} tokens x hidden {meta['hidden']}, top-{meta['topk']} of "
        f"{meta['experts']} experts"
    )
    if r0["checks"]:
        print(
            f"correctness: {r0['checks']['dispatches']} dispatches, {r0['checks']['combines']} "
            f"combines "
            f"match the reference on every rank"
        )
    print(f"layout: {r0['layout_us']:.1f} us")
    print(
        f"{'op':<14}{'SMs':>5}{'chunk':>7}{'time us':>10}{'GB/s':>9}"
        f"{'kernel us':>11}{'kernel GB/s':>12}"
        "   (rank 0, event time; kernel = data kernel alone)"
    )
    for op, figures in r0.get("nccl", {}).items():
        print(
            f"{'nccl ' + op:<14}{'-':>5}{'-':>7}{figures['us']:>10.1f}{figures['GBps']:>9.1f}   "
            f"plain NCCL pipeline"
        )
    for row in r0["rows"]:
        for op in ("dispatch_bf16", "dispatch_fp8", "combine"):
            if op in row:
                chunk = (
                    row["combine_chunk"]
                    if (op == "combine" and "combine_chunk" in row)
                    else row["nvl_chunk"]
                )
                extra = f"  {row['tuning']}" if "tuning" in row else ""
                kernel = row[op].get("kernel_us")
                data_kernel = "combine" if op == "combine" else "dispatch"
                kernel_text = (
                    f"{kernel[data_kernel]:>11.1f}{row[op]['kernel_GBps'] or 0:>12.1f}"
                    if kernel
                    else f"{'-':>11}{'-':>12}"
                )
                print(
                    f"{op:<14}{row['num_sms']:>5}{chunk:>7}{row[op]['us']:>10.1f}{row[op]['GBps']:>9.1f}"
                    f"{kernel_text}{extra}"
                )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--ranks", type=int, default=0, help="rank processes (default: GPU count, or 2 on CPU)"
    )
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--topk", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--num-sms", type=int, default=24)
    parser.add_argument(
        "--nvl-bytes",
        type=int,
        default=0,
        help="num_nvl_bytes (default: 2e9 on GPU, 16 MiB on CPU)",
    )
    parser.add_argument("--sweep", action="store_true", help="also sweep SM counts and chunk sizes")
    parser.add_argument("--sweep-sms", type=int, nargs="*", default=[16, 32, 48, 64, 96, 128])
    parser.add_argument(
        "--sweep-dispatch-chunks", type=int, nargs="*", default=list(range(4, 33, 4))
    )
    parser.add_argument(
        "--sweep-combine-chunks", type=int, nargs="*", default=[1, 2, 4, 6, 8, 12, 16]
    )
    parser.add_argument("--matrix", choices=("quick", "full"), default="quick")
    parser.add_argument(
        "--variants",
        type=json.loads,
        default=[],
        help="JSON list of program-shape overrides (tritonep.modes.intranode.ProgramShape fields) "
        "to compare, e.g. '[{\"dispatch_warps\": 16}]'",
    )
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", help="write results (machine, commit, shapes, config, figures) here"
    )
    args = parser.parse_args(argv)

    import torch
    import torch.multiprocessing as mp

    import tritonep

    if args.backend == "auto":
        args.backend = (
            "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
        )
    gpu = args.backend == "cuda"
    if not args.ranks:
        args.ranks = torch.cuda.device_count() if gpu else 2
    defaults = (4096, 7168, 8, 256) if gpu else (64, 256, 4, 16)
    for name, value in zip(("tokens", "hidden", "topk", "experts"), defaults, strict=False):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.nvl_bytes:
        args.nvl_bytes = int(2e9) if gpu else 16 << 20
    if not gpu:
        args.sweep = False
    results_path = os.path.join("/tmp", f"tritonep-bench-{os.getpid()}.json")
    mp.spawn(
        _rank_main,
        args=(args.ranks, _free_port(), args, results_path),
        nprocs=args.ranks,
        join=True,
    )
    with open(results_path) as f:
        ranks = json.load(f)
    os.unlink(results_path)
    meta = {
        "tritonep": tritonep.__version__,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
        "backend": args.backend,
        "ranks": args.ranks,
        "gpus_shared_by_ranks": gpus_shared(args.backend, args.ranks),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "topk": args.topk,
        "experts": args.experts,
        "num_nvl_bytes": args.nvl_bytes,
        "method": "cached-call CUDA-event time, DeepEP convention (spec §17.1), under "
        "torch.set_default_device('cuda'); kernel_us: profiler device time per call",
    }
    _print_table(meta, ranks)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ranks": ranks}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
