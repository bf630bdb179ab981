"""Measuring helpers shared by `tritonep bench` / `tune` / `pressure` and the benchmark scripts.

    python -m tritonep.bench [options]      # the same as `tritonep bench` (see `tritonep bench -h`)

DeepEP's timing method (`bench_events`: CUDA events around each call on the calling stream, 50
warm-ups, L2 flushed once by zeroing 256 MB, 50 timed calls, first dropped, mean; wall-clock per
call on the CPU backend), the profiler's kernel-only time beside it (`bench_kernels`), the set-up of
a spawned rank (`join_group`: backend, device, process group), the plain NCCL pipeline a user would
write without tritonep (`nccl_baseline`), and the commit recorded in result files (`git_commit`).
Bandwidths follow benchmarks §2: bytes received by the rank (own rows included) / time; FP8 rows
count `hidden * (1 + 4/128)` bytes (`FP8_FACTOR` relative to BF16).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

FP8_FACTOR = (1 + 4 / 128) / 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_us(fn, calls: int = 1000) -> float:
    """Host time per call (us) of `fn` in a loop of `calls`, synchronised before and after: what
    the host needs to issue one call. When it exceeds the GPU time of a call, CUDA events around
    the call measure the host."""
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


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


def bench_kernels(fn, names: tuple[str, ...], num_calls: int = 30, group=None) -> dict[str, float]:
    """Device time per call (s) of the kernels whose names contain each of `names`, from the
    profiler: the kernel-only figure beside the event time of `bench_events`.

    DeepEP's `bench_kineto` convention (the profiler's kernel times over `num_calls` calls), with
    the first call left out as in `bench_events`: when several ranks run, the first profiled call
    also waits for peers whose profiler started later (single calls of 4-16 ms at DeepEP's LL
    shape, 2026-12-01).

    `group`: the ranks of a collective `fn`. As DeepEP's `barrier_comm_profiling`, the ranks then
    meet at a barrier and queue one large matmul before the timed calls, so that every rank has
    all its calls queued behind it when it ends: the calls run back to back on the device, and a
    kernel's time is not its wait for a peer whose host issued the call later (without it, at
    DeepEP's LL shape with 2 ranks on one H200, one rank read 110 us for a 43 us dispatch).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if group is not None:
            hold_device_while_host_queues(group)
        for _ in range(num_calls):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    return {name: per_call_time(kernel_times(events, name), num_calls) for name in names}


def hold_device_while_host_queues(group, size: int = 8192) -> None:
    """Barrier, then one `size`^3 fp32 matmul on the current stream (DeepEP's 'large kernel and
    barrier'): what the caller issues next queues behind it on every rank and starts when it
    ends. A host barrier, not a device collective: a gloo group (ranks sharing a GPU) would sync
    the stream on a CUDA all-reduce and empty the queue this builds."""
    import torch
    import torch.distributed as dist

    lhs = torch.randn((size, size), dtype=torch.float32, device="cuda")
    rhs = torch.randn((size, size), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    dist.barrier(group)
    lhs @ rhs


def kernel_times(events, name: str) -> list[float]:
    """Durations (us) of the profiled GPU kernels whose names contain `name`, in launch order."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if name in e.name and e.device_type == DeviceType.CUDA]
    return [e.device_time_total for e in sorted(kernels, key=lambda e: e.time_range.start)]


def per_call_time(times_us: list[float], num_calls: int) -> float:
    """Seconds per call of `num_calls` calls whose kernels took `times_us` in launch order, the
    first call left out; with launches that do not split evenly into calls, the mean over all.

    Example: [900, 10, 12] over 3 calls -> 11e-6 (900 was the wait for the peers).
    """
    per_call, extra = divmod(len(times_us), num_calls)
    if num_calls < 2 or per_call == 0 or extra:
        return sum(times_us) / max(num_calls, 1) / 1e6
    return sum(times_us[per_call:]) / (num_calls - 1) / 1e6


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


def spawn_ranks(rank_main, num_ranks: int, *args) -> list:
    """Run `rank_main(rank, num_ranks, port, *args, results_path)` in `num_ranks` spawned processes
    and return the per-rank records rank 0 wrote to `results_path` (see `gather_records`)."""
    import torch.multiprocessing as mp

    results_path = f"/tmp/tritonep-ranks-{os.getpid()}.json"
    mp.spawn(rank_main, args=(num_ranks, free_port(), *args, results_path), nprocs=num_ranks)
    try:
        with open(results_path) as f:
            return json.load(f)
    finally:
        os.unlink(results_path)


def gather_records(record: dict, group, rank: int, results_path: str) -> None:
    """Collective: every rank's `record` to rank 0, which writes the list to `results_path`."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, record, group=group)
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(everyone, f)


def gpu_run_meta(num_ranks: int, shape: dict, method: str, **extra) -> dict:
    """What a GPU benchmark record says about its run: commit, date, device, versions, the rank
    layout (shared GPUs, forced puts, MPS share), the shape and the timing method."""
    from datetime import datetime, timezone

    import torch

    return {
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "ranks": num_ranks,
        **extra,
        "gpus_shared_by_ranks": gpus_shared("cuda", num_ranks),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "force_put": os.environ.get("TRITONEP_FORCE_PUT", "0"),
        "mps_share": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
        "tuning": {
            name: os.environ[name]
            for name in ("TRITONEP_PROGRAM_SHAPE", "TRITONEP_LL_PROGRAMS")
            if os.environ.get(name)
        },
        "shape": shape,
        "method": method,
    }


def git_commit() -> str:
    if os.environ.get("TRITONEP_COMMIT"):  # copies without .git (e.g. a GPU machine's working tree)
        return os.environ["TRITONEP_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
