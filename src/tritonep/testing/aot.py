"""Compile every kernel for sm_90 on a machine without a GPU (a cheap check of GPU-only code paths).

The launchers are run with a recording stand-in for each kernel, so the compiled signatures,
constexprs and specialisations are exactly what a real launch would produce; each recorded launch
is then compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.

    python -m tritonep.testing.aot      # prints one line per compiled kernel

Must run in a process where `TRITON_INTERPRET` is unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import torch

_TRITON_TYPES = {
    torch.bool: "i1", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
}


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _compile(fn, args, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_cooperative_grid") if k in kwargs}
    names = fn.arg_names
    constexprs = dict(kwargs)
    signature, attrs = {}, {}
    no_spec = set(getattr(fn, "do_not_specialize", ()) or ())
    no_spec |= {names[i] for i in no_spec if isinstance(i, int)}
    for index, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if name not in no_spec and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    for name in names[len(args):]:
        signature[name] = "constexpr"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _cases(kernels):
    """Representative launches of every launcher (EP2 and EP8 geometries, BF16 / FP8, top-k, bias;
    the FP8 dispatch is launched as a cached one, which writes no handle entries), with the
    Buffer's GPU program shapes."""
    from tritonep import protocol
    from tritonep.buffer import program_shapes
    from tritonep.kernels.context import LaunchContext

    for num_ranks in (2, 8):
        tuning = program_shapes("cuda", num_ranks)
        ctx = LaunchContext(
            peer_bases=torch.zeros(num_ranks, dtype=torch.int64), rank=1, num_ranks=num_ranks,
            data_offset=protocol.signal_layout(num_ranks).num_bytes,
            host_addr=1 << 40, clock_addr=0, timeout_ns=100 * 10**9, use_globaltimer=True,
        )
        tokens, hidden, topk, experts, channels = 4096, 7168, 8, 256, 12
        topk_idx = torch.zeros((tokens, topk), dtype=torch.int64)
        weights = torch.zeros((tokens, topk), dtype=torch.float32)
        mask = torch.zeros((tokens, num_ranks), dtype=torch.bool)
        matrix = torch.zeros((num_ranks, channels), dtype=torch.int32)
        square = torch.zeros((num_ranks, num_ranks), dtype=torch.int32)
        send_head = torch.zeros((tokens, num_ranks), dtype=torch.int32)
        rank_mask = torch.zeros(num_ranks, dtype=torch.int32)
        yield functools.partial(kernels.layout.launch_route_stats, topk_idx, experts, num_ranks, num_ranks,
                                torch.zeros(1024, dtype=torch.int32), False, rank_mask, ctx.host_addr)
        for counting in (False, True):
            counts = dict(
                num_tokens=tokens, num_worst_tokens=0, experts_per_rank=experts // num_ranks,
                num_tokens_per_expert=torch.zeros(experts, dtype=torch.int32), is_token_in_rank=mask,
                rank_prefix_matrix=square, channel_prefix_matrix=matrix, recv_channel_prefix_matrix=matrix,
            )
            yield functools.partial(
                kernels.notify.launch_notify,
                ctx, layout_key=12345, num_channels=channels, rank_mask=rank_mask,
                counts=counts if counting else None,
            )
        for fp8 in (False, True):
            row_bytes = hidden * (1 if fp8 else 2)
            scales = torch.zeros((hidden // 128, tokens), dtype=torch.int32).T if fp8 else None
            layout = protocol.QueueLayout.fit(1 << 30, channels, num_ranks, 256, row_bytes, True, topk, topk,
                                              hidden // 128 if fp8 else 0)
            x = torch.zeros((tokens, row_bytes // 4), dtype=torch.int32)
            recv = torch.zeros((tokens, row_bytes // 4), dtype=torch.int32)
            yield functools.partial(
                kernels.dispatch.launch_dispatch,
                ctx, layout, x=x, scales=scales, topk_idx=topk_idx, topk_weights=weights,
                is_token_in_rank=mask, rank_prefix_matrix=square,
                recv_channel_prefix_matrix=matrix, send_head=None if fp8 else send_head, rank_mask=rank_mask,
                recv_x=recv, recv_src_idx=None if fp8 else torch.zeros(tokens, dtype=torch.int32), recv_topk_idx=topk_idx,
                recv_topk_weights=weights, recv_scales=torch.zeros((tokens, hidden // 128), dtype=torch.int32) if scales is not None else None,
                num_channels=channels, chunk=6, experts_per_rank=experts // num_ranks, worst=True,
                num_warps=tuning["dispatch_warps"], tile_words=tuning["dispatch_tile_words"], prefetch=tuning["prefetch"],
            )
        layout = protocol.QueueLayout.fit(1 << 30, channels, num_ranks, 256, hidden * 2, False, 0, topk, 0)
        y = torch.zeros((tokens, hidden), dtype=torch.bfloat16)
        yield functools.partial(
            kernels.combine.launch_combine,
            ctx, layout, x=y, topk_weights=weights, bias0=y, bias1=None, rank_prefix_matrix=square,
            recv_channel_prefix_matrix=matrix, send_head=send_head, out=y, out_weights=weights, rank_mask=rank_mask,
            num_channels=channels, chunk=4, tile=tuning["combine_tile"], num_warps=tuning["combine_warps"],
            tile_words=tuning["combine_tile_words"], prefetch=tuning["prefetch"],
        )


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spills) per thread of a cubin, read with Triton's cuobjdump."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        except OSError:
            return {"registers": None, "stack": None}
    usage = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return {"registers": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", -1))}


def compile_all() -> list[dict]:
    """Compile every representative launch; returns name, registers, stack (spills) and memory-op counts."""
    from tritonep.kernels import load_kernels

    kernels = load_kernels("cuda")
    modules = {"layout": "_route_stats_kernel", "notify": "_notify_kernel", "dispatch": "_dispatch_kernel",
               "combine": "_combine_kernel"}
    originals = {}
    for module, attr in modules.items():
        mod = getattr(kernels, module)
        originals[module] = getattr(mod, attr)
        setattr(mod, attr, _Recorder(originals[module]))
    try:
        for launch in _cases(kernels):
            launch()
        calls = {module: getattr(getattr(kernels, module), attr).calls for module, attr in modules.items()}
    finally:
        for module, attr in modules.items():
            setattr(getattr(kernels, module), attr, originals[module])
    report = []
    for module, module_calls in calls.items():
        for _grid, args, kwargs in module_calls:
            compiled = _compile(originals[module], list(args), dict(kwargs))
            ptx = compiled.asm["ptx"]
            ops = Counter(re.findall(r"(?:ld|st)\.global[a-z0-9.]*", ptx))
            report.append({
                "module": module,
                "name": compiled.metadata.name,
                "num_ranks": kwargs.get("NUM_RANKS"),
                **_resource_usage(compiled.asm["cubin"]),
                "vector_loads": sum(n for op, n in ops.items() if op.startswith("ld") and ".v4" in op),
                "vector_stores": sum(n for op, n in ops.items() if op.startswith("st") and ".v4" in op),
                "uses_globaltimer": "%globaltimer" in ptx,
                "acquire_sys": "acquire.sys" in ptx or ".sys.acquire" in ptx,
            })
    return report


if __name__ == "__main__":
    for row in compile_all():
        print(row)
