"""Every validation rule of the public API, table-driven, on the CPU backend (spec/API.md §2).

Each case calls one API entry point with one bad argument on every rank and expects:
  * exactly the error class the spec names (`EPInvalidArgument`, `EPUnsupported`, `EPStateError`);
  * a message that names the argument and its actual value (§2: "`<arg>` ..., got `<value>`");
  * an unharmed Buffer: after the case every rank runs a small dispatch + combine round trip and
    checks it with plain torch (rows copied exactly, combine = x * number of destination ranks).
If a round trip fails (e.g. a case that should have raised ran a collective with bad inputs), all
ranks rebuild the buffer together, so one broken case cannot hide the ones after it.

Cost: a pool task runs a whole table per rank and returns its failures; one case plus its round trip
costs ~0.4 s in the interpreter (2 ranks, 8 tokens, hidden 64, one channel).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

import tritonep
from tritonep.errors import EPError, EPInvalidArgument, EPStateError, EPTimeoutError, EPUnsupported

NVL_BYTES = 1 << 20  # small enough that hidden 7168 with the default config does not fit (§15.3)
NUM_TOKENS, HIDDEN, NUM_TOPK, NUM_EXPERTS = 8, 64, 2, 8
CFG = (2, 4, 16)  # one channel; its 16-row queues hold a whole channel (CPU backend requirement)
TASK_TIMEOUT = 300


# --------------------------------------------------------------------------------- matching helpers
def num(value) -> re.Pattern:
    """`value` printed as a whole number/word: `3` matches 'got 3' but not '32' or '0.3'."""
    return re.compile(r"(?<![\w.])" + re.escape(str(value)) + r"(?![\w]|\.\d)")


def any_of(*needles) -> tuple:
    """A needle satisfied by any of its alternatives."""
    return tuple(needles)


@dataclass(frozen=True)
class Pred:
    """A needle that is a predicate on the whole message."""

    fn: Callable[[str], bool]
    text: str


def _mentions(message: str, needle) -> bool:
    if isinstance(needle, tuple):
        return any(_mentions(message, n) for n in needle)
    if isinstance(needle, re.Pattern):
        return needle.search(message) is not None
    if isinstance(needle, Pred):
        return needle.fn(message)
    return needle in message


def _describe(needle) -> str:
    if isinstance(needle, tuple):
        return " | ".join(_describe(n) for n in needle)
    if isinstance(needle, Pred):
        return needle.text
    return f"/{needle.pattern}/" if isinstance(needle, re.Pattern) else repr(needle)


def _states_bytes_needed(message: str) -> bool:
    """Some number after 'need' is a byte count larger than the buffer."""
    tail = message[message.find("need"):] if "need" in message else ""
    return any(int(n) > NVL_BYTES for n in re.findall(r"\d+", tail))


@dataclass(frozen=True)
class Case:
    """One bad call. `call(env)` makes it; `needles` (or `needles(env)`) must all be in the message.

    `exc=None` marks a call that must succeed; then `check(env, result)` must hold.
    """

    id: str
    call: Callable[[SimpleNamespace], Any]
    exc: type[BaseException] | None
    needles: tuple | Callable[[SimpleNamespace], tuple] = ()
    min_ranks: int = 1
    check: Callable[[SimpleNamespace, Any], bool] | None = None


def _run_case(env: SimpleNamespace, case: Case) -> str | None:
    """Run one case on this rank; return a failure description or None."""
    try:
        result = case.call(env)
    except Exception as e:  # noqa: BLE001 - any exception is compared with the expected class
        if case.exc is None:
            return f"{case.id}: expected success, raised {type(e).__name__}: {e}"
        if type(e) is not case.exc:
            return f"{case.id}: raised {type(e).__name__} ({e}), expected {case.exc.__name__}"
        needles = case.needles(env) if callable(case.needles) else case.needles
        missing = [_describe(n) for n in needles if not _mentions(str(e), n)]
        if missing:
            return f"{case.id}: message {str(e)!r} does not mention {', '.join(missing)}"
        return None
    if case.exc is not None:
        return f"{case.id}: did not raise (expected {case.exc.__name__})"
    if case.check is not None and not case.check(env, result):
        return f"{case.id}: succeeded but the result is wrong: {result!r}"
    return None


# ------------------------------------------------------------------------------- rank-side helpers
def make_inputs(rank: int, device=torch.device("cpu")):
    """Row t of rank s is the constant 16*s + t + 1 (exact in bf16); two experts per token, some -1."""
    t = torch.arange(NUM_TOKENS)
    x = (t.float() + 1 + 16 * rank).unsqueeze(1).expand(NUM_TOKENS, HIDDEN).to(torch.bfloat16).contiguous()
    topk_idx = torch.stack([(t + rank) % NUM_EXPERTS, (3 * t + 1) % NUM_EXPERTS], dim=1)
    topk_idx[::3, 1] = -1
    topk_weights = torch.linspace(0.1, 1.0, NUM_TOKENS * NUM_TOPK).view(NUM_TOKENS, NUM_TOPK)
    return x.to(device), topk_idx.to(tritonep.topk_idx_t).to(device), topk_weights.to(device)


def round_trip(buffer: tritonep.Buffer, rank: int, num_ranks: int) -> SimpleNamespace:
    """layout + dispatch + combine with plain-torch checks; returns the valid inputs and outputs."""
    config = tritonep.Config(*CFG)
    x, topk_idx, topk_weights = make_inputs(rank)
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    assert ntn is None
    want_itr = torch.zeros(NUM_TOKENS, num_ranks, dtype=torch.bool)
    experts_per_rank = NUM_EXPERTS // num_ranks
    for t, k in zip(*torch.nonzero(topk_idx >= 0, as_tuple=True)):
        want_itr[t, topk_idx[t, k] // experts_per_rank] = True
    assert torch.equal(itr, want_itr), f"round trip: is_token_in_rank {itr.tolist()} != {want_itr.tolist()}"
    assert torch.equal(ntr, want_itr.sum(0).to(torch.int32)), f"round trip: num_tokens_per_rank {ntr.tolist()}"
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
        topk_idx=topk_idx, topk_weights=topk_weights, config=config,
    )
    # Rows from source s sit in [prefix[s-1][rank], prefix[s][rank]) and hold 16*s + src + 1.
    prefix, src = handle[0][:, rank].tolist(), handle[3]
    want_rows = torch.empty(src.numel(), dtype=torch.float32)
    for s in range(num_ranks):
        begin = prefix[s - 1] if s > 0 else 0
        want_rows[begin : prefix[s]] = src[begin : prefix[s]].float() + 1 + 16 * s
    want_x = want_rows.unsqueeze(1).expand(-1, HIDDEN).to(torch.bfloat16)
    assert torch.equal(recv_x, want_x), f"round trip: recv_x rows {recv_x[:, 0].tolist()} != {want_rows.tolist()}"
    assert sum(counts) == int((recv_idx >= 0).sum()), f"round trip: counts {counts}"
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, config=config)
    want = (x.float() * itr.sum(1, keepdim=True).float()).to(torch.bfloat16)
    assert torch.equal(combined, want), f"round trip: combined {combined[:, 0].tolist()} != {want[:, 0].tolist()}"
    want_w = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
    assert torch.equal(combined_w, want_w), f"round trip: combined_topk_weights {combined_w.tolist()}"
    return SimpleNamespace(
        buffer=buffer, rank=rank, R=num_ranks, cfg=config, x=x, topk_idx=topk_idx, topk_weights=topk_weights,
        ntr=ntr, itr=itr, nte=nte, handle=tuple(handle), recv_x=recv_x, recv_w=recv_w, M=recv_x.size(0),
    )


def _all_ok(group, ok: bool) -> bool:
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, ok, group=group)
    return all(flags)


def _fresh_env(ctx, key) -> SimpleNamespace:
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    ctx.state[key] = buffer
    return round_trip(buffer, ctx.rank, ctx.world_size)


def _checked_round_trip(ctx, key, env, label: str, failures: list) -> SimpleNamespace:
    """Round trip on the current buffer; if any rank fails, every rank rebuilds it."""
    error = None
    try:
        new_env = round_trip(env.buffer, ctx.rank, ctx.world_size)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    if _all_ok(ctx.group, error is None):
        return new_env
    failures.append(f"buffer unusable after {label}: {error or 'another rank failed its round trip'}")
    return _fresh_env(ctx, key)


def run_table(ctx, table_name: str) -> list[str]:
    """Pool task: every case of `TABLES[table_name]` on this rank, a round trip after each."""
    key = ("test_validation", NVL_BYTES)
    buffer = ctx.state.get(key)
    env = round_trip(buffer, ctx.rank, ctx.world_size) if buffer is not None else _fresh_env(ctx, key)
    failures = []
    for case in TABLES[table_name]:
        if ctx.world_size < case.min_ranks:
            continue
        failure = _run_case(env, case)
        if failure:
            failures.append(failure)
        env = _checked_round_trip(ctx, key, env, f"case {case.id}", failures)
    return failures


# ------------------------------------------------------------------------------------ case tables
def _kw(env, **overrides) -> dict:
    """Valid non-cached dispatch arguments with `overrides` applied."""
    kw = dict(num_tokens_per_rank=env.ntr, is_token_in_rank=env.itr, num_tokens_per_expert=env.nte,
              topk_idx=env.topk_idx, topk_weights=env.topk_weights, config=env.cfg)
    kw.update(overrides)
    return kw


def _dispatch(**overrides):
    return lambda e: e.buffer.dispatch(e.x, **_kw(e, **overrides))


def _dispatch_x(make_x, **overrides):
    return lambda e: e.buffer.dispatch(make_x(e), **_kw(e, **overrides))


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every other element of a wider tensor: strides (2 * cols, 2)."""
    wide = torch.zeros((t.size(0), 2 * t.size(1)), dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


def _fp8(rows=NUM_TOKENS, hidden=HIDDEN):
    return torch.zeros((rows, hidden), dtype=torch.float8_e4m3fn)


def _scales(rows=NUM_TOKENS, cols=1, dtype=torch.float32):
    return torch.ones((rows, cols), dtype=dtype)


LAYOUT_CASES = [
    Case("layout-topk_idx-float32", lambda e: e.buffer.get_dispatch_layout(e.topk_idx.float(), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", "float32")),
    Case("layout-topk_idx-int16", lambda e: e.buffer.get_dispatch_layout(e.topk_idx.to(torch.int16), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", "int16")),
    Case("layout-topk_idx-1d", lambda e: e.buffer.get_dispatch_layout(e.topk_idx[:, 0].contiguous(), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", f"({NUM_TOKENS},)")),
    Case("layout-topk_idx-3d", lambda e: e.buffer.get_dispatch_layout(e.topk_idx.view(2, 4, NUM_TOPK), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", f"(2, 4, {NUM_TOPK})")),
    Case("layout-topk_idx-non-contiguous",
         lambda e: e.buffer.get_dispatch_layout(_non_contiguous(e.topk_idx), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", "contiguous", f"({2 * NUM_TOPK}, 2)")),
    Case("layout-topk_idx-list", lambda e: e.buffer.get_dispatch_layout(e.topk_idx.tolist(), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", "list")),
    Case("layout-topk_idx-meta-device",
         lambda e: e.buffer.get_dispatch_layout(e.topk_idx.to("meta"), NUM_EXPERTS),
         EPInvalidArgument, ("topk_idx", "meta")),
    Case("layout-num_experts-not-divisible", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, 7),
         EPInvalidArgument, ("num_experts", num(7)), min_ranks=2),
    Case("layout-num_experts-zero", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, 0),
         EPInvalidArgument, ("num_experts", num(0))),
    Case("layout-num_experts-negative", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, -8),
         EPInvalidArgument, ("num_experts", num(-8))),
    Case("layout-num_experts-float", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, 8.0),
         EPInvalidArgument, ("num_experts", "8.0")),
    Case("layout-previous_event-str",
         lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS, previous_event="event"),
         EPInvalidArgument, ("previous_event", "str")),
    Case("layout-allocate_on_comm_stream-alone",
         lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS, allocate_on_comm_stream=True),
         EPInvalidArgument, ("allocate_on_comm_stream", "previous_event")),
    Case("layout-allocate_on_comm_stream-without-async",
         lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS, previous_event=e.buffer.capture(),
                                                allocate_on_comm_stream=True),
         EPInvalidArgument, ("allocate_on_comm_stream", "async_finish")),
    # §14.5 rule 2 satisfied: must pass and give the same layout
    Case("layout-allocate_on_comm_stream-valid",
         lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS, previous_event=e.buffer.capture(),
                                                async_finish=True, allocate_on_comm_stream=True),
         None, check=lambda e, out: torch.equal(out[0], e.ntr) and torch.equal(out[2], e.nte)
         and torch.equal(out[3], e.itr)),
]

DISPATCH_CASES = [
    # x (§9.1)
    Case("dispatch-x-1d", _dispatch_x(lambda e: e.x.view(-1)), EPInvalidArgument,
         ("x", f"({NUM_TOKENS * HIDDEN},)")),
    Case("dispatch-x-3d", _dispatch_x(lambda e: e.x.view(NUM_TOKENS, 2, HIDDEN // 2)), EPInvalidArgument,
         ("x", f"({NUM_TOKENS}, 2, {HIDDEN // 2})")),
    Case("dispatch-x-list", _dispatch_x(lambda e: e.x.tolist()), EPInvalidArgument, ("x", "list")),
    Case("dispatch-x-row-bytes-24", _dispatch_x(lambda e: torch.zeros(NUM_TOKENS, 12, dtype=torch.bfloat16)),
         EPInvalidArgument, ("x", num(12), "16")),
    Case("dispatch-x-row-bytes-fp32-hidden-6", _dispatch_x(lambda e: torch.zeros(NUM_TOKENS, 6)),
         EPInvalidArgument, ("x", num(6), "16")),
    Case("dispatch-x-column-major", _dispatch_x(lambda e: e.x.t().contiguous().t()), EPInvalidArgument,
         ("x", "stride")),
    Case("dispatch-x-meta-device", _dispatch_x(lambda e: e.x.to("meta")), EPInvalidArgument, ("x", "meta")),
    # FP8 tuples (§9.1)
    Case("dispatch-fp8-scales-float16", _dispatch_x(lambda e: (_fp8(), _scales(dtype=torch.float16))),
         EPInvalidArgument, (any_of("x[1]", "scales"), "float16")),
    Case("dispatch-fp8-scales-int64", _dispatch_x(lambda e: (_fp8(), _scales(dtype=torch.int64))),
         EPInvalidArgument, (any_of("x[1]", "scales"), "int64")),
    Case("dispatch-fp8-scales-rows", _dispatch_x(lambda e: (_fp8(), _scales(rows=NUM_TOKENS - 1))),
         EPInvalidArgument, (any_of("x[1]", "scales"), num(NUM_TOKENS - 1))),
    Case("dispatch-fp8-scales-1d", _dispatch_x(lambda e: (_fp8(), torch.ones(NUM_TOKENS))),
         EPInvalidArgument, (any_of("x[1]", "scales"), f"({NUM_TOKENS},)")),
    Case("dispatch-fp8-data-2-byte", _dispatch_x(lambda e: (e.x, _scales())),
         EPInvalidArgument, (any_of("x[0]", "data"), "bfloat16")),
    Case("dispatch-x-tuple-of-3", _dispatch_x(lambda e: (_fp8(), _scales(), _scales())),
         EPInvalidArgument, ("x", num(3))),
    Case("dispatch-x-tuple-of-1", _dispatch_x(lambda e: (_fp8(),)), EPInvalidArgument, ("x", num(1))),
    # count tensors (§9.2)
    Case("dispatch-missing-num_tokens_per_rank", _dispatch(num_tokens_per_rank=None), EPInvalidArgument,
         ("num_tokens_per_rank",)),
    Case("dispatch-missing-is_token_in_rank", _dispatch(is_token_in_rank=None), EPInvalidArgument,
         ("is_token_in_rank",)),
    Case("dispatch-missing-num_tokens_per_expert", _dispatch(num_tokens_per_expert=None), EPInvalidArgument,
         ("num_tokens_per_expert",)),
    Case("dispatch-num_tokens_per_rank-int64", lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_rank=e.ntr.long())),
         EPInvalidArgument, ("num_tokens_per_rank", "int64")),
    Case("dispatch-num_tokens_per_rank-shape",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_rank=torch.zeros(e.R + 1, dtype=torch.int32))),
         EPInvalidArgument, lambda e: ("num_tokens_per_rank", f"({e.R + 1},)")),
    Case("dispatch-is_token_in_rank-int32",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, is_token_in_rank=e.itr.int())),
         EPInvalidArgument, ("is_token_in_rank", "int32")),
    Case("dispatch-is_token_in_rank-rows",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, is_token_in_rank=torch.zeros(NUM_TOKENS + 1, e.R, dtype=torch.bool))),
         EPInvalidArgument, lambda e: ("is_token_in_rank", f"({NUM_TOKENS + 1}, {e.R})")),
    Case("dispatch-is_token_in_rank-columns",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, is_token_in_rank=torch.zeros(NUM_TOKENS, e.R + 1, dtype=torch.bool))),
         EPInvalidArgument, lambda e: ("is_token_in_rank", f"({NUM_TOKENS}, {e.R + 1})")),
    Case("dispatch-is_token_in_rank-non-contiguous",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, is_token_in_rank=_non_contiguous(e.itr))),
         EPInvalidArgument, ("is_token_in_rank", "contiguous")),
    Case("dispatch-num_tokens_per_expert-int64",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=e.nte.long())),
         EPInvalidArgument, ("num_tokens_per_expert", "int64")),
    Case("dispatch-num_tokens_per_expert-2d",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=e.nte.view(1, -1))),
         EPInvalidArgument, ("num_tokens_per_expert", f"(1, {NUM_EXPERTS})")),
    Case("dispatch-num_tokens_per_expert-not-divisible",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=e.nte[:7].contiguous())),
         EPInvalidArgument, ("num_tokens_per_expert", num(7)), min_ranks=2),
    Case("dispatch-num_tokens_per_expert-non-contiguous",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=_non_contiguous(e.nte.view(1, -1)).view(-1))),
         EPInvalidArgument, ("num_tokens_per_expert", "contiguous")),
    Case("dispatch-num_tokens_per_expert-1025-per-rank",  # §9.2: E // R <= 1024
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=torch.zeros(1025 * e.R, dtype=torch.int32))),
         EPInvalidArgument, ("num_tokens_per_expert", num(1025))),
    Case("dispatch-num_tokens_per_expert-empty",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, num_tokens_per_expert=torch.zeros(0, dtype=torch.int32))),
         EPInvalidArgument, ("num_tokens_per_expert", num(0))),
    # top-k (§9.2)
    Case("dispatch-topk_idx-without-weights", _dispatch(topk_weights=None), EPInvalidArgument,
         ("topk_idx", "topk_weights")),
    Case("dispatch-topk_weights-without-idx", _dispatch(topk_idx=None), EPInvalidArgument,
         ("topk_idx", "topk_weights")),
    Case("dispatch-topk_idx-rows", lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_idx=e.topk_idx[:4].contiguous())),
         EPInvalidArgument, ("topk_idx", f"(4, {NUM_TOPK})")),
    Case("dispatch-topk_idx-float32", lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_idx=e.topk_idx.float())),
         EPInvalidArgument, ("topk_idx", "float32")),
    Case("dispatch-topk_idx-non-contiguous",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_idx=_non_contiguous(e.topk_idx))),
         EPInvalidArgument, ("topk_idx", "contiguous")),
    Case("dispatch-topk_weights-shape",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_weights=torch.zeros(NUM_TOKENS, NUM_TOPK + 1))),
         EPInvalidArgument, ("topk_weights", f"({NUM_TOKENS}, {NUM_TOPK + 1})")),
    Case("dispatch-topk_weights-bfloat16",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_weights=e.topk_weights.bfloat16())),
         EPInvalidArgument, ("topk_weights", "bfloat16")),
    Case("dispatch-topk_weights-non-contiguous",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, topk_weights=_non_contiguous(e.topk_weights))),
         EPInvalidArgument, ("topk_weights", "contiguous")),
    # scalars and config (§9.1, §9.2)
    Case("dispatch-expert_alignment-zero", _dispatch(expert_alignment=0), EPInvalidArgument,
         ("expert_alignment", num(0))),
    Case("dispatch-expert_alignment-negative", _dispatch(expert_alignment=-4), EPInvalidArgument,
         ("expert_alignment", num(-4))),
    Case("dispatch-num_worst_tokens-negative", _dispatch(num_worst_tokens=-1), EPInvalidArgument,
         ("num_worst_tokens", num(-1))),
    Case("dispatch-num_worst_tokens-float", _dispatch(num_worst_tokens=16.0), EPInvalidArgument,
         ("num_worst_tokens", "16.0")),
    Case("dispatch-config-odd-num_sms", lambda e: e.buffer.dispatch(e.x, **_kw(e, config=tritonep.Config(23, 6, 256))),
         EPInvalidArgument, ("num_sms", num(23))),
    Case("dispatch-config-zero-num_sms", lambda e: e.buffer.dispatch(e.x, **_kw(e, config=tritonep.Config(0, 4, 16))),
         EPInvalidArgument, ("num_sms", num(0))),
    Case("dispatch-config-tuple", _dispatch(config=CFG), EPInvalidArgument, ("config", "tuple")),
    # streams and events (§9.1, §14.5 rule 2)
    Case("dispatch-previous_event-str", _dispatch(previous_event="event"), EPInvalidArgument,
         ("previous_event", "str")),
    Case("dispatch-previous_event-tensor", _dispatch(previous_event=torch.zeros(1)), EPInvalidArgument,
         ("previous_event", "Tensor")),
    Case("dispatch-allocate_on_comm_stream-alone", _dispatch(allocate_on_comm_stream=True), EPInvalidArgument,
         ("allocate_on_comm_stream", "previous_event")),
    Case("dispatch-allocate_on_comm_stream-without-async",
         lambda e: e.buffer.dispatch(e.x, **_kw(e, allocate_on_comm_stream=True, previous_event=e.buffer.capture())),
         EPInvalidArgument, ("allocate_on_comm_stream", "async_finish")),
    # buffer capacity (§15.3): V1's own check fails too (10 channels x 2 ranks x 256 rows x 14 KiB)
    Case("dispatch-num_nvl_bytes-too-small",
         lambda e: e.buffer.dispatch(torch.zeros(NUM_TOKENS, 7168, dtype=torch.bfloat16), **_kw(e, config=None)),
         EPInvalidArgument,
         ("num_nvl_bytes", num(NVL_BYTES), Pred(_states_bytes_needed, "the bytes needed (> num_nvl_bytes)"))),
]

CACHED_CASES = [
    Case("cached-topk_idx-given",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle, topk_idx=e.topk_idx, config=e.cfg),
         EPInvalidArgument, ("topk_idx", "handle")),
    Case("cached-topk_weights-given",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle, topk_weights=e.topk_weights, config=e.cfg),
         EPInvalidArgument, ("topk_weights", "handle")),
    Case("cached-x-token-count",
         lambda e: e.buffer.dispatch(e.x[:5], handle=e.handle, config=e.cfg),
         EPInvalidArgument, ("x", num(5), num(NUM_TOKENS))),
    Case("cached-config-num_sms-mismatch",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle, config=tritonep.Config(6, 4, 16)),
         EPInvalidArgument, ("channels", num(1), num(3))),
    Case("cached-config-odd-num_sms",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle, config=tritonep.Config(23, 6, 256)),
         EPInvalidArgument, ("num_sms", num(23))),
    Case("cached-handle-5-tuple",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle[:5], config=e.cfg),
         EPInvalidArgument, ("handle", num(5))),
    Case("cached-handle-7-tuple",
         lambda e: e.buffer.dispatch(e.x, handle=(*e.handle, e.handle[0]), config=e.cfg),
         EPInvalidArgument, ("handle", num(7))),
    Case("cached-handle-str",
         lambda e: e.buffer.dispatch(e.x, handle="handle", config=e.cfg),
         EPInvalidArgument, ("handle", "str")),
    Case("cached-handle-entry-dtype",
         lambda e: e.buffer.dispatch(e.x, handle=(e.handle[0].long(), *e.handle[1:]), config=e.cfg),
         EPInvalidArgument, (any_of("handle[0]", "rank_prefix_matrix"), "int64")),
    Case("cached-handle-send_head-rows",
         lambda e: e.buffer.dispatch(e.x, handle=(*e.handle[:5], e.handle[5][:3].contiguous()), config=e.cfg),
         EPInvalidArgument, lambda e: (any_of("handle[5]", "send_head"), f"(3, {e.R})")),
    Case("cached-previous_event-str",
         lambda e: e.buffer.dispatch(e.x, handle=e.handle, config=e.cfg, previous_event="event"),
         EPInvalidArgument, ("previous_event", "str")),
]


def _combine(make_x=None, **overrides):
    def call(e):
        kw = dict(handle=e.handle, topk_weights=e.recv_w, config=e.cfg)
        kw.update(overrides)
        kw = {k: (v(e) if callable(v) else v) for k, v in kw.items()}
        return e.buffer.combine(make_x(e) if make_x is not None else e.recv_x, **kw)

    return call


COMBINE_CASES = [
    Case("combine-x-int32", _combine(lambda e: e.recv_x.int()), EPInvalidArgument, ("x", "int32")),
    Case("combine-x-float64", _combine(lambda e: e.recv_x.double()), EPInvalidArgument, ("x", "float64")),
    Case("combine-x-rows", _combine(lambda e: torch.zeros(e.M + 1, HIDDEN, dtype=torch.bfloat16)),
         EPInvalidArgument, lambda e: ("x", num(e.M + 1))),
    Case("combine-x-1d", _combine(lambda e: e.recv_x.view(-1)), EPInvalidArgument,
         lambda e: ("x", f"({e.M * HIDDEN},)")),
    Case("combine-x-row-bytes-24", _combine(lambda e: torch.zeros(e.M, 12, dtype=torch.bfloat16)),
         EPInvalidArgument, ("x", num(12), "16")),
    Case("combine-x-non-contiguous", _combine(lambda e: _non_contiguous(e.recv_x)), EPInvalidArgument,
         ("x", "contiguous")),
    Case("combine-x-meta-device", _combine(lambda e: e.recv_x.to("meta")), EPInvalidArgument, ("x", "meta")),
    Case("combine-topk_weights-rows", _combine(topk_weights=lambda e: torch.zeros(e.M + 1, NUM_TOPK)),
         EPInvalidArgument, lambda e: ("topk_weights", f"({e.M + 1}, {NUM_TOPK})")),
    Case("combine-topk_weights-1d", _combine(topk_weights=lambda e: torch.zeros(e.M)),
         EPInvalidArgument, lambda e: ("topk_weights", f"({e.M},)")),
    Case("combine-topk_weights-bfloat16", _combine(topk_weights=lambda e: e.recv_w.bfloat16()),
         EPInvalidArgument, ("topk_weights", "bfloat16")),
    Case("combine-bias-list", _combine(bias=lambda e: [torch.zeros(NUM_TOKENS, HIDDEN, dtype=torch.bfloat16)]),
         EPInvalidArgument, ("bias", "list")),
    Case("combine-bias-tuple-of-3",
         _combine(bias=lambda e: (torch.zeros(NUM_TOKENS, HIDDEN, dtype=torch.bfloat16),) * 3),
         EPInvalidArgument, ("bias", num(3))),
    Case("combine-bias-rows", _combine(bias=lambda e: torch.zeros(NUM_TOKENS + 1, HIDDEN, dtype=torch.bfloat16)),
         EPInvalidArgument, ("bias", f"({NUM_TOKENS + 1}, {HIDDEN})")),
    Case("combine-bias-hidden", _combine(bias=lambda e: torch.zeros(NUM_TOKENS, HIDDEN * 2, dtype=torch.bfloat16)),
         EPInvalidArgument, ("bias", f"({NUM_TOKENS}, {HIDDEN * 2})")),
    Case("combine-bias-float32", _combine(bias=lambda e: torch.zeros(NUM_TOKENS, HIDDEN)),
         EPInvalidArgument, ("bias", "float32")),
    Case("combine-bias-pair-second-shape",
         _combine(bias=lambda e: (torch.zeros(NUM_TOKENS, HIDDEN, dtype=torch.bfloat16),
                                  torch.zeros(NUM_TOKENS - 1, HIDDEN, dtype=torch.bfloat16))),
         EPInvalidArgument, ("bias[1]", f"({NUM_TOKENS - 1}, {HIDDEN})")),
    Case("combine-handle-as-list", _combine(handle=lambda e: list(e.handle), topk_weights=None), None,  # §10
         check=lambda e, out: torch.equal(out[0], (e.x.float() * e.itr.sum(1, keepdim=True)).to(torch.bfloat16))),
    Case("combine-handle-5-tuple", _combine(handle=lambda e: e.handle[:5]), EPInvalidArgument, ("handle", num(5))),
    Case("combine-handle-none", _combine(handle=lambda e: None), EPInvalidArgument, ("handle", "None")),
    Case("combine-handle-entry-shape", _combine(handle=lambda e: (*e.handle[:2], e.handle[2][:, :0], *e.handle[3:])),
         EPInvalidArgument, lambda e: (any_of("handle[2]", "recv_channel_prefix_matrix"), f"({e.R}, 0)")),
    Case("combine-config-num_sms-mismatch", _combine(config=tritonep.Config(6, 4, 16)), EPInvalidArgument,
         ("channels", num(1), num(3))),
    Case("combine-config-odd-num_sms", _combine(config=tritonep.Config(23, 6, 256)), EPInvalidArgument,
         ("num_sms", num(23))),
    Case("combine-previous_event-str", _combine(previous_event="event"), EPInvalidArgument,
         ("previous_event", "str")),
    Case("combine-allocate_on_comm_stream-alone", _combine(allocate_on_comm_stream=True), EPInvalidArgument,
         ("allocate_on_comm_stream", "previous_event")),
]


def _ll_x(e):
    return torch.zeros(NUM_TOKENS, 128, dtype=torch.bfloat16)


STATE_CASES = [
    # §13: every low-latency method needs low_latency_mode=True
    Case("ll-clean_low_latency_buffer", lambda e: e.buffer.clean_low_latency_buffer(NUM_TOKENS, 128, NUM_EXPERTS),
         EPStateError, ("low_latency_mode",)),
    Case("ll-low_latency_dispatch",
         lambda e: e.buffer.low_latency_dispatch(_ll_x(e), e.topk_idx, NUM_TOKENS, NUM_EXPERTS, use_fp8=False),
         EPStateError, ("low_latency_mode",)),
    Case("ll-low_latency_combine",
         lambda e: e.buffer.low_latency_combine(
             torch.zeros(NUM_EXPERTS // e.R, e.R * NUM_TOKENS, 128, dtype=torch.bfloat16), e.topk_idx, e.topk_weights,
             (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), NUM_TOKENS, 128, NUM_EXPERTS)),
         EPStateError, ("low_latency_mode",)),
    Case("ll-get_next_low_latency_combine_buffer",
         lambda e: e.buffer.get_next_low_latency_combine_buffer(
             (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), NUM_TOKENS, 128, NUM_EXPERTS)),
         EPStateError, ("low_latency_mode",)),
    # §13.5: the mask API needs enable_shrink=True
    Case("mask-update", lambda e: e.buffer.low_latency_update_mask_buffer(0, True), EPStateError, ("enable_shrink",)),
    Case("mask-query", lambda e: e.buffer.low_latency_query_mask_buffer(torch.zeros(e.R, dtype=torch.int32)),
         EPStateError, ("enable_shrink",)),
    Case("mask-clean", lambda e: e.buffer.low_latency_clean_mask_buffer(), EPStateError, ("enable_shrink",)),
    # §11: internode entry points need more than 8 ranks; the message names the rank count
    Case("internode_dispatch-intranode",
         lambda e: e.buffer.internode_dispatch(e.x, None, e.ntr, None, e.itr, e.nte, config=e.cfg),
         EPStateError, lambda e: ("internode_dispatch", "8", num(e.R))),
    Case("internode_combine-intranode",
         lambda e: e.buffer.internode_combine(e.recv_x, e.handle, config=e.cfg),
         EPStateError, lambda e: ("internode_combine", "8", num(e.R))),
    # §5.5: destroy() needs explicitly_destroy=True
    Case("destroy-not-explicit", lambda e: e.buffer.destroy(), EPStateError, ("explicitly_destroy",)),
    # §7.2 get_local_buffer_tensor (local)
    Case("local-offset-not-multiple-of-itemsize",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, offset=3), EPInvalidArgument, ("offset", num(3))),
    Case("local-offset-negative",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, offset=-4), EPInvalidArgument, ("offset", num(-4))),
    Case("local-offset-beyond-buffer",
         lambda e: e.buffer.get_local_buffer_tensor(torch.uint8, offset=NVL_BYTES + 128), EPInvalidArgument,
         ("offset", num(NVL_BYTES + 128))),
    Case("local-offset-float",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, offset=4.0), EPInvalidArgument, ("offset", "4.0")),
    Case("local-size-too-large",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, torch.Size([NVL_BYTES // 4 + 1])),
         EPInvalidArgument, ("size", f"({NVL_BYTES // 4 + 1},)")),
    Case("local-size-too-large-after-offset",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, torch.Size([2, NVL_BYTES // 8]), offset=128),
         EPInvalidArgument, ("size", f"(2, {NVL_BYTES // 8})", num(128))),
    Case("local-dtype-not-a-dtype",
         lambda e: e.buffer.get_local_buffer_tensor("float32"), EPInvalidArgument, ("dtype", "float32")),
    # boundaries that must pass: exactly the whole buffer, and the clamped 1-D view after an offset
    Case("local-size-exactly-fits",
         lambda e: e.buffer.get_local_buffer_tensor(torch.float32, torch.Size([NVL_BYTES // 4])), None,
         check=lambda e, t: t.shape == (NVL_BYTES // 4,) and t.dtype == torch.float32),
    Case("local-offset-clamps",
         lambda e: e.buffer.get_local_buffer_tensor(torch.int32, offset=128), None,
         check=lambda e, t: t.shape == ((NVL_BYTES - 128) // 4,)),
]

TABLES = {
    "layout": LAYOUT_CASES,
    "dispatch": DISPATCH_CASES,
    "cached": CACHED_CASES,
    "combine": COMBINE_CASES,
    "state": STATE_CASES,
}


# -------------------------------------------------------------------------- constructor (§5.2)
def _ctor_cases(group, rank: int, num_ranks: int) -> list[tuple[str, Callable[[], Any], type, tuple]]:
    """(id, call, error, needles); calls made on every rank, some with a rank-dependent argument."""
    cases = [
        ("group-and-comm-none", lambda: tritonep.Buffer(None, num_nvl_bytes=NVL_BYTES), EPInvalidArgument,
         ("group", "comm", "None")),
        ("group-and-comm-none-explicit", lambda: tritonep.Buffer(None, NVL_BYTES, comm=None), EPInvalidArgument,
         ("group", "comm", "None")),
        ("num_nvl_bytes-not-multiple-of-128", lambda: tritonep.Buffer(group, num_nvl_bytes=100), EPInvalidArgument,
         ("num_nvl_bytes", num(100), "128")),
        ("num_nvl_bytes-negative", lambda: tritonep.Buffer(group, num_nvl_bytes=-128), EPInvalidArgument,
         ("num_nvl_bytes", num(-128))),
        ("num_nvl_bytes-float", lambda: tritonep.Buffer(group, num_nvl_bytes=1024.0), EPInvalidArgument,
         ("num_nvl_bytes", "1024.0")),
        ("num_nvl_bytes-str", lambda: tritonep.Buffer(group, num_nvl_bytes="1024"), EPInvalidArgument,
         ("num_nvl_bytes", "'1024'")),
        ("num_nvl_bytes-bool", lambda: tritonep.Buffer(group, num_nvl_bytes=True), EPInvalidArgument,
         ("num_nvl_bytes", "True")),
        ("num_rdma_bytes-without-low_latency_mode",
         lambda: tritonep.Buffer(group, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=1 << 20), EPInvalidArgument,
         ("num_rdma_bytes", num(1 << 20), "low_latency_mode")),
        ("num_rdma_bytes-not-multiple-of-128",
         lambda: tritonep.Buffer(group, num_rdma_bytes=1000, low_latency_mode=True), EPInvalidArgument,
         ("num_rdma_bytes", num(1000))),
        ("num_rdma_bytes-negative",
         lambda: tritonep.Buffer(group, num_rdma_bytes=-128, low_latency_mode=True), EPInvalidArgument,
         ("num_rdma_bytes", num(-128))),
        ("num_qps_per_rank-zero-low-latency",
         lambda: tritonep.Buffer(group, num_rdma_bytes=1 << 20, low_latency_mode=True, num_qps_per_rank=0),
         EPInvalidArgument, ("num_qps_per_rank", num(0))),
    ]
    if num_ranks >= 2:  # rule 6: collective consistency, every rank must raise
        nvl = 1024 * (rank + 1)
        cases += [
            ("rule6-num_nvl_bytes-differ", lambda: tritonep.Buffer(group, num_nvl_bytes=nvl), EPInvalidArgument,
             ("num_nvl_bytes", num(1024), num(2048))),
            ("rule6-num_rdma_bytes-differ",
             lambda: tritonep.Buffer(group, num_rdma_bytes=nvl, low_latency_mode=True), EPInvalidArgument,
             ("num_rdma_bytes", num(1024), num(2048))),
            ("rule6-low_latency_mode-differ",
             lambda: tritonep.Buffer(group, num_nvl_bytes=NVL_BYTES, low_latency_mode=rank == 0), EPInvalidArgument,
             ("low_latency_mode", "True", "False")),
            ("rule6-enable_shrink-differ",
             lambda: tritonep.Buffer(group, num_nvl_bytes=NVL_BYTES, enable_shrink=rank == 1), EPInvalidArgument,
             ("enable_shrink", "True", "False")),
        ]
    return cases


def run_constructor_table(ctx) -> list[str]:
    """Pool task: each bad constructor call, then a fresh valid Buffer must round-trip (group intact)."""
    failures = []
    for case_id, call, exc, needles in _ctor_cases(ctx.group, ctx.rank, ctx.world_size):
        failure = _run_case(None, Case(case_id, lambda _e, call=call: call(), exc, needles))
        if failure:
            failures.append(failure)
        error = None
        try:
            round_trip(tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES), ctx.rank, ctx.world_size)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        if not _all_ok(ctx.group, error is None):
            failures.append(f"no working Buffer after constructor case {case_id}: {error or 'another rank failed'}")
    return failures


# ----------------------------------------------------------------------------- lifetime (§5.5, §9.1)
def run_lifetime_table(ctx) -> list[str]:
    """Pool task: use after destroy, destroy twice, and a buffer without NVL memory."""
    rank, num_ranks = ctx.rank, ctx.world_size
    failures = []
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES, explicitly_destroy=True)
    env = round_trip(buffer, rank, num_ranks)
    buffer.destroy()
    if buffer.runtime is not None:
        failures.append(f"destroy: runtime must be None afterwards, got {buffer.runtime!r}")
    destroyed = ("destroyed",)
    cases = [
        Case("destroyed-dispatch", lambda e: e.buffer.dispatch(e.x, **_kw(e)), EPStateError, destroyed),
        Case("destroyed-cached-dispatch", lambda e: e.buffer.dispatch(e.x, handle=e.handle, config=e.cfg),
             EPStateError, destroyed),
        Case("destroyed-combine", _combine(), EPStateError, destroyed),
        Case("destroyed-get_dispatch_layout", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS),
             EPStateError, destroyed),
        Case("destroyed-get_local_buffer_tensor", lambda e: e.buffer.get_local_buffer_tensor(torch.float32),
             EPStateError, destroyed),
        Case("destroyed-low_latency_dispatch",
             lambda e: e.buffer.low_latency_dispatch(_ll_x(e), e.topk_idx, NUM_TOKENS, NUM_EXPERTS),
             EPStateError, destroyed),
        Case("destroyed-destroy-again", lambda e: e.buffer.destroy(), EPStateError, destroyed),
    ]
    failures += [f for f in (_run_case(env, c) for c in cases) if f]

    # §9.1: HT data calls need num_nvl_bytes > 0 (EPStateError); the layout is local and still works.
    empty = tritonep.Buffer(ctx.group, num_nvl_bytes=0)
    env.buffer = empty
    cases = [
        Case("no-nvl-memory-dispatch", lambda e: e.buffer.dispatch(e.x, **_kw(e)), EPStateError, ("num_nvl_bytes",)),
        Case("no-nvl-memory-combine", _combine(), EPStateError, ("num_nvl_bytes",)),
        Case("no-nvl-memory-get_local_buffer_tensor", lambda e: e.buffer.get_local_buffer_tensor(torch.float32),
             EPStateError, ("num_nvl_bytes",)),
        Case("no-nvl-memory-layout-works", lambda e: e.buffer.get_dispatch_layout(e.topk_idx, NUM_EXPERTS), None,
             check=lambda e, out: torch.equal(out[3], e.itr) and torch.equal(out[0], e.ntr)),
    ]
    failures += [f for f in (_run_case(env, c) for c in cases) if f]

    # A new buffer in the same process group still works after all of this.
    try:
        round_trip(tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES), rank, num_ranks)
    except Exception as e:  # noqa: BLE001
        failures.append(f"no working Buffer after the lifetime cases: {type(e).__name__}: {e}")
    return failures


# ------------------------------------------------------------------------------------ pytest side
def _assert_no_failures(results: list[list[str]]) -> None:
    lines = [f"rank {rank}: {f}" for rank, failures in enumerate(results) for f in failures]
    assert not lines, f"{len(lines)} validation failure(s):\n" + "\n".join(lines)


# 2 ranks everywhere; 1 rank too where it is cheap (local calls, constructor, lifetime).
DATA_PATH_PARAMS = [(2, table) for table in TABLES] + [(1, "layout"), (1, "state")]


@pytest.mark.parametrize("world_size, table", DATA_PATH_PARAMS)
def test_data_path_validation_cpu(cpu_pool, world_size, table):
    _assert_no_failures(cpu_pool(world_size).run(run_table, table, timeout=TASK_TIMEOUT))


@pytest.mark.parametrize("world_size", [1, 2])
def test_constructor_validation_cpu(cpu_pool, world_size):
    _assert_no_failures(cpu_pool(world_size).run(run_constructor_table, timeout=TASK_TIMEOUT))


@pytest.mark.parametrize("world_size", [1, 2])
def test_lifetime_validation_cpu(cpu_pool, world_size):
    _assert_no_failures(cpu_pool(world_size).run(run_lifetime_table, timeout=TASK_TIMEOUT))


# Host-only rules (no pool). Config's own rules live in tests/unit/test_config.py.
def test_error_classes_catch_as_v1_exceptions():
    assert issubclass(EPInvalidArgument, AssertionError) and issubclass(EPInvalidArgument, ValueError)
    assert issubclass(EPInvalidArgument, RuntimeError) and issubclass(EPInvalidArgument, EPError)
    assert issubclass(EPUnsupported, EPInvalidArgument) and issubclass(EPUnsupported, NotImplementedError)
    assert issubclass(EPStateError, AssertionError) and issubclass(EPStateError, RuntimeError)
    assert not issubclass(EPStateError, ValueError)
    assert issubclass(EPTimeoutError, TimeoutError) and issubclass(EPTimeoutError, EPError)
    # What V1-era except clauses see: a bad argument is caught as AssertionError and as ValueError.
    for family in (AssertionError, ValueError, RuntimeError):
        with pytest.raises(family):
            tritonep.Buffer.set_num_sms(3)
        with pytest.raises(family):
            tritonep.Config(-2)


@pytest.mark.parametrize("value, shown", [(23, "23"), (1, "1"), (0, "0"), (-2, "-2"), (-3, "-3"), (24.0, "24.0"),
                                          ("24", "'24'")])
def test_set_num_sms_rejects(value, shown):
    before = tritonep.Buffer.num_sms
    with pytest.raises(EPInvalidArgument) as info:
        tritonep.Buffer.set_num_sms(value)
    assert type(info.value) is EPInvalidArgument
    message = str(info.value)
    assert "new_num_sms" in message and num(shown).search(message), message
    assert tritonep.Buffer.num_sms == before


def test_set_num_sms_accepts_even_and_configs_follow():
    before = tritonep.Buffer.num_sms
    try:
        tritonep.Buffer.set_num_sms(24)
        assert tritonep.Buffer.num_sms == 24
        assert tritonep.Buffer.get_dispatch_config(2).num_sms == 24
        assert tritonep.Buffer.get_combine_config(8).num_sms == 24
    finally:
        tritonep.Buffer.num_sms = before
