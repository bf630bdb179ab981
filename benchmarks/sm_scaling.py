"""Kernel time of dispatch and combine against the SM count, on one GPU (EP1: the local copy path).

    python benchmarks/sm_scaling.py [--json out.json]

One rank copies 4096 tokens x hidden 7168 (every row stays local, no NVLink): the figures isolate
what each program of the persistent grid costs. Device time per kernel comes from torch.profiler
(no host time, no notify kernel). Rows: BF16 and FP8 at 24/48/132 SMs, 512 tokens (the fixed cost
per program), 2 and 8 SMs (the copy rate of one program), chunk 32, and two program shapes.

This is how the host-block read in every program's prologue was found: before it moved to device
memory, kernel time grew by ~8 us per program whatever the data (512 tokens at 132 SMs took as long
as 4096), and more SMs made dispatch slower.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

import tritonep
from tritonep.bench import git_commit
from tritonep.testing import checks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead import kernel_times, single_rank_buffer  # noqa: E402

CASES = [
    dict(tag="bf16"),
    dict(tag="fp8", fp8=True),
    dict(tag="bf16, 512 tokens", tokens=512),
    dict(tag="bf16, 2 and 8 SMs", sms=(2, 8)),
    dict(tag="bf16, chunk 32", chunk=32, sms=(24, 48)),
    dict(tag="bf16, 4 warps", tuning={"dispatch_warps": 4, "combine_warps": 4}, sms=(24, 48)),
    dict(
        tag="bf16, 16 warps x 16K words",
        sms=(24, 48),
        tuning={
            "dispatch_warps": 16,
            "combine_warps": 16,
            "dispatch_tile_words": 16384,
            "combine_tile_words": 16384,
        },
    ),
]


def measure(buffer, gen, tag, tokens=4096, sms=(24, 48, 132), chunk=24, fp8=False, tuning=None):
    base_shape = buffer._throughput_mode.shape
    buffer._throughput_mode.set_shape(dataclasses.replace(base_shape, **(tuning or {})))
    hidden = 7168
    topk_idx, _ = checks.make_routing(tokens, 256, 8, gen, "cuda", drop=0.0)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    sent = checks.per_token_cast_to_fp8(x) if fp8 else x
    counts, _, expert_counts, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 256)
    rows = []
    for num_sms in sms:
        config = tritonep.Config(num_sms, chunk, 256)
        recv, _, _, _, handle, _ = buffer.dispatch(
            sent,
            num_tokens_per_rank=counts,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=expert_counts,
            config=config,
        )
        back = recv[0].to(torch.bfloat16) if fp8 else recv
        dispatch_us = [
            v
            for k, v in kernel_times(
                lambda: buffer.dispatch(sent, handle=handle, config=config)
            ).items()
            if "dispatch()" in k
        ][0]
        combine_us = [
            v
            for k, v in kernel_times(lambda: buffer.combine(back, handle, config=config)).items()
            if "combine()" in k
        ][0]
        row = {
            "case": tag,
            "tokens": tokens,
            "chunk": chunk,
            "fp8": fp8,
            "tuning": tuning or {},
            "num_sms": num_sms,
            "dispatch_us": dispatch_us,
            "dispatch_GBps": tokens * hidden * (1 if fp8 else 2) / 1e3 / dispatch_us,
            "combine_us": combine_us,
            "combine_GBps": tokens * hidden * 2 / 1e3 / combine_us,
        }
        rows.append(row)
        print(
            f"{tag:<28} {num_sms:>4} SMs  dispatch {dispatch_us:7.1f} us "
            f"{row['dispatch_GBps']:6.0f} GB/s   combine {combine_us:7.1f} us "
            f"{row['combine_GBps']:6.0f} GB/s",
            flush=True,
        )
    buffer._throughput_mode.set_shape(base_shape)
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    buffer = single_rank_buffer(29556)
    gen = torch.Generator().manual_seed(0)
    rows = [row for case in CASES for row in measure(buffer, gen, **case)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "commit": git_commit(),
                    "torch": torch.__version__,
                    "triton": __import__("triton").__version__,
                    "ranks": 1,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    buffer = None  # release peer memory before the process group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
