"""NVSHMEM heap and device layer on one GPU: 2 and 4 rank processes sharing it, every path checked.

For each rank count R: R processes (gloo group, every rank on device 0, MPS share 100/R each) build
an `NvshmemPeerMemory` and run `tests/collective/nvshmem_cases.py`'s cases three ways: the store
path (`TRANSPORT=STORES`), NVSHMEM-linked kernels taking stores to mapped peers
(`TRANSPORT=NVSHMEM`), and the put path forced for every peer (`FORCE_PUT`). Then a put+signal
ping-pong between ranks 0 and 1 on the store and put paths (mean round trip over many), and
`--cycles` create/close cycles of a heap measuring device memory and the heap addresses handed out.
A separate one-rank process checks that a process that used the CUDA symmetric-memory backend gets
`EPStateError`. Prints a summary; `--json` writes machine, versions, commit (`TRITONEP_COMMIT`) and
every figure.

    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \\
        python scripts/nvshmem_check.py --json nvshmem.json
    echo quit | nvidia-cuda-mps-control

Imports only torch, triton and tritonep's transport and kernel modules (not the package's
`__init__`, so an unrelated half-edited module cannot break the run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_path() -> None:
    """Make `tritonep.transport` and `tritonep.kernels` importable without
    `tritonep/__init__.py`."""
    package = types.ModuleType("tritonep")
    package.__path__ = [os.path.join(ROOT, "src", "tritonep")]
    sys.modules["tritonep"] = package
    sys.path.insert(0, os.path.join(ROOT, "tests", "collective"))


def _cases(
    heap, bootstrap, args, force_put: bool | None = None, transport: int | None = None
) -> dict:
    import nvshmem_cases as cases

    if force_put is not None:
        heap.force_put = force_put
    if transport is not None:
        heap.transport = transport
    timing = dict(clock_addr=0, use_globaltimer=True, timeout_s=20.0)
    t0 = time.perf_counter()
    results = cases.run_cases(
        heap, bootstrap, n=args.elements, block=1024, epochs=3, reps=4, **timing
    )
    results["peer_ptrs"] = [int(p != 0) for p in heap.peer_ptrs]
    world = heap.world_size
    direct = [not heap.force_put] * world
    found = cases.problems(results, direct, [True] * world, heap.rank)
    return {"problems": found, "seconds": time.perf_counter() - t0, "results": results}


def _ping(heap, bootstrap, args) -> dict:
    import nvshmem_cases as cases

    return cases.ping_pong(
        heap,
        bootstrap,
        rounds=args.rounds,
        n=args.ping_elements,
        block=16,
        clock_addr=0,
        use_globaltimer=True,
        timeout_s=20.0,
    )


def _cycles(bootstrap, dev, args) -> dict:
    import torch

    from tritonep.transport.nvshmem import NvshmemPeerMemory

    nbytes = args.cycle_mib << 20
    bases, free = [], []
    t0 = time.perf_counter()
    for cycle in range(args.cycles + 1):
        heap = NvshmemPeerMemory(bootstrap, nbytes, dev)
        heap.local.zero_()
        bases.append(heap.local.data_ptr())
        heap.close()
        if cycle % 10 == 0:
            torch.cuda.synchronize(dev)
            bootstrap.barrier()
            free.append(torch.cuda.mem_get_info(dev)[0])
    return {
        "buffer_mib": args.cycle_mib,
        "cycles": args.cycles,
        "distinct_bases": len(set(bases)),
        "free_mib_every_10": [f >> 20 for f in free],
        "growth_mib": (free[0] - free[-1]) >> 20,
        "ms_per_cycle": (time.perf_counter() - t0) / (args.cycles + 1) * 1e3,
    }


def stage(out: dict, results, name: str, fn, *args, **kwargs) -> None:
    """`out[name] = fn(...)`, or the error (every rank fails alike in what these stages do, so the
    ranks stay in step for the next stage); also sent to the parent at once, so a run killed later
    still shows which stages finished."""
    t0 = time.perf_counter()
    try:
        out[name] = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 (reported)
        out[name] = {"error": traceback.format_exc()[-2000:]}
    results.put(
        (
            out["rank"],
            "stage",
            {
                "stage": name,
                "seconds": time.perf_counter() - t0,
                "error": out[name].get("error") if isinstance(out[name], dict) else None,
            },
        )
    )


def _worker(rank: int, world: int, store: str, results, args) -> None:
    try:
        _import_path()
        import torch
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from tritonep.transport import device
        from tritonep.transport.bootstrap import Bootstrap
        from tritonep.transport.nvshmem import NvshmemPeerMemory

        # A rank left alone in a barrier (its peer crashed) raises after 60 s instead of hanging.
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        bootstrap = Bootstrap(dist.group.WORLD)
        import nvshmem_cases as cases

        out: dict = {"rank": rank}
        env_before = {
            k: os.environ.get(k)
            for k in ("NVSHMEM_DISABLE_NVLS", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
        }
        heap = NvshmemPeerMemory(bootstrap, cases.heap_bytes(world, args.elements), dev)
        out["facts"] = {
            "env_before": env_before,
            "local": hex(heap.local.data_ptr()),
            "peer_ptrs": [hex(p) for p in heap.peer_ptrs],
            "own_entry_is_local": heap.peer_ptrs[rank] == heap.local.data_ptr(),
            "pes": heap.pes,
            "transport": heap.transport,
            "backend": symm_mem.get_backend(dev),
            "gpu": torch.cuda.get_device_name(dev),
        }
        results.put((rank, "stage", {"stage": "heap", "seconds": 0.0, "error": None}))
        stage(out, results, "stores", _cases, heap, bootstrap, args)
        stage(
            out,
            results,
            "nvshmem_linked_stores",
            _cases,
            heap,
            bootstrap,
            args,
            transport=device.NVSHMEM.value,
        )
        stage(
            out,
            results,
            "puts",
            _cases,
            heap,
            bootstrap,
            args,
            transport=device.NVSHMEM.value,
            force_put=True,
        )
        stage(out, results, "ping_puts", _ping, heap, bootstrap, args)
        heap.force_put, heap.transport = False, device.STORES.value
        stage(out, results, "ping_stores", _ping, heap, bootstrap, args)
        heap.close()
        heap.close()
        bootstrap.barrier()
        stage(out, results, "cycles", _cycles, bootstrap, dev, args)
        out["rounds"] = args.rounds
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()[-3000:]))


def _backend_order_worker(store: str, results) -> None:
    """One rank that allocates CUDA-backend symmetric memory first, then asks for the NVSHMEM
    heap."""
    try:
        _import_path()
        import torch
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from tritonep.errors import EPStateError
        from tritonep.transport.bootstrap import Bootstrap
        from tritonep.transport.nvshmem import NvshmemPeerMemory

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        torch.cuda.set_device(0)
        first = symm_mem.empty(
            1024, dtype=torch.uint8, device="cuda:0"
        )  # the default (CUDA) backend
        try:
            NvshmemPeerMemory(Bootstrap(dist.group.WORLD), 1024, torch.device("cuda", 0))
            outcome = "no error"
        except EPStateError as e:
            outcome = f"EPStateError: {e}"
        results.put(
            (
                0,
                "ok",
                {
                    "first_backend": symm_mem.get_backend(first.device),
                    "nvshmem_after_cuda_backend": outcome,
                },
            )
        )
    except BaseException:
        results.put((0, "error", traceback.format_exc()[-3000:]))


def _spawn(target, world: int, args_for, timeout: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=target, args=args_for(rank, store, results)) for rank in range(world)
        ]
        for p in procs:
            p.start()
        replies: dict = {}
        stages: dict = {}
        deadline = time.monotonic() + timeout
        while len(replies) < world and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=1.0)
                if status == "stage":
                    stages.setdefault(rank, []).append(value)
                    continue
                replies[rank] = {"status": status, "value": value}
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(
                timeout=10.0 if len(replies) == world else 0
            )  # exits are quick; a hung one is killed
            if p.is_alive():
                p.kill()
                p.join()
        for rank, p in enumerate(procs):
            replies.setdefault(rank, {"status": "lost", "value": f"exit code {p.exitcode}"})
            replies[rank]["stages"] = stages.get(rank, [])
    return replies


def _summary(world: int, replies: dict) -> tuple[list[str], bool]:
    """Printable lines and whether every check of this rank count passed."""
    failed = [r for r, rep in replies.items() if rep["status"] != "ok"]
    if failed:

        def stages(r):
            return [
                (s["stage"], round(s["seconds"], 1), s["error"] is None)
                for s in replies[r]["stages"]
            ]

        return [
            f"R={world} rank {r} {replies[r]['status']}: {str(replies[r]['value'])[-1500:]}; "
            f"finished stages {stages(r)}"
            for r in failed
        ], False
    import nvshmem_cases as cases

    outs = [replies[r]["value"] for r in range(world)]
    lines = [f"R={world} facts rank 0: {json.dumps(outs[0]['facts'])}"]
    passed = True
    errors = sorted(
        {
            f"{name}: {v['error'].strip().splitlines()[-1]}"
            for o in outs
            for name, v in o.items()
            if isinstance(v, dict) and "error" in v
        }
    )
    if errors:
        return lines + [f"R={world} error in {e}" for e in errors] + [
            f"R={world} first: {outs[0]}"[:3000]
        ], False
    for path in ("stores", "nvshmem_linked_stores", "puts"):
        found = [f"rank {o['rank']}: {p}" for o in outs for p in o[path]["problems"]]
        found += cases.fetch_add_problems([o[path]["results"] for o in outs])
        passed &= not found
        lines.append(
            f"R={world} {path}: {'PASS' if not found else 'FAIL ' + '; '.join(found[:6])} "
            f"({outs[0][path]['seconds']:.1f} s)"
        )
    for path in ("ping_stores", "ping_puts"):
        ping = outs[0][path]
        passed &= ping["bad"] == 0 and ping["rounds"] == outs[0]["rounds"]
        lines.append(
            f"R={world} {path}: {ping['rounds']} round trips of {ping['payload_bytes']} B, bad "
            f"{ping['bad']}, mean {ping['mean_round_trip_us']:.2f} us"
        )
    cycles = outs[0]["cycles"]
    passed &= cycles["growth_mib"] < cycles["buffer_mib"]
    lines.append(f"R={world} cycles rank 0: {json.dumps(cycles)}")
    return lines, passed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="2,4", help="rank counts to run, comma-separated")
    parser.add_argument(
        "--elements", type=int, default=16384, help="int32 per message in the cases"
    )
    parser.add_argument("--ping-elements", type=int, default=16, help="int32 per ping-pong message")
    parser.add_argument("--rounds", type=int, default=10000, help="ping-pong round trips")
    parser.add_argument("--cycles", type=int, default=100, help="create/close cycles")
    parser.add_argument("--cycle-mib", type=int, default=32, help="heap size of the cycles")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per rank count")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for everything")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    import torch
    import triton

    report = {
        "what": "nvshmem_check",
        "commit": os.environ.get("TRITONEP_COMMIT"),
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NVSHMEM_", "CUDA_MPS_"))},
        "runs": {},
    }
    try:
        from importlib.metadata import version

        report["nvshmem_wheel"] = version("nvidia-nvshmem-cu13")
    except Exception as e:  # noqa: BLE001 (recorded, not fatal)
        report["nvshmem_wheel"] = repr(e)
    _import_path()
    deadline = time.monotonic() + args.budget

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = "100"
    order = _spawn(_backend_order_worker, 1, lambda rank, store, results: (store, results), 45.0)
    report["backend_order"] = order
    report["summary"] = [f"backend order: {order[0]}"]
    report["passed"] = order[0]["status"] == "ok" and order[0]["value"][
        "nvshmem_after_cuda_backend"
    ].startswith("EPStateError")
    print(report["summary"][-1], flush=True)
    save()
    for world in [int(w) for w in args.ranks.split(",")]:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // world)
        t0 = time.monotonic()
        replies = _spawn(
            _worker,
            world,
            lambda rank, store, results, w=world: (rank, w, store, results, args),
            min(args.timeout, deadline - t0),
        )
        lines, passed = _summary(world, replies)
        report["runs"][str(world)] = {
            "seconds": time.monotonic() - t0,
            "passed": passed,
            "replies": replies,
        }
        report["passed"] &= passed
        report["summary"] += lines
        if replies[0]["status"] == "ok":
            report["machine"] = replies[0]["value"]["facts"]["gpu"]
        print("\n".join(lines), flush=True)
        save()
    print("PASSED" if report["passed"] else "FAILED", flush=True)


if __name__ == "__main__":
    main()
