"""A mixture-of-experts layer with autograd on tritonep, built the way DeepEP users build one.

    python examples/moe_layer.py                      # spawns 2 ranks: GPUs if present, else CPU
    torchrun --nproc-per-node 2 examples/moe_layer.py # or let torchrun start them

Forward, on every rank (expert parallelism: rank r holds experts [r*L, (r+1)*L), L = E / R):

    router: probs = softmax(x @ W_router); (topk_weights, topk_idx) = top-k of probs
    layout: buffer.get_dispatch_layout(topk_idx, E)       -> who receives which token
    dispatch: buffer.dispatch(x, ..., topk_idx, topk_weights) -> the rows this rank's experts need
    experts: for each local expert e, the received rows that selected it (their count is
             num_recv_tokens_per_expert_list[e]) go through e's MLP, scaled by their weight
    combine: buffer.combine(y, handle)                     -> each token's outputs summed back

so that out[t] = sum_k topk_weights[t, k] * MLP_{topk_idx[t, k]}(x[t]).

Backward mirrors the communication (as in DeepEP-based training code):
* dispatch copied each token to the ranks of its experts, so the gradient of x is the sum of the
  copies' gradients: a `combine` of the received rows' gradients with the same handle (the
  top-k weights' gradients ride along as combine's `topk_weights`);
* combine summed the copies, so every copy's gradient is the output's gradient: a *cached*
  `dispatch` of the output gradient with the same handle.

`dispatch` moves rows of any dtype and `combine` sums bfloat16, float16 or float32, so the layer
runs in any of those (the gradient test uses float32 against a dense single-process reference).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tritonep


class DispatchFn(torch.autograd.Function):
    """`dispatch` forward, `combine` of the gradients (same handle) backward."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, layout, config):
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = layout
        recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            config=config,
        )
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_weights, recv_idx, counts, handle

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_weights, *unused):
        (recv_idx,) = ctx.saved_tensors
        # Weights of slots whose expert lives elsewhere arrive as constant zeros: no gradient.
        grad_weights = torch.where(recv_idx >= 0, grad_recv_weights, 0.0).float()
        grad_x, grad_topk_weights, _ = ctx.buffer.combine(
            grad_recv_x.contiguous(),
            ctx.handle,
            topk_weights=grad_weights.contiguous(),
            config=ctx.config,
        )
        return grad_x, grad_topk_weights, None, None, None, None


class CombineFn(torch.autograd.Function):
    """`combine` forward, cached `dispatch` of the output gradient (same handle) backward."""

    @staticmethod
    def forward(ctx, y, buffer, handle, config):
        combined, _, _ = buffer.combine(y, handle, config=config)
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        grad_y = ctx.buffer.dispatch(
            grad_combined.contiguous(), handle=ctx.handle, config=ctx.config
        )[0]
        return grad_y, None, None, None


def expert_weights(seed: int, num_experts: int, hidden: int, ffn: int):
    """Router `[H, E]` and every expert's MLP (`[E, H, F]`, `[E, F, H]`), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn((hidden, num_experts), generator=gen) / hidden**0.5
    w1 = torch.randn((num_experts, hidden, ffn), generator=gen) / hidden**0.5
    w2 = torch.randn((num_experts, ffn, hidden), generator=gen) / ffn**0.5
    return router, w1, w2


def grouped_mlp(x, rows_per_expert, w1, w2):
    """Each expert's SiLU MLP on its rows, scaled by the rows' routing weights, summed per row.

    `rows_per_expert[e]` = (row indices, routing weights) of local expert e.
    """
    out = torch.zeros_like(x)
    for e, (rows, row_weights) in enumerate(rows_per_expert):
        h = F.silu(x[rows] @ w1[e]) @ w2[e]
        out = out.index_add(0, rows, h * row_weights.unsqueeze(1).to(h.dtype))
    return out


class MoELayer(torch.nn.Module):
    """Top-k routed SiLU-MLP experts, `num_experts / R` of them on each of the group's R ranks."""

    def __init__(self, buffer, hidden, ffn, num_experts, topk, seed=0, config=None, dtype=None):
        super().__init__()
        num_ranks, rank = buffer.group_size, buffer.rank
        local = num_experts // num_ranks
        router, w1, w2 = expert_weights(seed, num_experts, hidden, ffn)
        index = buffer.runtime.get_local_device_id()  # -1 on the CPU backend
        device = torch.device("cuda", index) if index >= 0 else torch.device("cpu")
        mine = slice(rank * local, (rank + 1) * local)
        self.router = torch.nn.Parameter(router.to(device, dtype))
        self.w1 = torch.nn.Parameter(w1[mine].to(device, dtype).contiguous())
        self.w2 = torch.nn.Parameter(w2[mine].to(device, dtype).contiguous())
        self.buffer, self.num_experts, self.topk, self.config = buffer, num_experts, topk, config
        self.first_expert = rank * local

    def forward(self, x):
        probs = (x @ self.router).float().softmax(dim=-1)
        topk_weights, topk_idx = probs.topk(self.topk, dim=-1)
        topk_idx = topk_idx.to(tritonep.topk_idx_t)
        layout = self.buffer.get_dispatch_layout(topk_idx, self.num_experts)
        recv_x, recv_weights, recv_idx, counts, handle = DispatchFn.apply(
            x, topk_weights, self.buffer, topk_idx, layout, self.config
        )
        # Group the received (row, slot) pairs by local expert; the per-expert counts the
        # dispatch returned size the groups (what a grouped GEMM would be launched with).
        rows, slots = (recv_idx >= 0).nonzero(as_tuple=True)
        order = torch.argsort(recv_idx[rows, slots], stable=True)
        rows, slots = rows[order], slots[order]
        groups, start = [], 0
        for count in counts:
            r, s = rows[start : start + count], slots[start : start + count]
            groups.append((r, recv_weights[r, s]))
            start += count
        y = grouped_mlp(recv_x, groups, self.w1, self.w2)
        return CombineFn.apply(y, self.buffer, handle, self.config)


def dense_reference(xs, router, w1, w2, topk):
    """The same MoE on one process, no communication: outputs for every rank's tokens `xs[r]`."""
    outs = []
    for x in xs:
        probs = (x @ router).float().softmax(dim=-1)
        topk_weights, topk_idx = probs.topk(topk, dim=-1)
        out = torch.zeros_like(x)
        for e in range(w1.size(0)):
            rows, slots = (topk_idx == e).nonzero(as_tuple=True)
            h = F.silu(x[rows] @ w1[e]) @ w2[e]
            out = out.index_add(0, rows, h * topk_weights[rows, slots].unsqueeze(1).to(h.dtype))
        outs.append(out)
    return outs


def train(layer, x, target, steps: int, lr: float = 1.0, group=None) -> list[float]:
    """A few SGD steps on the sum over ranks of each rank's mean squared error.

    The router is replicated, so its gradient is all-reduced; each rank's experts already got the
    gradient of every token routed to them, through the backward dispatch.
    """
    losses = []
    for _ in range(steps):
        layer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        dist.all_reduce(layer.router.grad, group=group)
        with torch.no_grad():
            for p in layer.parameters():
                p -= lr * p.grad
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item())
    return losses


def _run(rank: int, world_size: int) -> None:
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # NCCL needs a GPU per rank; gloo serves CPU runs and ranks sharing a GPU.
    backend = "nccl" if use_gpu and world_size <= torch.cuda.device_count() else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    group = dist.group.WORLD
    hidden, ffn, num_experts, topk, tokens = (
        (1024, 2048, 16, 4, 256) if use_gpu else (64, 128, 8, 2, 32)
    )
    # The interpreter runs every program of a launch in turn: 4 programs keep a CPU step short.
    config = None if use_gpu else tritonep.Config(4, 8, 256)
    buffer = tritonep.Buffer(group, num_nvl_bytes=64 << 20)
    layer = MoELayer(buffer, hidden, ffn, num_experts, topk, seed=0, config=config)
    device = layer.router.device
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn((tokens, hidden), generator=gen).to(device)
    target = torch.randn((tokens, hidden), generator=gen).to(device)
    losses = train(layer, x, target, steps=5, group=group)
    if rank == 0:
        print("loss per step (summed over ranks):", " ".join(f"{v:.3f}" for v in losses))
    del layer, buffer
    dist.destroy_process_group()


def _spawned(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    _run(rank, world_size)


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        mp.spawn(_spawned, args=(2, free_port), nprocs=2, join=True)
