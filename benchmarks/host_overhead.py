"""Where the host time of a call goes, on one GPU: layout, cached dispatch, combine, the
low-latency dispatch and combine, and their parts.

    python benchmarks/host_overhead.py [--json out.json]

DeepEP's benchmark records an event, calls the op, records another event, 50 times in a row with
no synchronisation: when the host takes longer per call than the GPU, the GPU waits for the host
and the event time *is* the host time. This prints, for one rank (4096 tokens, top-8 of 256
experts, hidden 7168):
  * per op: the event time (DeepEP's method), the host time per call (a loop of 1000 calls,
    synchronised once) and the kernel time alone (CUDA-graph replay);
  * the host cost of each step of the Python call path (validation, stream hand-offs, allocations,
    launches), each timed in its own loop, so the op's total can be accounted for;
  * the floor under any launch on this host: an empty Triton kernel through Triton's compiled
    launcher and through `cuLaunchKernel` itself (ctypes), a torch `fill_`, an event record.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import tritonep
from tritonep.bench import bench_events, git_commit, host_us
from tritonep.kernels import load_kernels
from tritonep.modes.layout import allocate_outputs
from tritonep.runtime.outputs import addressed
from tritonep.testing import checks


@triton.jit
def _empty_kernel(NOTHING: tl.constexpr):
    pass


def launch_floor_steps(stream: torch.cuda.Stream) -> dict:
    """Host cost of launching an empty kernel, each way there is: through tritonep's launcher
    (Triton's compiled launcher), and through the driver's `cuLaunchKernel` directly (ctypes, a
    prebuilt parameter block: the kernel's only parameters are Triton's scratch pointers, all
    null). The second is what any Python launcher pays at the least."""
    from tritonep.kernels.common.launch import KernelLaunch

    empty = KernelLaunch(_empty_kernel, NOTHING=0, num_warps=1)
    empty.launch((1,), stream)  # compiles
    torch.cuda.synchronize()
    kernel = empty._kernel
    driver = ctypes.CDLL("libcuda.so.1")
    null = ctypes.c_uint64(0)
    params = (ctypes.c_void_p * 4)(*[ctypes.addressof(null)] * 4)  # more slots than it reads
    handle, function, shared = stream.cuda_stream, kernel.function, kernel.metadata.shared

    launch_args = (ctypes.c_void_p(function), 1, 1, 1, 32, 1, 1, shared, ctypes.c_void_p(handle))

    def raw_launch() -> int:
        return driver.cuLaunchKernel(*launch_args, params, None)

    assert raw_launch() == 0, "cuLaunchKernel failed"
    filled = torch.empty(256, device="cuda")
    event = torch.cuda.Event()
    return {
        "empty kernel: tritonep launcher": lambda: empty.launch((1,), stream),
        "empty kernel: cuLaunchKernel (ctypes)": raw_launch,
        "torch fill_ [256] float32": lambda: filled.fill_(1.0),
        "event.record(stream)": lambda: event.record(stream),
    }


def graph_us(fn, launches: int = 20) -> float:
    """Device time per call with the host out of the picture (CUDA graph of `launches` calls)."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
    return bench_events(graph.replay)[0] * 1e6 / launches


def enter_and_leave(context) -> None:
    with context:
        pass


def kernel_times(fn, calls: int = 20) -> dict:
    """Device time per call of each kernel `fn` launches (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {
        e.key: e.self_device_time_total / calls
        for e in prof.key_averages()
        if e.self_device_time_total > 0
    }


def print_profile(name: str, fn, calls: int = 300, top: int = 14) -> None:
    import cProfile
    import pstats

    print(f"\ncProfile of {name}, top functions by own time (inflated by the profiler):")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def measure_op(name: str, fn, defaults: str, num_sms: int | None) -> dict:
    """One op's row (event, host, graph and kernel times), printed as a table line."""
    row = {
        "op": name,
        "defaults": defaults,
        "num_sms": num_sms,
        "event_us": bench_events(fn)[0] * 1e6,
        "host_us": host_us(fn),
        "graph_us": graph_us(fn),
        "kernels_us": kernel_times(fn),
    }
    per_kernel = ", ".join(f"{k.split('::')[-1]} {v:.1f}" for k, v in row["kernels_us"].items())
    print(
        f"{name:<40}{num_sms if num_sms is not None else '-':>5}{row['event_us']:>10.1f}"
        f"{row['host_us']:>10.1f}{row['graph_us']:>10.1f}   {per_kernel}"
    )
    return row


def low_latency_rows(profile: bool) -> list[dict]:
    """The same columns for the low-latency calls at DeepEP's decode shape (128 tokens x 7168,
    top-8 of 288 experts), fused launches, on a one-rank low-latency Buffer."""
    tokens, hidden, num_topk, num_experts = 128, 7168, 8, 288
    buffer = tritonep.Buffer(
        dist.group.WORLD,
        num_rdma_bytes=tritonep.Buffer.get_low_latency_rdma_size_hint(
            tokens, hidden, 1, num_experts
        ),
        low_latency_mode=True,
        explicitly_destroy=True,
    )
    gen = torch.Generator().manual_seed(1)
    topk_idx, topk_weights = checks.make_routing(
        tokens, num_experts, num_topk, gen, "cuda", drop=0.01
    )
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, tokens, num_experts)
    y = torch.randn((num_experts, tokens, hidden), device="cuda").to(torch.bfloat16)
    ops = {
        "low_latency_dispatch (FP8)": lambda: buffer.low_latency_dispatch(
            x, topk_idx, tokens, num_experts
        ),
        "low_latency_combine": lambda: buffer.low_latency_combine(
            y, topk_idx, topk_weights, handle
        ),
    }
    rows = []
    for name, fn in ops.items():
        rows.append(measure_op(name, fn, "plain", None))
        if profile:
            print_profile(name, fn)
    rows += low_latency_steps(buffer, x, topk_idx, topk_weights, y, num_experts)
    buffer.destroy()
    return rows


def launcher_argument_steps(launch_once, stream, inputs: tuple) -> dict:
    """Triton's compiled launcher alone, on the arguments of the launch `launch_once()` makes (a
    compiled plan passes every pointer as an address), and on the same with the caller's tensors
    `inputs` (its leading arguments) passed as tensors, as plans did before 30a287d: the launcher
    calls `data_ptr()` and `cuPointerGetAttribute` for each tensor."""
    from tritonep.kernels.common.launch import KernelLaunch

    captured = []
    original = KernelLaunch.run
    KernelLaunch.run = lambda self, grid, stream, *args: captured.append((self, grid, args))
    try:
        launch_once()
    finally:
        KernelLaunch.run = original
    launch, grid, addresses = captured[0]
    kernel = launch._kernel
    args = (*inputs, *addresses[len(inputs) :])

    def run(arguments):
        kernel.run(
            grid[0],
            1,
            1,
            stream.cuda_stream,
            kernel.function,
            kernel.packed_metadata,
            None,
            None,
            None,
            *arguments,
            *launch._tail,
        )

    tensors = sum(isinstance(a, torch.Tensor) for a in args)
    entry = "its C entry point" if launch.direct else "the launcher (no direct entry)"
    return {
        f"launcher: {len(args)} args, {tensors} tensors": lambda: run(args),
        "launcher: the same, tensors as ints": lambda: run(addresses),
        f"KernelLaunch.run: the same, via {entry}": lambda: launch.run(grid, stream, *addresses),
    }


def low_latency_steps(buffer, x, topk_idx, topk_weights, y, num_experts) -> list[dict]:
    """Host cost of the parts of the low-latency calls, each in its own loop (the plans exist: the
    calls above built them)."""
    from tritonep._validate import check_tensor
    from tritonep.runtime.streams import CallStreams

    mode = buffer._low_latency
    plans = {key[0]: plan for key, plan in mode._plans.items() if isinstance(key, tuple)}
    dispatch_plan, combine_plan = plans["dispatch"], plans["combine"]
    (recv_x, recv_scales), count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, x.size(0), num_experts
    )
    src_info, layout_range = handle[:2]
    out = torch.empty((x.size(0), x.size(1)), dtype=torch.bfloat16, device="cuda")
    stream = buffer._streams.current()
    both = 0  # ROLE_BOTH

    dispatch_outputs = addressed((recv_x, recv_scales, count, src_info, layout_range))
    combine_output = addressed((out,))

    def dispatch_launch():
        dispatch_plan.launch(both, stream, 0, x, topk_idx, x.size(0), dispatch_outputs, None, None)

    steps = {
        "ll: Buffer._ll (usable, mode)": lambda: buffer._ll("op"),
        "ll: check_tensor(x)": lambda: check_tensor(
            "op", "x", x, device=x.device, dtypes=(torch.bfloat16,), dim=2
        ),
        "ll: CallStreams (sync call)": lambda: CallStreams(mode._streams, None, False, False),
        "ll dispatch: outputs from the pool": lambda: mode._outputs.take(
            ("probe-ll",),
            lambda: [torch.empty(16, device="cuda") for _ in range(5)],
            3,
            torch.cuda.current_stream(),
        ),
        "ll dispatch: plan launch only": dispatch_launch,
        "ll combine: plan launch only": lambda: combine_plan.launch(
            both,
            stream,
            0,
            y,
            topk_idx,
            topk_weights,
            x.size(0),
            src_info,
            layout_range,
            combine_output,
            None,
        ),
    }
    steps.update(launcher_argument_steps(dispatch_launch, stream, (x, topk_idx)))
    rows = []
    print(f"{'low-latency step':<40}{'host us':>10}")
    for name, fn in steps.items():
        us = host_us(fn, calls=200)
        rows.append({"step": name, "host_us": us})
        print(f"{name:<40}{us:>10.2f}")
    return rows


def single_rank_buffer(port: int) -> tritonep.Buffer:
    """A Buffer (2 GB of peer memory) over a one-rank NCCL group on the current GPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    return tritonep.Buffer(dist.group.WORLD, num_nvl_bytes=int(2e9))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-sms", type=int, nargs="*", default=[24, 48, 132])
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of layout, dispatch, combine"
    )
    parser.add_argument(
        "--low-latency-only", action="store_true", help="only the low-latency rows and steps"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        # Everything below is GPU host path: CUDA events, graphs, the profiler's device times.
        print(
            "host_overhead.py times the host path of GPU calls and needs a CUDA GPU; torch sees "
            "none here. On the CPU backend, `tritonep bench` checks and times the same calls.",
            file=sys.stderr,
        )
        return 2
    buffer = single_rank_buffer(29555)
    num_tokens, hidden, num_topk, num_experts = 4096, 7168, 8, 256
    gen = torch.Generator().manual_seed(0)
    topk_idx, topk_weights = checks.make_routing(
        num_tokens, num_experts, num_topk, gen, "cuda", drop=0.0
    )
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    counts, _, expert_counts, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    kernels = load_kernels("cuda")
    rows = []

    # The steps of the call path first: the profiler below may leave state that slows launches.
    comm, compute = buffer._streams.comm, torch.cuda.current_stream()
    event = torch.cuda.Event()
    scratch = torch.zeros(1024, dtype=torch.int32, device="cuda")
    mask = buffer._rank_mask
    host_addr = buffer._host.address
    layout_plan = kernels.layout.plan_route_stats(num_tokens, num_topk, num_experts, 1, 1, False)
    outputs = addressed(allocate_outputs(layout_plan, num_tokens, x.device))
    fixed = addressed((scratch, mask))
    steps = {
        "_check_usable": lambda: buffer._check_usable("op"),
        "CommStreams.current()": buffer._streams.current,
        "torch.cuda.current_stream()": torch.cuda.current_stream,
        "event.record + wait_event": lambda: (event.record(compute), comm.wait_event(event)),
        "with torch.cuda.stream(comm)": lambda: enter_and_leave(torch.cuda.stream(comm)),
        "with DisableTorchFunction()": lambda: enter_and_leave(torch._C.DisableTorchFunction()),
        "torch.empty int32 [256]": lambda: torch.empty(256, dtype=torch.int32, device="cuda"),
        "torch.empty bool [4096, 1]": lambda: torch.empty(
            (4096, 1), dtype=torch.bool, device="cuda"
        ),
        "tensor.view(torch.int32)": lambda: x.view(torch.int32),
        "layout plan: launch only": lambda: layout_plan.launch(
            comm, topk_idx, num_tokens, fixed, host_addr, outputs
        ),
        "layout outputs: fresh allocation": lambda: allocate_outputs(
            layout_plan, num_tokens, x.device
        ),
        "layout outputs: from the pool": lambda: buffer._outputs.take(
            "probe",
            lambda: allocate_outputs(layout_plan, num_tokens, x.device),
            3,
            torch.cuda.current_stream(),
        ),
        "EventOverlap()": tritonep.EventOverlap,
        **launch_floor_steps(comm),
    }
    # The floor of DeepEP's event timing here: two event records around a call that does nothing.
    floor_us = bench_events(lambda: None)[0] * 1e6
    rows.append({"step": "event timing of an empty call", "event_us": floor_us})
    print(f"event timing of an empty call: {floor_us:.1f} us")
    print(f"{'step':<40}{'host us':>10}")
    for name, fn in steps.items():
        us = host_us(fn)
        rows.append({"step": name, "host_us": us})
        print(f"{name:<40}{us:>10.2f}")

    for default_device in () if args.low_latency_only else (None, "cuda"):
        # DeepEP's tests run under torch.set_default_device('cuda'): every torch call goes through a
        # Python mode then, unless tritonep switches it off.
        torch.set_default_device(default_device)
        label = "plain" if default_device is None else "default device cuda"
        print(
            f"\n{'op (' + label + ')':<40}{'SMs':>5}{'event us':>10}{'host us':>10}"
            f"{'graph us':>10}   device us"
        )
        for num_sms in args.num_sms:
            config = tritonep.Config(num_sms, 24, 256)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x,
                num_tokens_per_rank=counts,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=expert_counts,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                config=config,
            )
            ops = {
                "get_dispatch_layout": lambda: buffer.get_dispatch_layout(topk_idx, num_experts),
                "dispatch (cached, BF16)": lambda: buffer.dispatch(x, handle=handle, config=config),
                "combine": lambda: buffer.combine(recv_x, handle, config=config),
            }
            for name, fn in ops.items():
                if name == "get_dispatch_layout" and num_sms != args.num_sms[0]:
                    continue
                rows.append(measure_op(name, fn, label, num_sms))
            if args.profile and num_sms == args.num_sms[0] and default_device is None:
                for name in ("get_dispatch_layout", "dispatch (cached, BF16)", "combine"):
                    print_profile(name, ops[name])
    torch.set_default_device(None)
    rows += low_latency_rows(args.profile)
    torch.cuda.synchronize()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": __import__("triton").__version__,
                    "commit": git_commit(),
                    "shape": {
                        "tokens": num_tokens,
                        "hidden": hidden,
                        "topk": num_topk,
                        "experts": num_experts,
                        "ranks": 1,
                        "chunk": 24,
                        "queue": 256,
                    },
                    "rows": rows,
                },
                f,
                indent=1,
            )
    buffer = None  # release peer memory before the process group goes
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
