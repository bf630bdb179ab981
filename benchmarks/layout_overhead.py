"""Where the time of `get_dispatch_layout` goes on one GPU: kernel, launcher, Buffer call.

    python benchmarks/layout_overhead.py

Prints, for 4096 tokens x top-8 of 256 experts: the kernel alone (CUDA graph of 20 launches), the
kernel launcher and `Buffer.get_dispatch_layout` under DeepEP's event timing, and the host time per
call of each (a Python loop, synchronised once). The gap between the first and the last is the
host-side cost of the Python call path.
"""

import os
import time

import torch
import torch.distributed as dist

import tritonep
from tritonep.bench import bench_events
from tritonep.kernels import load_kernels


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    dist.init_process_group("nccl", rank=0, world_size=1)
    buffer = tritonep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
    topk_idx = torch.topk(torch.rand(4096, 256, device="cuda"), 8, dim=1).indices
    kernels = load_kernels("cuda")
    scratch = torch.zeros(1024, dtype=torch.int32, device="cuda")

    def launcher():
        kernels.layout.launch_route_stats(topk_idx, 256, 2, 2, scratch, False)

    def layout():
        buffer.get_dispatch_layout(topk_idx, 256)

    for name, fn in (("launcher", launcher), ("Buffer.get_dispatch_layout", layout)):
        print(f"{name}: event time {bench_events(fn)[0] * 1e6:.1f} us")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(1000):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: host time {(time.perf_counter() - start) * 1e3:.1f} us per call")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        launcher()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(20):
                launcher()
    print(f"kernel alone (graph replay): {bench_events(graph.replay)[0] * 1e6 / 20:.2f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
