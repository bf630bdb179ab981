"""Plain-torch definitions of every op: the oracle for tests and benchmarks.

Each function takes what every rank passed (lists indexed by rank) and returns what one rank must
get, straight from the definitions in docs/reference.md, with no clever indexing: the
high-throughput ops (reference §8-§10, §14.1-§14.3), then the low-latency ones and their codecs
(§13, §14.9-§14.10).
"""

from __future__ import annotations

import torch


def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int):
    """(num_tokens_per_rank, num_tokens_per_node or None, num_tokens_per_expert,
    is_token_in_rank)."""
    experts_per_rank = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    owner = torch.where(valid, topk_idx // experts_per_rank, -1)
    is_token_in_rank = torch.stack([(owner == j).any(dim=1) for j in range(num_ranks)], dim=1)
    if is_token_in_rank.numel() == 0:
        is_token_in_rank = torch.zeros(
            (topk_idx.size(0), num_ranks), dtype=torch.bool, device=topk_idx.device
        )
    num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
    num_tokens_per_expert = torch.stack([(topk_idx == e).sum() for e in range(num_experts)]).to(
        torch.int32
    )
    num_nodes = num_ranks // ranks_per_node
    num_tokens_per_node = None
    if num_nodes > 1:
        node = torch.where(owner >= 0, owner // ranks_per_node, -1)
        num_tokens_per_node = torch.stack(
            [(node == n).any(dim=1).sum() for n in range(num_nodes)]
        ).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank


def dispatch(
    rank: int, num_experts: int, xs, is_token_in_rank, topk_idx=None, topk_weights=None, scales=None
):
    """What rank `rank` receives: a dict with recv_x, recv_scales, recv_src_idx, recv_topk_idx,
    recv_topk_weights, rank_prefix_matrix (full) and num_recv_tokens_per_expert (unaligned)."""
    num_ranks = len(xs)
    experts_per_rank = num_experts // num_ranks
    masks = [m[:, rank] for m in is_token_in_rank]
    out = {
        "recv_x": torch.cat([x[m] for x, m in zip(xs, masks, strict=False)]),
        "recv_src_idx": torch.cat([torch.nonzero(m).flatten().to(torch.int32) for m in masks]),
        "rank_prefix_matrix": torch.stack([m.sum(0) for m in is_token_in_rank])
        .cumsum(0)
        .to(torch.int32),
    }
    if scales is not None:
        out["recv_scales"] = torch.cat([s[m] for s, m in zip(scales, masks, strict=False)])
    if topk_idx is not None:
        idx = torch.cat([t[m] for t, m in zip(topk_idx, masks, strict=False)])
        weights = torch.cat([w[m] for w, m in zip(topk_weights, masks, strict=False)])
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

    returned[j]: `[X_j, H]` rows rank j passes to combine; blocks[j]: (first_row, src_idx) — the
    rows of rank j that came from `rank` start at `first_row` and answer tokens `src_idx` of `rank`.
    weights: optional list of `[X_j, K]` returned weights.
    """
    hidden = returned[0].size(1)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=returned[0].device)
    for b in biases:
        if b is not None:
            acc += b.float()
    wacc = None
    if weights is not None:
        wacc = torch.zeros(
            (num_tokens, weights[0].size(1)), dtype=torch.float32, device=weights[0].device
        )
    for j, (first, src) in enumerate(blocks):
        rows = returned[j][first : first + src.numel()].float()
        acc.index_add_(0, src.long(), rows)
        if weights is not None:
            wacc.index_add_(0, src.long(), weights[j][first : first + src.numel()].float())
    return acc.to(returned[0].dtype), wacc


# ---------------------------------------------------------------------------------- low latency
# Spec §13.2, §13.3, §14.9-§14.11. The device codecs live in `tritonep.kernels.common.codecs`.


def ll_quantize(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False):
    """LL dispatch's FP8 encoding of bf16 rows `x` `[N, H]` (reference §14.9), on row-major tensors.

    Returns `(values, scales)`: `values` float8_e4m3fn `[N, H]`; `scales` float32 `scale_inv`
    `[N, G]` (G = ceil(H / 128), a partial last group counts as one), or with `use_ue8m0` int32
    `[N, ceil(G / 4)]` UE8M0 words (biased exponent of group 4p + i in byte i of word p, unused
    bytes 0). NaNs do not raise a group's amax (as in V1); they stay NaN.

    Example: a row with max |x| = 3.5, x[0] = 1.0 -> scale 3.5 * f32(1/448) = 2**-7,
    values[0] = 128.0; with round_scale the same (2**-7 is already a power of two), UE8M0 byte 120.
    """
    if use_ue8m0 and not round_scale:
        raise ValueError("ll_quantize: use_ue8m0 requires round_scale=True")
    num_rows, hidden = x.shape
    num_groups = -(-hidden // 128)
    padded = torch.zeros((num_rows, num_groups * 128), dtype=torch.float32)
    padded[:, :hidden] = x.float().cpu()
    groups = padded.view(num_rows, num_groups, 128)
    amax = torch.where(groups.isnan(), 0.0, groups.abs()).amax(dim=2).clamp(min=1e-4)
    max_inv = torch.tensor(1.0 / 448.0, dtype=torch.float32)  # one fp32 constant, as in V1
    if round_scale:
        bits = (amax * max_inv).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale_inv = ((exponent + 127) << 23).view(torch.float32)
        scale = ((127 - exponent) << 23).view(torch.float32)  # 1 / scale_inv, exactly
    else:
        scale_inv = amax * max_inv
        scale = torch.tensor(448.0, dtype=torch.float32) / amax
    # Clamping to ±448 first, then rounding to nearest-even, is sat_e4m3 (448 is representable).
    values = (groups * scale.unsqueeze(2)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    values = values.view(num_rows, num_groups * 128)[:, :hidden].contiguous()
    if not use_ue8m0:
        return values, scale_inv
    num_words = -(-num_groups // 4)
    exponents = torch.zeros((num_rows, num_words * 4), dtype=torch.int64)
    exponents[:, :num_groups] = (scale_inv.view(torch.int32) >> 23) & 0xFF
    quads = exponents.view(num_rows, num_words, 4) << torch.tensor([0, 8, 16, 24])
    return values, quads.sum(dim=2).to(torch.int32)  # int64 -> int32 keeps the low 32 bits


def ll_dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 `[..., H]` of FP8 `values` `[..., H]` and their scales (reference §14.9): float32
    `[..., ceil(H/128)]`, or int32 UE8M0 words `[..., ceil(H/512)]` (byte b means the float with
    bits `b << 23`). Scales may be strided (dispatch returns them column-major)."""
    hidden = values.size(-1)
    num_groups = -(-hidden // 128)
    if scales.dtype == torch.int32:
        words = scales.cpu().to(torch.int64) & 0xFFFFFFFF
        exponents = (words.unsqueeze(-1) >> torch.tensor([0, 8, 16, 24])) & 0xFF
        exponents = exponents.flatten(-2)[..., :num_groups].to(torch.int32).contiguous()
        scale = (exponents << 23).view(torch.float32)
    else:
        scale = scales.cpu().float()
    return values.cpu().float() * scale.repeat_interleave(128, dim=-1)[..., :hidden]


def logfmt_codes(x: torch.Tensor):
    """LogFMT-10 quantisation of bf16 rows `x` `[N, H]` (H % 128 == 0), per reference §14.10.

    Returns `(codes, encoded, levels)`: `codes` int32 `[N, H]` (9-bit magnitude codes, 0 in groups
    sent as BF16); `encoded` bool `[N, H // 128]`; `levels` float64 `[N, H]`, the argument of the
    floor (`codes == floor(clamp(levels, 0, 511))`), so a test can see how close a value sits to a
    rounding boundary. Computed in float64 from the exact bf16 values; a group holding a NaN is
    sent as BF16 (V1 would zero the NaN).

    Example: a group of 0.5, 126 x 2**-10 and 0.0 -> la = -1, lm = -33, step = 32/510, codes
    511, 368 (level 368.06), 0.
    """
    num_rows, hidden = x.shape
    xd = x.cpu().double().view(num_rows, hidden // 128, 128)
    ax = xd.abs()
    nan = xd.isnan()
    amax = torch.where(nan, 0.0, ax).amax(dim=2)
    amin = torch.where(nan, torch.inf, ax).amin(dim=2)
    la = torch.log2(amax)
    lm = torch.where(amin > 0, torch.maximum(torch.log2(amin), la - 32), la - 32)
    encoded = (amax > 0) & (la < 0) & (lm < la) & ~nan.any(dim=2)
    lm = torch.where(encoded, lm, 0.0).unsqueeze(2)
    step = torch.where(encoded, (la - lm.squeeze(2)) / 510, 1.0).unsqueeze(2)
    levels = (torch.log2(ax) - lm) / step + 2 - torch.log2((1 + torch.exp2(step)) / 2) / step
    levels = torch.where(encoded.unsqueeze(2) & (ax > 0), levels, 0.0)
    codes = torch.floor(levels.clamp(0, 511)).to(torch.int32)
    return codes.view(num_rows, hidden), encoded, levels.view(num_rows, hidden)


def logfmt_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """float32 `[N, H]`: bf16 rows `x` after LogFMT-10 encode and decode (reference §14.10): in
    encoded groups ±2**((c - 1) * step + lm) or ±0 for code 0 (evaluated in float64, rounded
    once); BF16 groups unchanged.

    Example: the group of `logfmt_codes`' example -> 0.5, 126 x 2**-10 * 1.0192, 0.0.
    """
    num_rows, hidden = x.shape
    codes, encoded, _ = logfmt_codes(x)
    xd = x.cpu().double().view(num_rows, hidden // 128, 128)
    ax = xd.abs()
    amax, amin = ax.amax(dim=2, keepdim=True), ax.amin(dim=2, keepdim=True)
    la = torch.log2(amax)
    lm = torch.where(amin > 0, torch.maximum(torch.log2(amin), la - 32), la - 32)
    step = (la - lm) / 510
    c = codes.view(num_rows, hidden // 128, 128).double()
    magnitude = torch.where(c > 0, torch.exp2((c - 1) * step + lm), 0.0)
    decoded = torch.where(encoded.unsqueeze(2), torch.copysign(magnitude, xd), xd)
    return decoded.view(num_rows, hidden).float()


def _ll_linked(mask, a: int, b: int) -> bool:
    """Whether ranks a and b exchange LL traffic: neither has masked the other."""
    return mask is None or not (bool(mask[a][b]) or bool(mask[b][a]))


def ll_dispatch(
    rank: int,
    num_ranks: int,
    num_experts: int,
    num_max_dispatch_tokens_per_rank: int,
    xs,
    topk_idxs,
    mask=None,
) -> dict:
    """What `low_latency_dispatch` returns on `rank` (BF16, tritonep's deterministic order, §13.2).

    `xs[s]` `[N_s, H]` and `topk_idxs[s]` `[N_s, K]` are rank s's inputs. `mask[s][j]` (optional)
    is true when rank s has masked rank j (each rank's own view); rows from s reach `rank` only if
    neither has masked the other. One row per (token, k) with `0 <= topk_idx < E` on this rank's
    experts; per local expert, blocks of ascending source rank, rows of ascending token index (a
    token picking the same expert twice gives two adjacent rows).

    Returns a dict: `recv_x` bf16 `[L, R*T, H]` (rows past `recv_count` zero), `recv_count` int32
    `[L]`, `packed_recv_src_info` int32 `[L, R*T]` (0 past `recv_count`),
    `packed_recv_layout_range` int64 `[L, R]` = `begin << 32 | count`, `begin` = rows of earlier
    sources (also for an empty block).

    Example: R=2, E=4 (L=2), T=2, rank 1; rank 0 routes token 0 to experts [2, 3] and token 1 to
    [3, -1]; rank 1 routes token 0 to [3, 3]
        -> expert 2 (local 0): rows [x0[0]], src_info [0], layout [(0 << 32) | 1, (1 << 32) | 0]
           expert 3 (local 1): rows [x0[0], x0[1], x1[0], x1[0]], src_info [0, 1, 0, 0],
           layout [(0 << 32) | 2, (2 << 32) | 2]; recv_count [1, 4].
    """
    experts_per_rank = num_experts // num_ranks
    capacity = num_ranks * num_max_dispatch_tokens_per_rank
    hidden = xs[rank].size(1)
    recv_x = torch.zeros((experts_per_rank, capacity, hidden), dtype=torch.bfloat16)
    recv_count = torch.zeros(experts_per_rank, dtype=torch.int32)
    src_info = torch.zeros((experts_per_rank, capacity), dtype=torch.int32)
    layout_range = torch.zeros((experts_per_rank, num_ranks), dtype=torch.int64)
    for local in range(experts_per_rank):
        expert = rank * experts_per_rank + local
        row = 0
        for src in range(num_ranks):
            tokens = torch.zeros(0, dtype=torch.int64)
            if _ll_linked(mask, src, rank):
                # nonzero() lists hits row-major: ascending token, then ascending k.
                tokens = torch.nonzero(topk_idxs[src].cpu() == expert)[:, 0]
            count = tokens.numel()
            recv_x[local, row : row + count] = xs[src].cpu()[tokens].to(torch.bfloat16)
            src_info[local, row : row + count] = tokens.to(torch.int32)
            layout_range[local, src] = (row << 32) | count
            row += count
        recv_count[local] = row
    return {
        "recv_x": recv_x,
        "recv_count": recv_count,
        "packed_recv_src_info": src_info,
        "packed_recv_layout_range": layout_range,
    }


def ll_combine(
    rank: int,
    num_ranks: int,
    num_experts: int,
    expert_outputs,
    topk_idx,
    topk_weights,
    src_infos,
    layout_ranges,
    mask=None,
    use_logfmt: bool = False,
) -> torch.Tensor:
    """What `low_latency_combine` returns on `rank` (reference §13.3): bf16 `[N, H]`.

    `expert_outputs[o]` `[L, R*T, H]` bf16 is what rank o passes to combine; `src_infos[o]` and
    `layout_ranges[o]` are handle entries 0 and 1 of o's dispatch; `topk_idx`, `topk_weights`
    `[N, K]` are this rank's routing. For each k in ascending order, `acc += w * y` in float32 (the
    product rounded, then the sum: what the interpreter computes, and a GPU kernel compiled without
    FMA contraction), rounded once to bf16. y is the row the owner of expert e returned for this
    token: the j-th (e, t) pair in k order maps to the j-th row of token t in e's block from `rank`.
    Entries with `topk_idx < 0` or `>= E`, or whose owner is masked either way, add nothing; rows
    without any entry are zero. `use_logfmt` passes each y through `logfmt_roundtrip`.

    Example: rank 0, token 0 routed to experts [1, 3] with weights [0.5, 2.0]; expert 1's owner
    returned 1.0 and expert 3's returned -0.25 -> combined[0] = bf16(0.5 * 1.0 + 2.0 * -0.25) = 0.
    """
    experts_per_rank = num_experts // num_ranks
    topk_idx, topk_weights = topk_idx.cpu(), topk_weights.cpu().float()
    num_tokens, num_topk = topk_idx.shape
    hidden = expert_outputs[0].size(2)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    seen = {}  # (expert, token) -> rows of that pair used so far
    for k in range(num_topk):
        tokens, rows = [], []
        for t in range(num_tokens):
            expert = int(topk_idx[t, k])
            owner = expert // experts_per_rank
            if not 0 <= expert < num_experts or not _ll_linked(mask, owner, rank):
                continue
            local = expert - owner * experts_per_rank
            packed = int(layout_ranges[owner][local, rank])
            begin, count = packed >> 32, packed & 0xFFFFFFFF
            block = src_infos[owner][local, begin : begin + count].cpu()
            matches = torch.nonzero(block == t)[:, 0]
            used = seen.get((expert, t), 0)
            assert used < matches.numel(), f"ll_combine: token {t} has no row in expert {expert}"
            seen[(expert, t)] = used + 1
            tokens.append(t)
            rows.append(expert_outputs[owner][local, begin + int(matches[used])].cpu())
        if not tokens:
            continue
        y = torch.stack(rows)
        y = logfmt_roundtrip(y) if use_logfmt else y.float()
        index = torch.tensor(tokens)
        acc[index] = acc[index] + topk_weights[index, k].unsqueeze(1) * y
    return acc.to(torch.bfloat16)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity error `1 - 2 sum(x y) / sum(x x + y y)` in float64, taken on x + 1 and
    y + 1 as DeepEP's tests do (so all-zero inputs give 0 and DeepEP's thresholds carry over).
    0 for equal tensors; about `mean((x - y)**2) / (2 mean((x + 1)**2))` for small differences."""
    x, y = x.double().cpu() + 1, y.double().cpu() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


# ------------------------------------------------------------------------------------ internode
# Spec §12.2 (the 10-tuple handle) and §10 with tritonep's internode reduction order.


def channel_ranges(num_tokens: int, num_channels: int) -> list[tuple[int, int]]:
    """Spec §12: channel c of a rank holding `num_tokens` tokens is `[min(c*w, N), min(c*w+w, N))`,
    `w = ceil(N / C)`."""
    width = -(-num_tokens // num_channels)
    return [
        (min(c * width, num_tokens), min(c * width + width, num_tokens))
        for c in range(num_channels)
    ]


def _channel_prefix(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """int32 `[columns, C]`: inclusive prefix over channels of the rows set in each column."""
    per_channel = [mask[b:e].sum(0) for b, e in channel_ranges(mask.size(0), num_channels)]
    return torch.stack(per_channel, dim=1).cumsum(1).to(torch.int32)


def node_mask(is_token_in_rank: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """bool `[N, R_n]`: token t goes to at least one rank of node n."""
    num_tokens, num_ranks = is_token_in_rank.shape
    return is_token_in_rank.view(num_tokens, num_ranks // ranks_per_node, ranks_per_node).any(2)


def internode_handle(
    rank: int, ranks_per_node: int, num_channels: int, is_token_in_rank
) -> dict[str, torch.Tensor]:
    """Entries 1-7 of the internode handle rank `rank` must return (reference §12.2), by name, from
    the `is_token_in_rank` every rank passed (list indexed by rank; CPU tensors).

    Example: 2 nodes x 1 rank, C = 1; rank 0 sends 3 tokens to itself and 2 to rank 1, rank 1
    sends 1 and 4 -> rank 1: recv_gbl_rank_prefix_sum = [2, 6], recv_rdma_rank_prefix_sum = [2, 6],
    recv_gbl_channel_prefix_matrix = [[0], [2]].
    """
    d = ranks_per_node
    node, local = rank // d, rank % d
    num_ranks = len(is_token_in_rank)
    masks = [m.cpu() for m in is_token_in_rank]
    gbl = [_channel_prefix(m, num_channels) for m in masks]  # [R, C] per source
    rdma = [_channel_prefix(node_mask(m, d), num_channels) for m in masks]  # [R_n, C] per source
    column = [n * d + local for n in range(num_ranks // d)]
    recv_rdma = torch.stack([rdma[s][node] for s in column])
    received = torch.tensor([int(gbl[s][rank, -1]) for s in range(num_ranks)], dtype=torch.int64)
    recv_gbl_sum = received.cumsum(0)
    before = recv_gbl_sum - received
    recv_gbl = torch.stack(
        [
            before[s] + torch.cat([torch.zeros(1, dtype=torch.int64), gbl[s][rank, :-1].long()])
            for s in range(num_ranks)
        ]
    )
    meta = []
    for s in range(num_ranks):
        rows = masks[s][masks[s][:, rank]][:, node * d : node * d + d].long()
        bits = (rows << torch.arange(d)).sum(1)
        meta.append(torch.stack([torch.full_like(bits, s // d), bits], dim=1))
    recv_src_meta = (
        torch.cat(meta).to(torch.int32) if meta else torch.zeros((0, 2), dtype=torch.int32)
    )
    return {
        "rdma_channel_prefix_matrix": rdma[rank],
        "gbl_channel_prefix_matrix": gbl[rank],
        "recv_rdma_channel_prefix_matrix": recv_rdma,
        "recv_rdma_rank_prefix_sum": recv_rdma[:, -1].cumsum(0).to(torch.int32),
        "recv_gbl_channel_prefix_matrix": recv_gbl.to(torch.int32),
        "recv_gbl_rank_prefix_sum": recv_gbl_sum.to(torch.int32),
        "recv_src_meta": recv_src_meta.contiguous().view(torch.uint8).view(-1, 8),
    }


def internode_combine(
    rank: int, ranks_per_node: int, returned, blocks, num_tokens: int, biases=(), weights=None
):
    """Combined rows for rank `rank` in tritonep's internode order (reference §10 allows the
    per-node rounding): for each token, `acc = fp32(bias0) + fp32(bias1)`, then for each node n
    ascending `acc += fp32(round(sum over ranks (n, l) ascending of fp32(row)))`, rounded once to
    the rows' dtype. Weights: the same sums without any rounding.

    `returned[j]`: `[X_j, H]` rows rank j passes to combine; `blocks[j]`: (first_row, src_idx), the
    rows of rank j that came from `rank` (as `combine` of the intranode reference);
    `weights`: optional list of `[X_j, K]` float32.

    Example: 2 nodes x 2 ranks, bf16; a token of rank 0 comes back as 1.0 from rank 0, 2**-8 from
    rank 1 and 2**-8 from rank 2 -> node 0's partial bf16(1 + 2**-8) = 1.0 (a tie, to even), the
    result bf16(1.0 + 2**-8) = 1.0, where one flat fp32 sum would give bf16(1 + 2**-7) = 1.0078125.
    """
    d = ranks_per_node
    dtype = returned[0].dtype
    hidden = returned[0].size(1)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    for b in biases:
        if b is not None:
            acc += b.cpu().float()
    wacc = None
    if weights is not None:
        wacc = torch.zeros((num_tokens, weights[0].size(1)), dtype=torch.float32)
    for n in range(len(returned) // d):
        part = torch.zeros((num_tokens, hidden), dtype=torch.float32)
        wpart = torch.zeros_like(wacc) if wacc is not None else None
        for j in range(n * d, n * d + d):
            first, src = blocks[j]
            rows = returned[j].cpu()[first : first + src.numel()].float()
            part.index_add_(0, src.long().cpu(), rows)
            if wpart is not None:
                wpart.index_add_(
                    0, src.long().cpu(), weights[j].cpu()[first : first + src.numel()].float()
                )
        acc += part.to(dtype).float()
        if wacc is not None:
            wacc += wpart
    return acc.to(dtype), wacc
