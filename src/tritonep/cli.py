"""The `tritonep` command: check a machine, benchmark, tune, pressure-test, compile for sm_90.

    tritonep check               what this machine has, which backend and mode a Buffer would pick
    tritonep bench               correctness, then DeepEP-convention timings (GPU) or time per call
    tritonep tune                sweep SMs x chunk sizes; write a file for TRITONEP_CONFIG_FILE
    tritonep pressure            randomized rounds, each checked against the reference and rerun
    tritonep aot                 compile every kernel for sm_90 (no GPU needed)

`python -m tritonep ...` is the same command. Every subcommand has `--help` and `--json PATH`.

Design: the parent plans, rank processes measure, the parent reports. `bench` and `tune` turn
their options into one list of steps (correctness checks, the layout, then one timed call per op
and config) before spawning the ranks, so the parent knows the total: rank 0 reports each
finished step through a queue and the parent draws progress. The measuring is `tritonep.bench`'s:
the rank set-up (`join_group`), `bench_events` (DeepEP's CUDA-event method on GPUs, wall-clock per
call on the CPU backend), `bench_kernels` (profiler device time) and the plain NCCL baseline.

What the figures mean depends on the backend, and the output prints only what holds there:
* GPU: bandwidth = bytes this rank received (own rows included) / time, FP8 rows counted as
  `hidden * (1 + 4/128)` bytes: DeepEP's convention (docs/benchmarks.md), comparable with its tests.
* CPU: the kernels run in the Triton interpreter, one program after another, at a toy shape.
  What means something is that every output matched the reference, and the time per call (to
  compare configs or commits on one machine). No bandwidth or SM column is printed there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from ._console import Progress, has_module, table

DEFAULT_CONFIG_PATH = "tritonep-config.json"
DEFAULT_PLOT_DIR = "tritonep-plots"
OPS = ("dispatch_bf16", "dispatch_fp8", "combine")
OP_NAMES = {"dispatch_bf16": "dispatch BF16", "dispatch_fp8": "dispatch FP8", "combine": "combine"}


# ------------------------------------------------------------------------------------ plans
@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    topk: int
    experts: int

    def describe(self) -> str:
        return (
            f"{self.tokens} tokens x hidden {self.hidden}, top-{self.topk} of {self.experts} "
            "experts"
        )


@dataclasses.dataclass(frozen=True)
class Point:
    """One timed op at one config; `kind` says which table it belongs to."""

    op: str
    num_sms: int
    chunk: int
    capacity: int
    kind: str

    @property
    def label(self) -> str:
        return f"{OP_NAMES[self.op]}, num_sms {self.num_sms}, chunk {self.chunk}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a rank process does for `bench` or `tune`, in order."""

    backend: str
    shape: Shape
    nvl_bytes: int
    seed: int
    check: str  # "quick", "full" or "none"
    check_config: tuple[int, int, int]  # num_sms, chunk, capacity of the correctness run
    points: tuple[Point, ...]
    kernel_times: bool
    nccl: bool

    def steps(self) -> int:
        return (self.check != "none") + 1 + len(self.points) + self.nccl


def _resolve_common(args: argparse.Namespace) -> None:
    """Fill backend, ranks, shape and memory defaults that depend on the machine."""
    import torch

    if args.backend == "auto":
        from .runtime.topology import select_backend

        args.backend = select_backend()
    gpu = args.backend == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("tritonep: --backend cuda, but torch sees no usable CUDA device")
    if not args.ranks:
        args.ranks = torch.cuda.device_count() if gpu else 2
    defaults = (4096, 7168, 8, 256) if gpu else (64, 256, 4, 16)
    for name, value in zip(("tokens", "hidden", "topk", "experts"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.nvl_bytes:
        args.nvl_bytes = int(2e9) if gpu else 16 << 20


def _shape(args: argparse.Namespace) -> Shape:
    return Shape(args.tokens, args.hidden, args.topk, args.experts)


def _default_configs(num_ranks: int, num_sms: int):
    """The dispatch and combine configs a Buffer uses by default at `num_sms` (the tuned file's
    entries where `TRITONEP_CONFIG_FILE` lists them, else V1's tables)."""
    from . import config

    return config.dispatch_config(num_ranks, num_sms), config.combine_config(num_ranks, num_sms)


def _config_source() -> str:
    from . import _env

    path = _env.config_file()
    return f"TRITONEP_CONFIG_FILE={path}" if path else "V1's tables"


def _sm_limit(backend: str, num_ranks: int) -> int | None:
    """Programs a rank's cooperative grid may hold: its share of the GPU's SMs (None on CPU)."""
    if backend != "cuda":
        return None
    import torch

    gpus = torch.cuda.device_count()
    ranks_per_gpu = -(-num_ranks // gpus)
    return torch.cuda.get_device_properties(0).multi_processor_count // ranks_per_gpu


# ------------------------------------------------------------------------------ rank side
def _time_point(buffer, inputs: dict, point: Point, handles: dict, plan: Plan) -> dict:
    """Time one cached call of `point.op` at its config (the handle is made once per SM count)."""
    import tritonep
    from tritonep.bench import FP8_FACTOR, bench_events, bench_kernels

    config = tritonep.Config(point.num_sms, point.chunk, point.capacity)
    if point.num_sms not in handles:
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            inputs["x"],
            num_tokens_per_rank=inputs["num_tokens_per_rank"],
            is_token_in_rank=inputs["is_token_in_rank"],
            num_tokens_per_expert=inputs["num_tokens_per_expert"],
            topk_idx=inputs["topk_idx"],
            topk_weights=inputs["topk_weights"],
            config=config,
        )
        handles[point.num_sms] = (recv_x, handle)
    recv_x, handle = handles[point.num_sms]
    nbytes = recv_x.numel() * 2
    if point.op == "dispatch_bf16":
        fn = lambda: buffer.dispatch(inputs["x"], handle=handle, config=config)  # noqa: E731
    elif point.op == "dispatch_fp8":
        fn = lambda: buffer.dispatch(inputs["x_fp8"], handle=handle, config=config)  # noqa: E731
        nbytes *= FP8_FACTOR
    else:
        fn = lambda: buffer.combine(recv_x, handle, config=config)  # noqa: E731
    seconds = bench_events(fn)[0]
    row = {**dataclasses.asdict(point), "recv_rows": recv_x.size(0), "bytes": nbytes}
    row["us"] = seconds * 1e6
    if plan.backend == "cuda":
        row["GBps"] = nbytes / 1e9 / seconds
        if plan.kernel_times:
            data_kernel = "combine" if point.op == "combine" else "dispatch"
            # One kernel per call: a cached dispatch or a combine opens its call in its data launch.
            kernels = bench_kernels(fn, (data_kernel,))
            row["kernel_us"] = {name: value * 1e6 for name, value in kernels.items()}
            row["kernel_GBps"] = (
                nbytes / 1e9 / kernels[data_kernel] if kernels[data_kernel] else None
            )
    return row


def _rank_main(rank: int, world_size: int, port: int, plan: Plan, path: str, queue) -> None:
    """One rank of `bench` / `tune`: run the plan's steps, report each to the parent (rank 0)."""
    from tritonep.bench import bench_events, join_group, nccl_baseline
    from tritonep.testing.dist import RankContext

    group = join_group(rank, world_size, port, plan.backend)
    import torch
    import torch.distributed as dist

    import tritonep
    from tritonep.testing import checks

    def done(label: str) -> None:
        if rank == 0:
            queue.put(label)

    if plan.backend == "cuda":
        # DeepEP's tests time under a default CUDA device; so do we, for comparable figures.
        torch.set_default_device("cuda")
    ctx = RankContext(rank, world_size, group)
    buffer = tritonep.Buffer(group, num_nvl_bytes=plan.nvl_bytes)
    ctx.state[("buffer", plan.nvl_bytes)] = buffer
    record: dict[str, Any] = {"rank": rank, "checks": None, "points": [], "nccl": None}
    shape = plan.shape
    if plan.check != "none":
        started = time.perf_counter()
        num_sms, chunk, capacity = plan.check_config
        record["checks"] = checks.check_intranode(
            ctx,
            num_tokens=shape.tokens,
            hidden=shape.hidden,
            num_topk=shape.topk,
            num_experts=shape.experts,
            num_sms=num_sms,
            chunk=chunk,
            recv_capacity=capacity,
            num_nvl_bytes=plan.nvl_bytes,
            seed=plan.seed,
            matrix=plan.check,
        )
        record["checks"]["seconds"] = time.perf_counter() - started
        done("correctness checks")

    device = checks.device_of(buffer)
    gen = torch.Generator().manual_seed(plan.seed + rank)
    x = torch.randn((shape.tokens, shape.hidden), generator=gen, device="cpu")
    x = x.to(torch.bfloat16).to(device)
    topk_idx, topk_weights = checks.make_routing(
        shape.tokens, shape.experts, shape.topk, gen, device, drop=0.0
    )
    record["layout_us"] = (
        bench_events(lambda: buffer.get_dispatch_layout(topk_idx, shape.experts))[0] * 1e6
    )
    ntr, _, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, shape.experts)
    done("layout")
    inputs = dict(
        x=x,
        x_fp8=checks.per_token_cast_to_fp8(x),
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_tokens_per_rank=ntr,
        num_tokens_per_expert=nte,
        is_token_in_rank=itr,
    )
    handles: dict = {}
    for point in plan.points:
        record["points"].append(_time_point(buffer, inputs, point, handles, plan))
        done(point.label)
    if plan.nccl:
        record["nccl"] = nccl_baseline(group, x, itr)
        done("NCCL baseline")

    everyone = [None] * world_size
    dist.all_gather_object(everyone, record, group=group)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(everyone, f)
    if plan.backend == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group)
    handles.clear()
    ctx.state.clear()
    buffer = None  # peer memory goes before the process group
    dist.destroy_process_group()


def _run_ranks(target: Callable, args: tuple, num_ranks: int, total: int, title: str, quiet: bool):
    """Spawn `num_ranks` processes running `target(rank, num_ranks, port, *args, path, queue)`;
    draw rank 0's progress; return what rank 0 wrote to `path` (every rank's record)."""
    import torch.multiprocessing as mp

    from .bench import free_port

    path = os.path.join("/tmp", f"tritonep-cli-{os.getpid()}.json")
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        target,
        args=(num_ranks, free_port(), *args, path, queue),
        nprocs=num_ranks,
        join=False,
        start_method="spawn",
    )
    try:
        with Progress(total, title, enabled=not quiet) as progress:
            finished = False
            while not finished:
                finished = context.join(timeout=0.2)
                while not queue.empty():
                    progress.advance(queue.get())
        with open(path) as f:
            return json.load(f)
    except mp.ProcessRaisedException as e:
        raise SystemExit(f"tritonep: a rank process failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise SystemExit(f"tritonep: a rank process died: {e}") from None
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _meta(args: argparse.Namespace, command: str) -> dict:
    import torch

    from . import __version__
    from .bench import gpus_shared
    from .modes.intranode import program_shape as intranode_program_shape

    gpu = args.backend == "cuda"
    return {
        "command": command,
        "tritonep": __version__,
        "commit": _commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if gpu else _cpu_name(),
        "backend": args.backend,
        "ranks": args.ranks,
        "gpus_shared_by_ranks": gpus_shared(args.backend, args.ranks),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": dataclasses.asdict(_shape(args)),
        "num_nvl_bytes": args.nvl_bytes,
        "configs_from": _config_source(),
        "program_shape": dataclasses.asdict(intranode_program_shape(args.backend, args.ranks)),
        "method": _method(args.backend),
    }


def _commit() -> str:
    """The source commit: `TRITONEP_COMMIT` (copies without .git), else git at the package's
    directory (not the working directory: the command may run anywhere), else "unknown"."""
    if os.environ.get("TRITONEP_COMMIT"):
        return os.environ["TRITONEP_COMMIT"]
    status, out = _git("rev-parse", "--short", "HEAD")
    return out if status == 0 and out else "unknown"


def _git(*command: str) -> tuple[int, str]:
    try:
        done = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.abspath(__file__)), *command],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return -1, ""
    return done.returncode, done.stdout.strip()


def _wrap(text: str) -> str:
    """A note wrapped at 100 columns, like the rest of the output."""
    import textwrap

    return textwrap.fill(text, width=100)


def _cpu_name() -> str:
    return f"{platform.machine() or 'cpu'}, {os.cpu_count()} cores"


def _method(backend: str) -> str:
    if backend == "cuda":
        return (
            "us: CUDA-event time of one cached call (its one data kernel + stream hand-offs + "
            "host gaps), DeepEP's method: 50 warm-ups, L2 flushed by zeroing 256 MB, 50 timed "
            "calls, first dropped, mean; under torch.set_default_device('cuda'). GBps: bytes "
            "received by the rank (own rows included; FP8 rows hidden * (1 + 4/128)) / time. "
            "kernel_us: torch.profiler device time per call over 30 calls"
        )
    return (
        "us: wall-clock time (time.perf_counter) of one cached call on the CPU backend (kernels "
        "in the Triton interpreter), mean of 4 calls after 2 warm-ups and 1 dropped call; no "
        "bandwidth: interpreter times say nothing about GPU speed"
    )


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------- bench
def _bench_points(args: argparse.Namespace) -> tuple[Point, ...]:
    dispatch, combine = _default_configs(args.ranks, args.num_sms)
    chunk_d, cap_d = (
        dispatch.num_max_nvl_chunked_send_tokens,
        dispatch.num_max_nvl_chunked_recv_tokens,
    )
    chunk_c, cap_c = (
        combine.num_max_nvl_chunked_send_tokens,
        combine.num_max_nvl_chunked_recv_tokens,
    )
    points = []
    for num_sms in [args.num_sms] + (
        [s for s in args.sweep_sms if s != args.num_sms] if args.sweep else []
    ):
        kind = "default" if num_sms == args.num_sms else "sms"
        points += [
            Point("dispatch_bf16", num_sms, chunk_d, cap_d, kind),
            Point("dispatch_fp8", num_sms, chunk_d, cap_d, kind),
            Point("combine", num_sms, chunk_c, cap_c, kind),
        ]
    if args.sweep:
        points += [
            Point(op, args.num_sms, c, cap_d, kind)
            for op, kind in (("dispatch_bf16", "dispatch_chunk"), ("dispatch_fp8", "fp8_chunk"))
            for c in args.sweep_dispatch_chunks
            if c < cap_d
        ]
        points += [
            Point("combine", args.num_sms, c, cap_c, "combine_chunk")
            for c in args.sweep_combine_chunks
            if c < cap_c
        ]
    return tuple(points)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import gpus_shared

    _resolve_common(args)
    gpu = args.backend == "cuda"
    if args.num_sms is None:
        args.num_sms = 24 if gpu else 4
    if args.sweep and not gpu:
        raise SystemExit(
            "tritonep bench: --sweep times GPU configurations; on the CPU backend `tritonep tune` "
            "prints the time per call of each config"
        )
    limit = _sm_limit(args.backend, args.ranks)
    if args.sweep and limit:
        args.sweep_sms = [s for s in args.sweep_sms if s <= limit]
    dispatch, _ = _default_configs(args.ranks, args.num_sms)
    plan = Plan(
        backend=args.backend,
        shape=_shape(args),
        nvl_bytes=args.nvl_bytes,
        seed=args.seed,
        check=args.check,
        check_config=(
            args.num_sms,
            dispatch.num_max_nvl_chunked_send_tokens,
            dispatch.num_max_nvl_chunked_recv_tokens,
        ),
        points=_bench_points(args),
        kernel_times=gpu,
        nccl=gpu and args.ranks > 1 and not gpus_shared(args.backend, args.ranks),
    )
    title = f"bench: {args.ranks} ranks, {args.backend}"
    ranks = _run_ranks(_rank_main, (plan,), args.ranks, plan.steps(), title, args.quiet)
    meta = _meta(args, "bench")
    print(_bench_report(meta, plan, ranks))
    _write_json(args.json, {"meta": meta, "ranks": ranks})
    if args.plot:
        _plot_bench(args.plot, meta, ranks[0])
    return 0


def _bench_report(meta: dict, plan: Plan, ranks: list) -> str:
    gpu = meta["backend"] == "cuda"
    r0 = ranks[0]
    where = (
        f"{meta['device']}, {meta['ranks']} ranks"
        + (
            " sharing GPUs (correctness only: timings are not NVLink's)"
            if meta["gpus_shared_by_ranks"]
            else ""
        )
        if gpu
        else f"CPU ({meta['device']}), {meta['ranks']} rank processes, Triton interpreter"
    )
    lines = [
        f"tritonep {meta['tritonep']} bench | {where} | commit {meta['commit']}",
        f"shape: {plan.shape.describe()}; configs from {meta['configs_from']}",
    ]
    if r0["checks"]:
        lines.append(
            f"correctness: {r0['checks']['dispatches']} dispatches and {r0['checks']['combines']} "
            f"combines matched the reference exactly on every rank ({plan.check} matrix, "
            f"{r0['checks']['seconds']:.1f} s)"
        )
    else:
        lines.append("correctness: not checked (--check none)")
    defaults = [p for p in r0["points"] if p["kind"] == "default"]
    if gpu:
        lines.append(f"layout (get_dispatch_layout): {r0['layout_us']:.1f} us\n")
        rows = [
            [
                OP_NAMES[p["op"]],
                p["num_sms"],
                p["chunk"],
                p["us"],
                p["GBps"],
                p["kernel_us"]["combine" if p["op"] == "combine" else "dispatch"],
                p["kernel_GBps"],
            ]
            for p in defaults
        ]
        for op, figures in (r0.get("nccl") or {}).items():
            rows.append(
                [f"NCCL {OP_NAMES[op]}", None, None, figures["us"], figures["GBps"], None, None]
            )
        lines.append(
            table(
                [
                    "op (rank 0)",
                    "SMs",
                    "chunk",
                    "time us",
                    "GB/s (NVL)",
                    "kernel us",
                    "kernel GB/s",
                ],
                rows,
            )
        )
        lines.append(_gpu_sweep_tables(r0["points"]))
        lines.append("")
        lines.append(
            _wrap(
                "GB/s (NVL): bytes received by the rank (own rows included; FP8 rows count "
                "hidden*(1+4/128)) / time, DeepEP's convention. time: CUDA-event time of one "
                "cached call (data kernel + hand-offs + host gaps); kernel: profiler "
                "time of the data kernel alone. NCCL: all_to_all_single pipeline, same routing."
            )
        )
    else:
        lines.append("")
        rows = [["layout (get_dispatch_layout)", None, r0["layout_us"] / 1e3, None]]
        rows += [
            [
                OP_NAMES[p["op"]] + (" (cached)" if p["op"] != "combine" else ""),
                p["chunk"],
                p["us"] / 1e3,
                p["recv_rows"],
            ]
            for p in defaults
        ]
        lines.append(table(["op (rank 0)", "chunk", "ms per call", "rows received"], rows))
        lines.append("")
        lines.append(
            _wrap(
                "ms per call: wall-clock time in the Triton interpreter (num_sms "
                f"{defaults[0]['num_sms']}), to compare configs or commits on this machine; it "
                "says nothing about GPU speed."
            )
        )
    return "\n".join(lines)


def _gpu_sweep_tables(points: list) -> str:
    by_sms: dict[int, dict] = {}
    for p in points:
        if p["kind"] in ("default", "sms"):
            by_sms.setdefault(p["num_sms"], {})[p["op"]] = p
    parts = []
    if len(by_sms) > 1:
        rows = [
            [sms] + [ops[op]["GBps"] if op in ops else None for op in OPS]
            for sms, ops in sorted(by_sms.items())
        ]
        parts.append("\nSM sweep (default chunks), GB/s (NVL):")
        parts.append(table(["SMs"] + [OP_NAMES[op] for op in OPS], rows))
    for kind, name in (
        ("dispatch_chunk", "dispatch BF16"),
        ("fp8_chunk", "dispatch FP8"),
        ("combine_chunk", "combine"),
    ):
        rows = [[p["chunk"], p["us"], p["GBps"]] for p in points if p["kind"] == kind]
        if rows:
            best = max(rows, key=lambda r: r[2])
            parts.append(
                f"\n{name} chunk sweep at {points[0]['num_sms']} SMs (best: chunk {best[0]}):"
            )
            parts.append(table(["chunk", "time us", "GB/s (NVL)"], rows))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ plots
def _pyplot():
    """matplotlib's pyplot on a file-only backend, or None (said once) when not installed."""
    if not has_module("matplotlib"):
        print(
            "--plot: matplotlib is not installed, no charts written "
            "(pip install matplotlib, or pip install 'tritonep[tools]')"
        )
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, directory: str, name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_bench(directory: str, meta: dict, r0: dict) -> None:
    plt = _pyplot()
    if plt is None:
        return
    gpu = meta["backend"] == "cuda"
    written = []
    defaults = [p for p in r0["points"] if p["kind"] == "default"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["layout"] + [OP_NAMES[p["op"]] for p in defaults]
    if gpu:
        # Phases of one call: its data kernel (a cached dispatch or a combine launches no
        # notify), and the rest of the event time (host path, hand-offs, gaps); the layout is one
        # kernel plus its host path.
        data = [0.0] + [
            p["kernel_us"]["combine" if p["op"] == "combine" else "dispatch"] for p in defaults
        ]
        total = [r0["layout_us"]] + [p["us"] for p in defaults]
        rest = [max(t - d, 0.0) for t, d in zip(total, data, strict=True)]
        ax.bar(names, data, label="data kernel")
        ax.bar(names, rest, bottom=data, label="host, hand-offs, gaps")
        ax.set_ylabel("us per call (rank 0)")
        ax.legend()
    else:
        ax.bar(names, [r0["layout_us"] / 1e3] + [p["us"] / 1e3 for p in defaults])
        ax.set_ylabel("ms per call, Triton interpreter (rank 0)")
    ax.set_title(f"latency per phase: {meta['ranks']} ranks, {meta['device']}")
    written.append(_save(plt, fig, directory, "latency_per_phase.png"))
    sms = sorted({p["num_sms"] for p in r0["points"] if p["kind"] in ("default", "sms")})
    if gpu and len(sms) > 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        for op in OPS:
            xs = [
                p["num_sms"]
                for p in r0["points"]
                if p["kind"] in ("default", "sms") and p["op"] == op
            ]
            ys = [
                p["GBps"] for p in r0["points"] if p["kind"] in ("default", "sms") and p["op"] == op
            ]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=OP_NAMES[op])
        ax.set_xlabel("SMs (Config.num_sms)")
        ax.set_ylabel("GB/s (NVL), DeepEP convention")
        ax.set_title("bandwidth against SMs (default chunks)")
        ax.legend()
        written.append(_save(plt, fig, directory, "bandwidth_vs_sms.png"))
    chunk_rows = {
        k: [p for p in r0["points"] if p["kind"] == k]
        for k in ("dispatch_chunk", "fp8_chunk", "combine_chunk")
    }
    if gpu and any(chunk_rows.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for rows in chunk_rows.values():
            if rows:
                ax.plot(
                    [p["chunk"] for p in rows],
                    [p["GBps"] for p in rows],
                    marker="o",
                    label=OP_NAMES[rows[0]["op"]],
                )
        ax.set_xlabel("chunk (num_max_nvl_chunked_send_tokens)")
        ax.set_ylabel("GB/s (NVL), DeepEP convention")
        ax.set_title(f"bandwidth against chunk size at {r0['points'][0]['num_sms']} SMs")
        ax.legend()
        written.append(_save(plt, fig, directory, "bandwidth_vs_chunk.png"))
    elif not gpu:
        print("--plot: bandwidth charts need a GPU run with --sweep; CPU runs chart time per call")
    print("wrote " + ", ".join(written))


def _plot_tune(directory: str, meta: dict, points: list) -> None:
    plt = _pyplot()
    if plt is None:
        return
    gpu = meta["backend"] == "cuda"
    value = (lambda p: p["GBps"]) if gpu else (lambda p: p["us"] / 1e3)
    unit = "GB/s (NVL), DeepEP convention" if gpu else "ms per call (Triton interpreter)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, op in zip(axes, ("dispatch_bf16", "combine"), strict=True):
        for sms in sorted({p["num_sms"] for p in points}):
            rows = sorted(
                (p for p in points if p["op"] == op and p["num_sms"] == sms),
                key=lambda p: p["chunk"],
            )
            ax.plot(
                [p["chunk"] for p in rows],
                [value(p) for p in rows],
                marker="o",
                label=f"num_sms {sms}",
            )
        ax.set_title(OP_NAMES[op])
        ax.set_xlabel("chunk (num_max_nvl_chunked_send_tokens)")
        ax.set_ylabel(unit)
        ax.legend(fontsize="small")
    fig.suptitle(f"tune: {meta['ranks']} ranks, {meta['device']}")
    print("wrote " + _save(plt, fig, directory, "tune_chunks.png"))


# ------------------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    _resolve_common(args)
    gpu = args.backend == "cuda"
    sms_list = args.sms or ([16, 24, 32, 48, 64, 96, 128] if gpu else [2, 4])
    limit = _sm_limit(args.backend, args.ranks)
    if limit:
        sms_list = [s for s in sms_list if s <= limit] or [limit - limit % 2]
    # CPU lists are short: each point is seconds of interpreter time (about a minute in all).
    dispatch_chunks = args.dispatch_chunks or (list(range(4, 33, 4)) if gpu else [4, 16])
    combine_chunks = args.combine_chunks or ([1, 2, 4, 6, 8, 12, 16] if gpu else [2, 8])
    from . import config as _config

    v1_dispatch = _config.v1_entry(_config.DISPATCH_TABLE, args.ranks)
    v1_combine = _config.v1_entry(_config.COMBINE_TABLE, args.ranks)
    points = []
    for num_sms in sms_list:
        for op, chunks, v1 in (
            ("dispatch_bf16", dispatch_chunks, v1_dispatch),
            ("combine", combine_chunks, v1_combine),
        ):
            for chunk in sorted(set(chunks) | {v1[0]}):
                if chunk < v1[1]:
                    points.append(Point(op, num_sms, chunk, v1[1], "tune"))
    plan = Plan(
        backend=args.backend,
        shape=_shape(args),
        nvl_bytes=args.nvl_bytes,
        seed=args.seed,
        check="quick" if args.check else "none",
        check_config=(sms_list[0], v1_dispatch[0], v1_dispatch[1]),
        points=tuple(points),
        kernel_times=False,
        nccl=False,
    )
    title = f"tune: {args.ranks} ranks, {args.backend}, {len(points)} configs"
    ranks = _run_ranks(_rank_main, (plan,), args.ranks, plan.steps(), title, args.quiet)
    meta = _meta(args, "tune")
    meta["configs_from"] = "swept (V1's tables as the baseline)"
    # A collective is as fast as its slowest rank: judge each config by the slowest rank's time.
    worst = [max(r["points"][i]["us"] for r in ranks) for i in range(len(points))]
    merged = [dict(p, us=w) for p, w in zip(ranks[0]["points"], worst, strict=True)]
    for p in merged:
        if gpu:
            p["GBps"] = p["bytes"] / 1e3 / p["us"]
    best = _best_chunks(merged)
    print(_tune_report(meta, plan, merged, best, v1_dispatch, v1_combine))
    entries = {
        "dispatch": {
            sms: [chunk, *v1_dispatch[1:]] for sms, chunk in best["dispatch_bf16"].items()
        },
        "combine": {sms: [chunk, *v1_combine[1:]] for sms, chunk in best["combine"].items()},
    }
    path = _write_config_file(args.output, args.ranks, entries, {"meta": meta, "points": merged})
    print(
        f"\nwrote {path}: dispatch and combine entries for {args.ranks} ranks at num_sms {sms_list}"
    )
    print(f"use it:  export TRITONEP_CONFIG_FILE={os.path.abspath(path)}")
    _write_json(args.json, {"meta": meta, "ranks": ranks, "best": best})
    if args.plot:
        _plot_tune(args.plot, meta, merged)
    return 0


def _best_chunks(points: list) -> dict[str, dict[int, int]]:
    """op -> num_sms -> the chunk with the lowest time (ties to the smaller chunk)."""
    best: dict[str, dict[int, tuple[float, int]]] = {"dispatch_bf16": {}, "combine": {}}
    for p in points:
        key = (p["us"], p["chunk"])
        current = best[p["op"]].get(p["num_sms"])
        if current is None or key < current:
            best[p["op"]][p["num_sms"]] = key
    return {op: {sms: key[1] for sms, key in by_sms.items()} for op, by_sms in best.items()}


def _tune_report(meta, plan, points, best, v1_dispatch, v1_combine) -> str:
    gpu = meta["backend"] == "cuda"

    def figure(op: str, sms: int, chunk: int):
        p = next(p for p in points if p["op"] == op and p["num_sms"] == sms and p["chunk"] == chunk)
        return p["GBps"] if gpu else p["us"] / 1e3

    rows = []
    for sms in sorted(best["dispatch_bf16"]):
        d, c = best["dispatch_bf16"][sms], best["combine"][sms]
        rows.append(
            [
                sms,
                d,
                figure("dispatch_bf16", sms, d),
                figure("dispatch_bf16", sms, v1_dispatch[0]),
                c,
                figure("combine", sms, c),
                figure("combine", sms, v1_combine[0]),
            ]
        )
    unit = "GB/s" if gpu else "ms"
    headers = [
        "SMs" if gpu else "num_sms",
        "dispatch chunk",
        unit,
        f"{unit} at V1 chunk {v1_dispatch[0]}",
        "combine chunk",
        unit,
        f"{unit} at V1 chunk {v1_combine[0]}",
    ]
    where = meta["device"] if gpu else "CPU backend (Triton interpreter: times, not bandwidth)"
    note = (
        "GB/s (NVL): DeepEP's convention over CUDA-event time; slowest rank per config."
        if gpu
        else "ms: wall-clock per cached call in the interpreter, slowest rank per config; these "
        "pick configs for this CPU run only."
    )
    return "\n".join(
        [
            f"tritonep {meta['tritonep']} tune | {where} | {meta['ranks']} ranks | "
            f"commit {meta['commit']}",
            f"shape: {plan.shape.describe()}",
            "",
            table(headers, rows),
            "",
            _wrap(note),
        ]
    )


def _write_config_file(path: str, num_ranks: int, entries: dict, measured: dict) -> str:
    """Write (or update) a config file: entries of other rank counts already in it are kept."""
    from .config import CONFIG_FILE_FORMAT

    content: dict[str, Any] = {"format": CONFIG_FILE_FORMAT, "dispatch": {}, "combine": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("format") == CONFIG_FILE_FORMAT:
            content.update(old)
    for kind, by_sms in entries.items():
        content[kind][str(num_ranks)] = {str(sms): values for sms, values in by_sms.items()}
    content.setdefault("measured", {})[str(num_ranks)] = measured
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
    return path


def cmd_check(args: argparse.Namespace) -> int:
    from .envcheck import report

    return report(args.ranks, args.json)


# --------------------------------------------------------------------------------- pressure
def _pressure_rank(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    first_seed: int,
    rounds: int,
    seconds: float,
    path: str,
    queue,
) -> None:
    """One rank of `pressure`: `tritonep.testing.pressure.run_rounds`, reported round by round."""
    import torch.distributed as dist

    from tritonep.bench import join_group
    from tritonep.testing import pressure
    from tritonep.testing.dist import RankContext

    def report(seed: int, failed: bool) -> None:
        if rank == 0:
            queue.put(f"seed {seed}" + (" FAILED" if failed else ""))

    ctx = RankContext(rank, world_size, join_group(rank, world_size, port, backend))
    space = pressure.GPU_SPACE if backend == "cuda" else pressure.CPU_SPACE
    result = pressure.run_rounds(ctx, first_seed, rounds, space, seconds, on_round=report)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(everyone, f)
    ctx.state.clear()
    dist.destroy_process_group()


def cmd_pressure(args: argparse.Namespace) -> int:
    import torch

    from .bench import gpus_shared

    if args.backend == "auto":
        from .runtime.topology import select_backend

        args.backend = select_backend()
    gpu = args.backend == "cuda"
    if not args.ranks:
        args.ranks = torch.cuda.device_count() if gpu else 2
    if args.rounds is None:
        args.rounds = 100 if gpu else 10
    if args.rounds == 0:
        print("pressure: --rounds 0: no rounds run, nothing was checked")
        return 0
    started = time.perf_counter()
    title = f"pressure: {args.ranks} ranks, {args.backend}"
    per_rank = _run_ranks(
        _pressure_rank,
        (args.backend, args.seed, args.rounds, args.seconds),
        args.ranks,
        args.rounds,
        title,
        args.quiet,
    )
    elapsed = time.perf_counter() - started
    done = per_rank[0]["rounds"]
    failed = [f for r in per_rank for f in r["failures"]]
    last = args.seed + done - 1
    print(
        f"pressure: {done} rounds (seeds {args.seed}-{last}) on {args.ranks} ranks, backend "
        f"{args.backend}, {elapsed:.1f} s"
        + (
            f"; stopped by --seconds {args.seconds:g} before {args.rounds}"
            if done < args.rounds and not failed
            else ""
        )
    )
    if failed:
        print(f"result: FAILED, {len(failed)} failure(s):")
        for failure in failed:
            print(f"  {failure}")
    elif done == 0:
        print("result: no round finished, nothing was checked")
    else:
        print(
            f"result: all {done} rounds matched the reference exactly and hashed identically "
            "when rerun"
        )
    if done:
        print(
            _wrap(
                "digest per rank: sha256 over its round hashes; the same seeds, backend and rank "
                "count give the same digests"
            )
        )
        print(
            table(
                ["rank", "rounds", "digest", "seconds"],
                [[i, r["rounds"], r["digest"], r["seconds"]] for i, r in enumerate(per_rank)],
                indent="  ",
            )
        )
    _write_json(
        args.json,
        {
            "backend": args.backend,
            "ranks": args.ranks,
            "first_seed": args.seed,
            "requested_rounds": args.rounds,
            "seconds_limit": args.seconds,
            "gpus_shared_by_ranks": gpus_shared(args.backend, args.ranks),
            "commit": _commit(),
            "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "seconds": elapsed,
            "per_rank": per_rank,
        },
    )
    return 1 if failed else 0


# -------------------------------------------------------------------------------------- aot
def cmd_aot(args: argparse.Namespace) -> int:
    from . import _env

    if _env.interpret_enabled():
        raise SystemExit(
            "tritonep aot: TRITON_INTERPRET is set, and the interpreter compiles nothing; "
            "run without it"
        )
    from .testing import aot

    with Progress(1, "compiling every kernel launch for sm_90", enabled=not args.quiet) as progress:
        started = time.perf_counter()
        report = aot.compile_all()
        progress.advance(f"{len(report)} kernels")
    rows = [
        [
            r["module"],
            _demangle(r["name"]),
            r["num_ranks"],
            r["registers"],
            r["stack"],
            r["vector_loads"],
            r["vector_stores"],
            "yes" if r["uses_globaltimer"] else "no",
            "yes" if r["acquire_sys"] else "no",
        ]
        for r in report
    ]
    print(
        f"compiled {len(report)} kernel launches for sm_90 in "
        f"{time.perf_counter() - started:.1f} s (Triton's own compiler, no GPU)\n"
    )
    print(
        table(
            [
                "module",
                "kernel",
                "ranks",
                "registers",
                "spill bytes",
                "v4 loads",
                "v4 stores",
                "globaltimer",
                "acquire.sys",
            ],
            rows,
        )
    )
    spills = [r for r in report if r["stack"]]
    print(
        "\nspills: none"
        if not spills
        else "\nspills: " + ", ".join(f"{_demangle(r['name'])} ({r['stack']} B)" for r in spills)
    )
    _write_json(args.json, {"target": "cuda sm_90", "kernels": report})
    return 0


def _demangle(symbol: str) -> str:
    """`_ZN8tritonep2ll8dispatchEv` -> `tritonep::ll::dispatch()`, as the profiler displays it."""
    if not (symbol.startswith("_ZN") and symbol.endswith("Ev")):
        return symbol
    parts, rest = [], symbol[3:-2]
    while rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits == 0:
            return symbol
        length = int(rest[:digits])
        parts.append(rest[digits : digits + length])
        rest = rest[digits + length :]
    return "::".join(parts) + "()"


# ----------------------------------------------------------------------------------- parser
def _add_run_options(parser: argparse.ArgumentParser, with_shape: bool = True) -> None:
    parser.add_argument(
        "--backend",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where kernels run: auto picks cuda when CUDA is usable, else cpu (default: auto)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="rank processes to spawn (default: one per GPU, or 2 on the CPU backend)",
    )
    if with_shape:
        parser.add_argument(
            "--tokens", type=int, help="tokens per rank (default: 4096 on GPUs, 64 on CPU)"
        )
        parser.add_argument("--hidden", type=int, help="hidden size (default: 7168 / 256 on CPU)")
        parser.add_argument("--topk", type=int, help="experts per token (default: 8 / 4 on CPU)")
        parser.add_argument("--experts", type=int, help="total experts (default: 256 / 16 on CPU)")
        parser.add_argument(
            "--nvl-bytes",
            type=int,
            default=0,
            help="num_nvl_bytes of the Buffer (default: 2e9 on GPUs, 16 MiB on CPU)",
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of inputs and routing (default: 0)"
    )
    parser.add_argument("--json", metavar="PATH", help="write everything measured or found to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonep",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tritonep <command> --help` for a command's options. Docs: docs/user-guide.md.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tritonep {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")

    check = commands.add_parser(
        "check",
        help="environment report: versions, GPUs, links, NVSHMEM, MPS, backend and mode; verdict",
        description="Report what this machine offers tritonep and what a Buffer would choose; "
        "ends with a verdict and what to fix. Exit status 1 when something blocks a run.",
    )
    check.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="rank count to evaluate (default: GPU count, at least 2)",
    )
    check.add_argument("--json", metavar="PATH", help="write the report to PATH")
    check.set_defaults(run=cmd_check)

    bench = commands.add_parser(
        "bench",
        help="check dispatch/combine against the reference, then time them (DeepEP's convention)",
        description="Spawn one rank per GPU (or 2 on the CPU backend), check dispatch/combine "
        "exactly against the plain-torch reference, then time layout, cached dispatch BF16/FP8 and "
        "combine. GPU: DeepEP's CUDA-event method and GB/s, profiler kernel times, the plain NCCL "
        "pipeline for comparison. CPU: time per call in the Triton interpreter.",
    )
    _add_run_options(bench)
    bench.add_argument(
        "--num-sms",
        type=int,
        help="Config.num_sms of the main table (default: 24 on GPUs, 4 on CPU)",
    )
    bench.add_argument(
        "--check",
        choices=("quick", "full", "none"),
        default="quick",
        help="correctness matrix before timing: quick (BF16 with top-k), full (DeepEP's variants), "
        "none (default: quick)",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="GPU: also time SM counts and chunk sizes (DeepEP's tuning table)",
    )
    bench.add_argument(
        "--sweep-sms",
        type=int,
        nargs="+",
        default=[16, 32, 48, 64, 96, 128],
        help="SM counts of --sweep (default: 16 32 48 64 96 128, capped by the GPU)",
    )
    bench.add_argument(
        "--sweep-dispatch-chunks",
        type=int,
        nargs="+",
        default=list(range(4, 33, 4)),
        help="dispatch chunk sizes of --sweep (default: 4 8 ... 32)",
    )
    bench.add_argument(
        "--sweep-combine-chunks",
        type=int,
        nargs="+",
        default=[1, 2, 4, 6, 8, 12, 16],
        help="combine chunk sizes of --sweep (default: 1 2 4 6 8 12 16)",
    )
    bench.add_argument(
        "--plot",
        nargs="?",
        const=DEFAULT_PLOT_DIR,
        metavar="DIR",
        help=f"write PNG charts to DIR (default DIR: {DEFAULT_PLOT_DIR}; needs matplotlib)",
    )
    bench.set_defaults(run=cmd_bench)

    tune = commands.add_parser(
        "tune",
        help="sweep SMs x chunk sizes here and write a config file for TRITONEP_CONFIG_FILE",
        description="Time cached dispatch (BF16) and combine for every SM count and chunk size, "
        "pick the fastest chunk per SM count (slowest rank decides), and write a config file. "
        "Point TRITONEP_CONFIG_FILE at it: Buffer.get_dispatch_config / get_combine_config (and "
        "dispatch/combine without a config) then use its entries for this rank count; entries "
        "for other rank counts already in the file are kept.",
    )
    _add_run_options(tune)
    tune.add_argument(
        "--sms",
        type=int,
        nargs="+",
        help="SM counts (default: 16 24 32 48 64 96 128 capped by the GPU; 2 4 on CPU)",
    )
    tune.add_argument(
        "--dispatch-chunks",
        type=int,
        nargs="+",
        help="dispatch chunk sizes, V1's own always added (default: 4 8 ... 32; 4 16 on CPU)",
    )
    tune.add_argument(
        "--combine-chunks",
        type=int,
        nargs="+",
        help="combine chunk sizes, V1's own always added (default: 1 2 4 6 8 12 16; 2 8 on CPU)",
    )
    tune.add_argument(
        "--check", action="store_true", help="check correctness against the reference first"
    )
    tune.add_argument(
        "--output",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"config file to write or update (default: {DEFAULT_CONFIG_PATH})",
    )
    tune.add_argument(
        "--plot",
        nargs="?",
        const=DEFAULT_PLOT_DIR,
        metavar="DIR",
        help=f"write a PNG of the sweep to DIR (default DIR: {DEFAULT_PLOT_DIR}; needs matplotlib)",
    )
    tune.set_defaults(run=cmd_tune)

    stress = commands.add_parser(
        "pressure",
        help="randomized dispatch/combine rounds, each checked exactly and rerun for equal hashes",
        description="Each round draws a geometry from its seed (tokens, hidden, top-k, experts, "
        "SMs, chunk, queue size, BF16/FP8, routing with -1 slots and skew, plain/cached/worst-case "
        "dispatch), checks every output exactly against the reference and runs again: the two "
        "runs must hash identically. Exit status 1 on any failure.",
    )
    _add_run_options(stress, with_shape=False)
    stress.add_argument(
        "--rounds", type=int, help="rounds to run (default: 100 on GPUs, 10 on CPU)"
    )
    stress.add_argument(
        "--seconds",
        type=float,
        default=0.0,
        help="start no round after this many seconds (default: 0, no limit)",
    )
    stress.set_defaults(run=cmd_pressure)

    aot = commands.add_parser(
        "aot",
        help="compile every kernel launch for sm_90 without a GPU; registers, spills, vector ops",
        description="Compile each kernel launch tritonep makes (EP2 and EP8, BF16/FP8, "
        "low-latency) for sm_90 with Triton's compiler, no GPU needed, and report registers, "
        "spills, 16-byte vector loads/stores and the synchronisation instructions used.",
    )
    aot.add_argument("--json", metavar="PATH", help="write the per-kernel report to PATH")
    aot.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    aot.set_defaults(run=cmd_aot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
