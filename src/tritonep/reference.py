"""Plain-torch definitions of the high-throughput ops: the oracle for tests and benchmarks.

Each function takes what every rank passed (lists indexed by rank) and returns what one rank must
get, straight from the spec's definitions (spec §8-§10, §14.1-§14.3), with no clever indexing.
"""

from __future__ import annotations

import torch


def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int):
    """(num_tokens_per_rank, num_tokens_per_node or None, num_tokens_per_expert, is_token_in_rank)."""
    experts_per_rank = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    owner = torch.where(valid, topk_idx // experts_per_rank, -1)
    is_token_in_rank = torch.stack([(owner == j).any(dim=1) for j in range(num_ranks)], dim=1)
    if is_token_in_rank.numel() == 0:
        is_token_in_rank = torch.zeros((topk_idx.size(0), num_ranks), dtype=torch.bool, device=topk_idx.device)
    num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
    num_tokens_per_expert = torch.stack([(topk_idx == e).sum() for e in range(num_experts)]).to(torch.int32)
    num_nodes = num_ranks // ranks_per_node
    num_tokens_per_node = None
    if num_nodes > 1:
        node = torch.where(owner >= 0, owner // ranks_per_node, -1)
        num_tokens_per_node = torch.stack([(node == n).any(dim=1).sum() for n in range(num_nodes)]).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank


def dispatch(rank: int, num_experts: int, xs, is_token_in_rank, topk_idx=None, topk_weights=None, scales=None):
    """What rank `rank` receives: a dict with recv_x, recv_scales, recv_src_idx, recv_topk_idx,
    recv_topk_weights, rank_prefix_matrix (full) and num_recv_tokens_per_expert (unaligned)."""
    num_ranks = len(xs)
    experts_per_rank = num_experts // num_ranks
    masks = [m[:, rank] for m in is_token_in_rank]
    out = {
        "recv_x": torch.cat([x[m] for x, m in zip(xs, masks)]),
        "recv_src_idx": torch.cat([torch.nonzero(m).flatten().to(torch.int32) for m in masks]),
        "rank_prefix_matrix": torch.stack([m.sum(0) for m in is_token_in_rank]).cumsum(0).to(torch.int32),
    }
    if scales is not None:
        out["recv_scales"] = torch.cat([s[m] for s, m in zip(scales, masks)])
    if topk_idx is not None:
        idx = torch.cat([t[m] for t, m in zip(topk_idx, masks)])
        weights = torch.cat([w[m] for w, m in zip(topk_weights, masks)])
        local = idx - rank * experts_per_rank
        mine = (idx >= 0) & (local >= 0) & (local < experts_per_rank)
        out["recv_topk_idx"] = torch.where(mine, local, torch.full_like(local, -1))
        out["recv_topk_weights"] = torch.where(mine, weights, torch.zeros_like(weights))
        counts = torch.zeros(experts_per_rank, dtype=torch.int64, device="cpu")
        for t in topk_idx:
            local_all = t - rank * experts_per_rank
            ok = (t >= 0) & (local_all >= 0) & (local_all < experts_per_rank)
            counts += torch.bincount(local_all[ok].flatten().cpu(), minlength=experts_per_rank)
        out["num_recv_tokens_per_expert"] = counts.tolist()
    return out


def combine(rank: int, returned, blocks, num_tokens: int, biases=(), weights=None):
    """Combined rows for rank `rank`, accumulated in fp32: bias first, then ranks ascending.

    returned[j]: `[X_j, H]` rows rank j passes to combine; blocks[j]: (first_row, src_idx) — the rows of
    rank j that came from `rank` start at `first_row` and answer tokens `src_idx` of `rank`.
    weights: optional list of `[X_j, K]` returned weights.
    """
    hidden = returned[0].size(1)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=returned[0].device)
    for b in biases:
        if b is not None:
            acc += b.float()
    wacc = None
    if weights is not None:
        wacc = torch.zeros((num_tokens, weights[0].size(1)), dtype=torch.float32, device=weights[0].device)
    for j, (first, src) in enumerate(blocks):
        rows = returned[j][first : first + src.numel()].float()
        acc.index_add_(0, src.long(), rows)
        if weights is not None:
            wacc.index_add_(0, src.long(), weights[j][first : first + src.numel()].float())
    return acc.to(returned[0].dtype), wacc
