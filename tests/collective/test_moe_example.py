"""`examples/moe_layer.py`: loss and gradients of the MoE layer on 2 ranks against the same MoE
computed densely on one process (no communication), and a few training steps.

The layer's backward is tritonep's: dispatch backward = combine of the row gradients (top-k weight
gradients summed alongside), combine backward = cached dispatch of the output gradient. Everything
runs in float32 (dispatch moves any dtype, combine sums float32), so the only differences from the
reference are float32 summation orders: matmuls over differently grouped rows and fp32 sums of up
to R = 2 copies. Measured on CPU: losses equal, gradients within 2.4e-6 (the router's, a sum over
every token); the tolerances below allow about 4x that.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import tritonep
from tritonep.testing import checks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import moe_layer  # noqa: E402

HIDDEN, FFN, NUM_EXPERTS, TOPK, TOKENS = 32, 48, 8, 3, 12
RTOL, ATOL = 1e-5, 1e-5
CPU_CONFIG = tritonep.Config(4, 8, 256)  # 4 programs: the interpreter runs them in turn


def _inputs(rank: int, device):
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn((TOKENS + rank, HIDDEN), generator=gen)  # ranks hold different token counts
    target = torch.randn(x.shape, generator=gen)
    return x.to(device), target.to(device)


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    torch.testing.assert_close(got.cpu(), want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    return float((got.cpu() - want).abs().max())


def moe_gradients_task(ctx, config) -> dict:
    import torch.distributed as dist

    buffer = checks.get_buffer(ctx, 8 << 20)
    rank, num_ranks = ctx.rank, ctx.world_size
    layer = moe_layer.MoELayer(buffer, HIDDEN, FFN, NUM_EXPERTS, TOPK, seed=7, config=config)
    device = layer.router.device
    x, target = _inputs(rank, device)
    x.requires_grad_(True)
    loss = torch.nn.functional.mse_loss(layer(x), target, reduction="sum")
    loss.backward()
    router_grad = layer.router.grad.clone()
    dist.all_reduce(router_grad, group=ctx.group)

    # The dense reference sees every rank's tokens and every expert; its loss is the sum.
    xs, targets = zip(*(_inputs(r, "cpu") for r in range(num_ranks)), strict=True)
    xs = [t.clone().requires_grad_(True) for t in xs]
    router, w1, w2 = (
        t.requires_grad_(True) for t in moe_layer.expert_weights(7, NUM_EXPERTS, HIDDEN, FFN)
    )
    outs = moe_layer.dense_reference(xs, router, w1, w2, TOPK)
    losses = [
        torch.nn.functional.mse_loss(o, t, reduction="sum")
        for o, t in zip(outs, targets, strict=True)
    ]
    sum(losses).backward()

    local = NUM_EXPERTS // num_ranks
    mine = slice(rank * local, (rank + 1) * local)
    diffs = {
        "loss": _close("loss", loss.detach(), losses[rank].detach()),
        "grad x": _close("grad x", x.grad, xs[rank].grad),
        "grad router": _close("grad router", router_grad, router.grad),
        "grad w1": _close("grad w1", layer.w1.grad, w1.grad[mine]),
        "grad w2": _close("grad w2", layer.w2.grad, w2.grad[mine]),
    }
    # Every gradient must carry signal, or the comparisons above prove little.
    for name, grad in (("x", x.grad), ("w1", layer.w1.grad), ("router", router_grad)):
        assert grad.abs().sum() > 0, f"grad {name} is all zero"
    steps = moe_layer.train(layer, x.detach(), target, steps=3, group=ctx.group)
    assert steps[-1] < steps[0], f"training did not reduce the loss: {steps}"
    return diffs


def test_moe_layer_gradients_match_dense_reference(cpu_pool):
    pool = cpu_pool(2)
    diffs = pool.run(moe_gradients_task, CPU_CONFIG, timeout=120)
    assert len(diffs) == 2


@pytest.mark.gpu
def test_moe_layer_gradients_match_dense_reference_on_one_gpu(cpu_pool):
    """Two ranks sharing GPU 0 (gloo group, CUDA IPC peer memory), V1's default configs."""
    pool = cpu_pool(2, TRITON_INTERPRET="0", TRITONEP_BACKEND="cuda", TRITONEP_TIMEOUT_S="60")
    pool.run(moe_gradients_task, None, timeout=300)
