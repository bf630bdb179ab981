"""Time the `get_dispatch_layout` kernel alone on one GPU (no process group needed).

    python benchmarks/layout_kernel.py --json benchmarks/results/layout.json

Shapes: DeepEP's default (4096 tokens, top-8 of 256 experts) for 2, 4 and 8 ranks, plus a large one.
Method: DeepEP's event timing (50 warm-ups, L2 flush, 50 timed calls, first dropped, mean); the
outputs are checked against the plain-torch reference first.
"""

import argparse
import json
import sys

import torch

import tritonep
from tritonep import protocol, reference
from tritonep.bench import bench_events, git_commit
from tritonep.kernels import load_kernels
from tritonep.modes.layout import allocate_outputs
from tritonep.runtime.outputs import addressed


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    kernels = load_kernels("cuda")
    scratch = torch.zeros(1 << 12, dtype=torch.int32, device="cuda")
    host_block = torch.zeros(protocol.HOST_SLOTS, dtype=torch.int64, device="cpu", pin_memory=True)
    rows = []
    for tokens, topk, experts, ranks in (
        (4096, 8, 256, 2),
        (4096, 8, 256, 4),
        (4096, 8, 256, 8),
        (16384, 8, 288, 8),
    ):
        topk_idx = torch.topk(torch.rand(tokens, experts, device="cuda"), topk, dim=1).indices.to(
            tritonep.topk_idx_t
        )
        topk_idx[torch.rand(tokens, topk, device="cuda") < 0.05] = -1
        no_mask = torch.zeros(ranks, dtype=torch.int32, device="cuda")
        plan = kernels.layout.plan_route_stats(tokens, topk, experts, ranks, ranks, False)
        stream = torch.cuda.current_stream()
        fixed = addressed((scratch, no_mask))

        def layout(plan=plan, topk_idx=topk_idx, tokens=tokens, fixed=fixed):
            outputs = addressed(allocate_outputs(plan, tokens, topk_idx.device))
            plan.launch(stream, topk_idx, tokens, fixed, host_block.data_ptr(), outputs)
            return outputs.tensors

        got = layout()
        want = reference.layout(topk_idx.cpu(), experts, ranks, ranks)
        for g, w in zip(got, want, strict=False):
            assert (g is None and w is None) or torch.equal(g.cpu(), w), "layout mismatch"
        t = bench_events(layout)[0]
        rows.append(
            {"tokens": tokens, "topk": topk, "experts": experts, "ranks": ranks, "us": t * 1e6}
        )
        print(f"layout {tokens} tokens, top-{topk} of {experts}, {ranks} ranks: {t * 1e6:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "commit": git_commit(),
                    "torch": torch.__version__,
                    "triton": __import__("triton").__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
