"""Dispatch tokens to experts and combine them back, on 2 ranks: CPU or GPUs alike.

torchrun --nproc-per-node 2 quickstart.py
"""

import os

import torch
import torch.distributed as dist

import tritonep as deep_ep

use_gpu = torch.cuda.is_available()
if use_gpu:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if use_gpu else "gloo")  # gloo: the CPU backend
rank = dist.get_rank()
device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
# The CPU backend interprets every program of a launch in turn: a small SM budget keeps it quick.
deep_ep.Buffer.set_num_sms(24 if use_gpu else 4)
buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=64 << 20)

# Each token picks 4 of 16 experts; rank r owns experts [8r, 8r + 8).
torch.manual_seed(rank)
num_tokens, hidden, num_experts, num_topk = 64, 256, 16, 4
x = torch.randn(num_tokens, hidden).to(torch.bfloat16).to(device)
scores = torch.randn(num_tokens, num_experts).softmax(dim=-1).to(device)
topk_weights, topk_idx = scores.topk(num_topk, dim=-1)
topk_idx = topk_idx.to(deep_ep.topk_idx_t)

num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
    topk_idx, num_experts
)
recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(
    x,
    num_tokens_per_rank=num_tokens_per_rank,
    is_token_in_rank=is_token_in_rank,
    num_tokens_per_expert=num_tokens_per_expert,
    topk_idx=topk_idx,
    topk_weights=topk_weights,
)
# Experts would run on recv_x here (recv_topk_idx holds local expert ids, -1 for other ranks').
combined_x, _, _ = buffer.combine(recv_x, handle)
# Unchanged rows come back once from every rank they went to: x times that count.
expected = (x.float() * is_token_in_rank.sum(dim=1, keepdim=True)).to(torch.bfloat16)
assert torch.equal(combined_x, expected)
print(f"rank {rank}: received {recv_x.size(0)} rows, {per_expert} per local expert; combine exact")
dist.destroy_process_group()
