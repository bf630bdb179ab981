"""Internode high-throughput mode: checks, then timings in DeepEP's conventions
(docs/benchmarks.md §2), next to a plain baseline on the same routing.

    python benchmarks/internode.py --ranks 2 --nodes 2 --json r.json   # 2 x 1 (one or two GPUs)
    python benchmarks/internode.py --ranks 4 --nodes 2                 # 2 x 2
    TRITONEP_FORCE_PUT=1 python benchmarks/internode.py --ranks 4 --nodes 2   # NVSHMEM puts
                                                                            # between "nodes"

Nodes are `TRITONEP_NVL_DOMAIN_SIZE = ranks / nodes` consecutive ranks. Ranks sharing a GPU need
MPS (`nvidia-cuda-mps-control -d`) and `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` adding up to <= 100
(e.g. 50 each for 2 ranks, 25 for 4), since the internode mode's RDMA memory is an NVSHMEM heap;
the GPU is then a proxy for the network: bytes cross HBM or NVLink, and what is measured is the
protocol (chunks, signals, fan-out), not a NIC.

Shape: DeepEP's internode test, 4096 tokens x hidden 7168, top-8 of 256 experts, each token limited
to `--topk-groups` nodes (DeepSeek-V3 group-limited routing; default min(nodes, 4)), some -1.
Each rank first checks the mode against the plain-torch reference (`tritonep.testing.internode`:
the quick matrix at the benchmark shape, and tiny rings of two slots at a small shape), then times
cached calls for a sweep of `Config(num_sms, nvl_chunk, nvl_buffer, rdma_chunk, 128)`:
  * time `t`: the profiler's average device time of the single dispatch (resp. combine) kernel;
    the notify kernel of the same window is printed separately (`notify + t us`);
  * RDMA bytes: `sum over tokens of the distinct nodes it goes to (own node included) * H * 2`
    (x 0.515625 for FP8); NVL bytes: `recv_x.numel() * 2` (x 0.515625 for FP8); combine uses the
    BF16 dispatch's bytes; GB/s = bytes / 1e9 / t.
Baseline: torch symmetric memory's NVSHMEM `all_to_all_vdev` moving the same (token, destination
rank) rows (each row once per destination rank, no node-level dedup), and back, timed with CUDA
events (DeepEP's bench: 50 warm-ups, L2 flushed, mean of calls 2-50); unavailable builds are
reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

FP8_FACTOR = (1 + 4 / 128) / 2


def _configs(kind: str, num_ranks: int, num_sms: int, sweep: bool):
    """DeepEP's sweep (`Config(num_sms, nvl_chunk, nvl_buffer, rdma_chunk, 128)`), or a few
    points of it plus the table's config."""
    import tritonep

    nvl_buffer = 720 if num_ranks in (24, 48, 96, 144, 160) else 512
    if kind == "dispatch":
        nvl_chunks = range(4, 45, 4) if sweep else (8, 16, 32)
        rdma_chunks = range(4, 33, 4) if sweep else (8, 16)
    else:
        nvl_chunks = range(1, 8) if sweep else (1, 4)
        rdma_chunks = range(8, 33, 4) if sweep else (8, 16)
    configs = [
        tritonep.Config(num_sms, nvl, nvl_buffer, rdma, 128)
        for nvl in nvl_chunks
        for rdma in rdma_chunks
    ]
    table = (
        tritonep.Buffer.get_dispatch_config(num_ranks)
        if kind == "dispatch"
        else tritonep.Buffer.get_combine_config(num_ranks)
    )
    return [tritonep.Config(num_sms, *_fields(table)[1:])] + configs


def _fields(config):
    return (
        config.num_sms,
        config.num_max_nvl_chunked_send_tokens,
        config.num_max_nvl_chunked_recv_tokens,
        config.num_max_rdma_chunked_send_tokens,
        config.num_max_rdma_chunked_recv_tokens,
    )


def _baseline(group, x, is_token_in_rank) -> dict:
    """NVSHMEM `all_to_all_vdev` of the (token, destination rank) rows and back (fp32 sum)."""
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    from tritonep.bench import bench_events

    try:
        world = group.size()
        device = x.device
        dests, tokens = is_token_in_rank.T.nonzero(as_tuple=True)  # by destination, then token
        hidden = x.size(1)
        rows = tokens.numel()
        # Every rank sizes its buffers alike (symmetric allocations): the most any rank sends.
        most = torch.tensor([rows], device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=group)
        capacity = int(most) * world * hidden
        send = symm_mem.empty(capacity, dtype=x.dtype, device=device)
        recv = symm_mem.empty(capacity, dtype=x.dtype, device=device)
        # Splits in elements: what goes to each peer, and what came from each peer with offsets.
        in_splits = symm_mem.empty(world, dtype=torch.int64, device=device)
        out_splits = symm_mem.empty((2, world), dtype=torch.int64, device=device)
        back_in_splits = symm_mem.empty(world, dtype=torch.int64, device=device)
        back_out_splits = symm_mem.empty((2, world), dtype=torch.int64, device=device)
        for tensor in (send, recv, in_splits, out_splits, back_in_splits, back_out_splits):
            symm_mem.rendezvous(tensor, group.group_name)
        in_splits.copy_(torch.bincount(dests, minlength=world) * hidden)
        send[: rows * hidden].copy_(x.index_select(0, tokens).flatten())

        def dispatch():
            torch.ops.symm_mem.all_to_all_vdev(send, recv, in_splits, out_splits, group.group_name)

        dispatch()
        back_in_splits.copy_(out_splits[0])  # received rows go back, packed by source rank
        received = int(out_splits[0].sum()) // hidden

        def combine():
            torch.ops.symm_mem.all_to_all_vdev(
                recv, send, back_in_splits, back_out_splits, group.group_name
            )
            out = torch.zeros((x.size(0), hidden), dtype=torch.float32, device=device)
            out.index_add_(0, tokens, send[: rows * hidden].view(rows, hidden).float())
            return out.to(x.dtype)

        nbytes = received * hidden * 2
        result = {"method": "symm_mem.all_to_all_vdev (NVSHMEM), CUDA events"}
        for name, fn in (("dispatch_bf16", dispatch), ("combine", combine)):
            t = bench_events(fn)[0]
            result[name] = {"us": t * 1e6, "GBps": nbytes / 1e9 / t}
        return result
    except Exception as e:  # noqa: BLE001 (a missing op or backend is reported, not fatal)
        return {"unavailable": f"{type(e).__name__}: {e}"}


def _rank_main(rank, world_size, port, args, results_path):
    os.environ["TRITONEP_NVL_DOMAIN_SIZE"] = str(world_size // args.nodes)
    from tritonep.bench import bench_kernels, gather_records, join_group
    from tritonep.testing.dist import RankContext

    group = join_group(rank, world_size, port, "cuda")
    import torch
    import torch.distributed as dist

    from tritonep import reference
    from tritonep.testing import internode as inter
    from tritonep.testing.checks import per_token_cast_to_fp8

    ctx = RankContext(rank, world_size, group)
    record = {"rank": rank}
    nvl_bytes, rdma_bytes = args.nvl_gb << 30, args.rdma_gb << 30
    if args.check:
        shape = dict(
            num_tokens=args.tokens,
            hidden=args.hidden,
            num_topk=args.topk,
            num_experts=args.experts,
            num_sms=args.num_sms[0],
            nvl_chunk=8,
            nvl_capacity=256,
            rdma_chunk=8,
            rdma_capacity=128,
            num_nvl_bytes=nvl_bytes,
            num_rdma_bytes=rdma_bytes,
            limited_nodes=min(args.topk_groups, args.nodes),
        )
        record["check"] = inter.check_internode(ctx, matrix="quick", **shape)
        small = dict(
            num_tokens=300,
            hidden=512,
            num_topk=args.topk,
            num_experts=args.experts,
            num_sms=8,
            nvl_chunk=1,
            nvl_capacity=2,
            rdma_chunk=1,
            rdma_capacity=2,
            num_nvl_bytes=nvl_bytes,
            num_rdma_bytes=rdma_bytes,
        )
        record["check_tiny_rings"] = inter.check_internode(ctx, matrix="quick", **small)
    buffer = inter.get_buffer(ctx, nvl_bytes, rdma_bytes)
    d = buffer.num_nvl_ranks
    gen = torch.Generator().manual_seed(rank)
    topk_idx, _ = inter.make_limited_routing(
        args.tokens,
        args.experts,
        args.topk,
        args.nodes,
        min(args.topk_groups, args.nodes),
        gen,
        "cuda",
        drop=0.01,
    )
    x = torch.randn((args.tokens, args.hidden), generator=gen).to(torch.bfloat16).cuda()
    x_fp8 = per_token_cast_to_fp8(x)
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, args.experts)
    rdma_tokens = int(reference.node_mask(itr.cpu(), d).sum())
    record["rdma_tokens_sent"] = rdma_tokens
    dispatch_rows = []
    handle = recv_x = None
    dispatch_configs = [
        config
        for num_sms in args.num_sms
        for config in _configs("dispatch", world_size, num_sms, args.sweep)
    ]
    for config in dispatch_configs:
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=ntr,
            num_tokens_per_rdma_rank=ntn,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            config=config,
        )
        for name, data, factor in (("bf16", x, 1.0), ("fp8", x_fp8, FP8_FACTOR)):
            dist.barrier(group)
            t = bench_kernels(
                lambda: buffer.dispatch(data, handle=handle, config=config),  # noqa: B023
                ("notify", "dispatch"),
            )
            rdma = rdma_tokens * args.hidden * 2 * factor
            nvl = recv_x.numel() * 2 * factor
            dispatch_rows.append(
                {
                    "config": _fields(config),
                    "input": name,
                    "notify_us": t["notify"] * 1e6,
                    "us": t["dispatch"] * 1e6,
                    "rdma_GBps": rdma / 1e9 / t["dispatch"],
                    "nvl_GBps": nvl / 1e9 / t["dispatch"],
                }
            )
    record["dispatch"] = dispatch_rows
    combine_rows = []
    combine_configs = [
        config
        for num_sms in args.num_sms
        for config in _configs("combine", world_size, num_sms, args.sweep)
    ]
    for config in combine_configs:
        handle = buffer.dispatch(
            x,
            num_tokens_per_rank=ntr,
            num_tokens_per_rdma_rank=ntn,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            config=config,
        )[4]
        dist.barrier(group)
        t = bench_kernels(
            lambda: buffer.combine(recv_x, handle, config=config),  # noqa: B023
            ("notify", "combine"),
        )
        combine_rows.append(
            {
                "config": _fields(config),
                "notify_us": t["notify"] * 1e6,
                "us": t["combine"] * 1e6,
                "rdma_GBps": rdma_tokens * args.hidden * 2 / 1e9 / t["combine"],
                "nvl_GBps": recv_x.numel() * 2 / 1e9 / t["combine"],
            }
        )
    record["combine"] = combine_rows
    dist.barrier(group)
    record["baseline"] = _baseline(group, x, itr) if args.baseline else {"skipped": True}
    gather_records(record, group, rank, results_path)
    torch.cuda.synchronize()
    dist.barrier(group)
    ctx.state.clear()
    buffer = None
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2, help="rank processes (share GPUs if few)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes the ranks form")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk-groups", type=int, default=4, help="nodes a token may use")
    parser.add_argument(
        "--num-sms",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[24],
        help="SM counts to time, comma-separated (e.g. 24,48,132: latency- or protocol-bound?); "
        "the checks use the first",
    )
    parser.add_argument("--nvl-gb", type=int, default=2, help="num_nvl_bytes in GiB")
    parser.add_argument("--rdma-gb", type=int, default=1, help="num_rdma_bytes in GiB")
    parser.add_argument("--sweep", action="store_true", help="DeepEP's whole config sweep")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.ranks % args.nodes != 0:
        parser.error(f"--ranks {args.ranks} is not a multiple of --nodes {args.nodes}")

    from tritonep.bench import gpu_run_meta, spawn_ranks

    ranks = spawn_ranks(_rank_main, args.ranks, args)
    meta = gpu_run_meta(
        args.ranks,
        {
            "tokens": args.tokens,
            "hidden": args.hidden,
            "topk": args.topk,
            "experts": args.experts,
            "topk_groups": args.topk_groups,
        },
        "profiler device time per call of the single dispatch/combine kernel of cached calls "
        "(docs/benchmarks.md §2); notify separately; baseline: CUDA events",
        nodes=args.nodes,
    )
    print(
        f"internode, {args.nodes} nodes x {args.ranks // args.nodes} ranks on {meta['gpus']} "
        f"GPU(s), force_put={meta['force_put']}, {args.tokens} x {args.hidden}, top-{args.topk} "
        f"of {args.experts}"
    )
    first = ranks[0]
    for row in first["dispatch"]:
        print(
            f"dispatch {row['input']} {row['config']}: {row['notify_us']:.2f} + "
            f"{row['us']:.2f} us, {row['rdma_GBps']:.2f} GB/s (RDMA), "
            f"{row['nvl_GBps']:.2f} GB/s (NVL)"
        )
    for row in first["combine"]:
        print(
            f"combine {row['config']}: {row['notify_us']:.2f} + {row['us']:.2f} us, "
            f"{row['rdma_GBps']:.2f} GB/s (RDMA), {row['nvl_GBps']:.2f} GB/s (NVL)"
        )
    print(f"baseline: {first['baseline']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ranks": ranks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
