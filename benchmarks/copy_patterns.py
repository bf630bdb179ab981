"""Micro-benchmark of row-copy patterns for the dispatch/combine data kernels (one GPU).

    python benchmarks/copy_patterns.py --json benchmarks/results/copy_patterns.json

Copies 4096 rows of 7168 bf16 (DeepEP's dispatch payload) from a gathered source (every other row
of a 2x larger tensor, as a sender gathers routed tokens) into contiguous destination rows, with a
persistent grid of P programs, and reports GB/s of copied bytes (DeepEP counts bytes received).
Patterns: 2-D [rows, words] tiles from row addresses (what the kernels do), the same with the next
chunk's load issued before the current store (register double buffering), the Triton pipeliner
(`tl.range(num_stages=...)`), and a flat 1-D copy of contiguous rows (the receiver's case).
"""

import argparse
import json

import torch
import triton
import triton.language as tl

from tritonep.bench import bench_events, git_commit
from tritonep.kernels.common.tiles import row_block


@triton.jit
def _copy_rows(
    src_ptr,
    dst_ptr,
    num_rows,
    src_stride_words,
    ROW_WORDS: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    MODE: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    src_base = src_ptr.to(tl.int64)
    dst_base = dst_ptr.to(tl.int64)
    for r0 in range(pid * TILE, num_rows, nprog * TILE):
        rows = r0 + tl.arange(0, TILE)
        rmask = rows < num_rows
        src_rows = src_base + rows.to(tl.int64) * src_stride_words * 4
        dst_rows = dst_base + rows.to(tl.int64) * ROW_WORDS * 4
        if MODE == 0:
            for w0 in range(0, ROW_WORDS, BLOCK_W):
                words = w0 + tl.arange(0, BLOCK_W)
                m = rmask[:, None] & (words[None, :] < ROW_WORDS)
                v = tl.load(row_block(src_rows, words, tl.int32, BLOCK_W), mask=m)
                tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W), v, mask=m)
        elif MODE == 1:
            words = tl.arange(0, BLOCK_W)
            m = rmask[:, None] & (words[None, :] < ROW_WORDS)
            v = tl.load(row_block(src_rows, words, tl.int32, BLOCK_W), mask=m)
            for w0 in range(BLOCK_W, ROW_WORDS + BLOCK_W, BLOCK_W):
                nwords = w0 + tl.arange(0, BLOCK_W)
                nm = rmask[:, None] & (nwords[None, :] < ROW_WORDS)
                nv = tl.load(row_block(src_rows, nwords, tl.int32, BLOCK_W), mask=nm)
                tl.store(row_block(dst_rows, nwords - BLOCK_W, tl.int32, BLOCK_W), v, mask=m)
                v = nv
                m = nm
        else:
            for w0 in tl.range(0, ROW_WORDS, BLOCK_W, num_stages=STAGES):
                words = w0 + tl.arange(0, BLOCK_W)
                m = rmask[:, None] & (words[None, :] < ROW_WORDS)
                v = tl.load(row_block(src_rows, words, tl.int32, BLOCK_W), mask=m)
                tl.store(row_block(dst_rows, words, tl.int32, BLOCK_W), v, mask=m)


@triton.jit
def _copy_flat(src_ptr, dst_ptr, num_words, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for start in tl.range(pid * BLOCK, num_words, nprog * BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        m = offs < num_words
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m), mask=m)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, words = 4096, 3584
    src = torch.randint(-(2**31), 2**31 - 1, (2 * rows, words), dtype=torch.int32, device="cuda")
    dst = torch.empty((rows, words), dtype=torch.int32, device="cuda")
    nbytes = rows * words * 4
    results = []

    def record(name, fn, **cfg):
        dst.zero_()
        fn()
        torch.cuda.synchronize()
        ok = torch.equal(dst, src[::2]) if "flat" not in name else torch.equal(dst, src[:rows])
        t = bench_events(fn)[0]
        results.append(dict(pattern=name, GBps=nbytes / t / 1e9, us=t * 1e6, correct=ok, **cfg))
        print(f"{name:<10} {cfg} {nbytes / t / 1e9:8.1f} GB/s {'ok' if ok else 'WRONG'}")

    for programs in (12, 24):
        for warps in (4, 8):
            for tile, block_w in ((8, 1024), (32, 256), (4, 2048), (16, 1024)):
                for mode, stages in ((0, 1), (1, 1), (2, 2), (2, 3)):
                    name = {0: "plain", 1: "prefetch", 2: f"range{stages}"}[mode]
                    record(
                        name,
                        lambda: _copy_rows[(programs,)](
                            src,
                            dst,
                            rows,
                            2 * words,
                            ROW_WORDS=words,
                            TILE=tile,
                            BLOCK_W=block_w,
                            MODE=mode,
                            STAGES=stages,
                            num_warps=warps,
                        ),
                        programs=programs,
                        warps=warps,
                        tile=tile,
                        block_w=block_w,
                    )
        for warps in (4, 8, 16):
            for block in (2048, 4096, 8192):
                for stages in (1, 3):
                    record(
                        "flat",
                        lambda: _copy_flat[(programs,)](
                            src, dst, rows * words, BLOCK=block, STAGES=stages, num_warps=warps
                        ),
                        programs=programs,
                        warps=warps,
                        block=block,
                        stages=stages,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "commit": git_commit(),
                    "triton": triton.__version__,
                    "rows": results,
                },
                f,
                indent=1,
            )
    best = sorted(results, key=lambda r: -r["GBps"])[:8]
    print("best:")
    for r in best:
        print(r)


if __name__ == "__main__":
    main()
