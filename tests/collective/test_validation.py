"""Every validation rule of the public API, table-driven, on the CPU backend (reference §2).

Each case makes one API call with one bad argument on every rank and expects:
  * exactly the error class the spec names (`EPInvalidArgument`, `EPUnsupported`, `EPStateError`);
  * a message naming the argument and its actual value (§2: "<op>: <arg> must ..., got <value>");
  * an unharmed Buffer: after every case all ranks run a small layout + dispatch + combine round
    trip checked with plain torch (rows are copied exactly; combine returns x times the number of
    destination ranks; the top-k weights come back unchanged).
If a round trip fails on any rank (e.g. a case that should have raised ran a collective with bad
inputs), every rank rebuilds the buffer, so one broken case cannot mask the cases after it.

Tables run inside one pool task per rank (the task loops over the table and returns its failures):
one case plus its round trip costs ~0.3 s in the interpreter with 2 ranks (8 tokens, hidden 64,
one channel). Config's own rules are in tests/unit/test_config.py; rules that need more than 8
ranks (§5.2 rules 4-5 for R > 8) or GPUs (rule 7) are not reachable here.
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

NVL_BYTES = 1 << 20  # too small for hidden 7168 with the default config, also for V1 (§15.3)
NUM_TOKENS, HIDDEN, NUM_TOPK, NUM_EXPERTS = 8, 64, 2, 8
CFG = (2, 4, 16)  # one channel whose 16-row queues hold the whole channel (CPU backend needs it)
TASK_TIMEOUT = 300
BAD, STATE = EPInvalidArgument, EPStateError  # short names for the tables


# --------------------------------------------------------------------------- message matching
def num(value) -> re.Pattern:
    """`value` as a whole token: num(3) matches 'got 3' and '(3,)' but not '32' or '0.3'."""
    return re.compile(r"(?<![\w.])" + re.escape(str(value)) + r"(?!\w|\.\d)")


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
    tail = message[message.find("need") :] if "need" in message else ""
    return any(int(n) > NVL_BYTES for n in re.findall(r"\d+", tail))


@dataclass(frozen=True)
class Case:
    """One call: `call(env)` must raise exactly `exc` with all `needles` in its message.

    `needles` may be a function of env (rank-dependent values). `exc=None`: the call must succeed
    and `check(env, result)` must hold.
    """

    id: str
    call: Callable[[SimpleNamespace], Any]
    exc: type[BaseException] | None
    needles: tuple | Callable[[SimpleNamespace], tuple] = ()
    min_ranks: int = 1
    check: Callable[[SimpleNamespace, Any], bool] | None = None


def _run_case(env: SimpleNamespace | None, case: Case) -> str | None:
    """Run one case on this rank; return a failure description or None."""
    try:
        result = case.call(env)
    except Exception as e:  # noqa: BLE001 - compared with the expected class below
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


# -------------------------------------------------------------------------- rank-side helpers
def make_inputs(rank: int):
    """Row t of rank s is the constant 16*s + t + 1 (exact in bf16); two experts per token."""
    t = torch.arange(NUM_TOKENS)
    x = (t.float() + 1 + 16 * rank).unsqueeze(1).expand(NUM_TOKENS, HIDDEN)
    topk_idx = torch.stack([(t + rank) % NUM_EXPERTS, (3 * t + 1) % NUM_EXPERTS], dim=1)
    topk_idx[::3, 1] = -1
    topk_weights = torch.linspace(0.1, 1.0, NUM_TOKENS * NUM_TOPK).view(NUM_TOKENS, NUM_TOPK)
    return x.to(torch.bfloat16).contiguous(), topk_idx.to(tritonep.topk_idx_t), topk_weights


def round_trip(buffer: tritonep.Buffer, rank: int, num_ranks: int) -> SimpleNamespace:
    """Layout + dispatch + combine with plain-torch checks; returns valid inputs and outputs."""
    config = tritonep.Config(*CFG)
    x, topk_idx, topk_weights = make_inputs(rank)
    ntr, ntn, nte, itr, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    owner = torch.where(topk_idx >= 0, topk_idx // (NUM_EXPERTS // num_ranks), num_ranks).long()
    want_itr = torch.nn.functional.one_hot(owner, num_ranks + 1).amax(1)[:, :num_ranks].bool()
    assert ntn is None
    assert torch.equal(itr, want_itr), f"round trip: is_token_in_rank {itr.tolist()}"
    assert torch.equal(ntr, want_itr.sum(0).int()), f"round trip: num_tokens_per_rank {ntr}"
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
        topk_idx=topk_idx, topk_weights=topk_weights, config=config,
    )  # fmt: skip
    # Rows from source s sit in [prefix[s-1], prefix[s]) and hold 16*s + src + 1.
    prefix, src = handle[0][:, rank].tolist(), handle[3]
    want_rows = torch.empty(src.numel())
    for s in range(num_ranks):
        begin = prefix[s - 1] if s > 0 else 0
        want_rows[begin : prefix[s]] = src[begin : prefix[s]].float() + 1 + 16 * s
    want_x = want_rows.unsqueeze(1).expand(-1, HIDDEN).to(torch.bfloat16)
    assert torch.equal(recv_x, want_x), f"round trip: recv_x {recv_x[:, 0]} != {want_rows}"
    assert sum(counts) == int((recv_idx >= 0).sum()), f"round trip: counts {counts}"
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, config=config)
    want = (x.float() * itr.sum(1, keepdim=True)).to(torch.bfloat16)
    assert torch.equal(combined, want), f"round trip: combined {combined[:, 0]} != {want[:, 0]}"
    want_w = torch.where(topk_idx >= 0, topk_weights, 0.0)
    assert torch.equal(combined_w, want_w), f"round trip: combined_topk_weights {combined_w}"
    return SimpleNamespace(
        buffer=buffer, rank=rank, R=num_ranks, cfg=config, x=x, topk_idx=topk_idx,
        topk_weights=topk_weights, ntr=ntr, itr=itr, nte=nte, handle=tuple(handle),
        recv_x=recv_x, recv_w=recv_w, M=recv_x.size(0),
    )  # fmt: skip


def _all_ok(group, ok: bool) -> bool:
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, ok, group=group)
    return all(flags)


def _try_round_trip(ctx, buffer=None) -> tuple[SimpleNamespace | None, str | None]:
    """(env, None) after a good round trip on `buffer` (default: a new one), else (None, error)."""
    try:
        if buffer is None:
            buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
        return round_trip(buffer, ctx.rank, ctx.world_size), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _fresh_env(ctx, key) -> SimpleNamespace:
    ctx.state[key] = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    return round_trip(ctx.state[key], ctx.rank, ctx.world_size)


def run_table(ctx, table_name: str) -> list[str]:
    """Pool task: every case of `TABLES[table_name]` on this rank, a round trip after each."""
    key = ("test_validation", NVL_BYTES)
    buffer = ctx.state.get(key)
    env = _fresh_env(ctx, key) if buffer is None else round_trip(buffer, ctx.rank, ctx.world_size)
    failures = []
    for case in TABLES[table_name]:
        if ctx.world_size < case.min_ranks:
            continue
        failures.append(_run_case(env, case))
        new_env, error = _try_round_trip(ctx, env.buffer)
        if _all_ok(ctx.group, error is None):
            env = new_env
        else:  # every rank rebuilds together
            failures.append(f"buffer unusable after {case.id}: {error or 'another rank failed'}")
            env = _fresh_env(ctx, key)
    return [f for f in failures if f]


# ------------------------------------------------------------------------------- call builders
def _v(env, value):
    """Table values may be functions of env (tensors exist only inside the worker)."""
    return value(env) if callable(value) else value


def _layout(topk_idx=lambda e: e.topk_idx, num_experts=NUM_EXPERTS, **kw):
    def call(e):
        kw_ = {k: _v(e, v) for k, v in kw.items()}
        return e.buffer.get_dispatch_layout(_v(e, topk_idx), _v(e, num_experts), **kw_)

    return call


def _dispatch(x=lambda e: e.x, **overrides):
    """Non-cached dispatch with valid arguments except `overrides` (None removes one)."""

    def call(e):
        kw = dict(num_tokens_per_rank=e.ntr, is_token_in_rank=e.itr, num_tokens_per_expert=e.nte,
                  topk_idx=e.topk_idx, topk_weights=e.topk_weights, config=e.cfg)  # fmt: skip
        kw.update({k: _v(e, v) for k, v in overrides.items()})
        return e.buffer.dispatch(_v(e, x), **kw)

    return call


def _cached(x=lambda e: e.x, **overrides):
    def call(e):
        kw = dict(handle=e.handle, config=e.cfg)
        kw.update({k: _v(e, v) for k, v in overrides.items()})
        return e.buffer.dispatch(_v(e, x), **kw)

    return call


def _combine(x=lambda e: e.recv_x, **overrides):
    def call(e):
        kw = dict(handle=e.handle, topk_weights=e.recv_w, config=e.cfg)
        kw.update({k: _v(e, v) for k, v in overrides.items()})
        return e.buffer.combine(_v(e, x), **kw)

    return call


def _local(*args, **kw):
    return lambda e: e.buffer.get_local_buffer_tensor(*args, **kw)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every other column of a wider tensor: strides (2 * cols, 2)."""
    wide = torch.zeros((t.size(0), 2 * t.size(1)), dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


def _zeros(*shape, dtype=torch.bfloat16):
    return lambda e: torch.zeros(*(_v(e, s) for s in shape), dtype=dtype)


def _fp8(scales, data=None):
    """An FP8 x tuple of valid data [N, H] and the given scales."""
    data = data or (lambda e: torch.zeros(NUM_TOKENS, HIDDEN, dtype=torch.float8_e4m3fn))
    return lambda e: (_v(e, data), _v(e, scales))


def _scales(rows=NUM_TOKENS, dtype=torch.float32):
    return lambda e: torch.ones(rows, 1, dtype=dtype)


def _ll_handle(e):
    return (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64), NUM_TOKENS,
            128, NUM_EXPERTS)  # fmt: skip


N, H, K = NUM_TOKENS, HIDDEN, NUM_TOPK
X1 = any_of("x[1]", "scales")

# ------------------------------------------------------------------------------------ tables
# fmt: off
LAYOUT_CASES = [  # §8
    Case("layout-topk_idx-float32", _layout(lambda e: e.topk_idx.float()), BAD,
         ("topk_idx", "float32")),
    Case("layout-topk_idx-int16", _layout(lambda e: e.topk_idx.short()), BAD,
         ("topk_idx", "int16")),
    Case("layout-topk_idx-1d", _layout(lambda e: e.topk_idx[:, 0].contiguous()), BAD,
         ("topk_idx", f"({N},)")),
    Case("layout-topk_idx-3d", _layout(lambda e: e.topk_idx.view(2, 4, K)), BAD,
         ("topk_idx", f"(2, 4, {K})")),
    Case("layout-topk_idx-non-contiguous", _layout(lambda e: _non_contiguous(e.topk_idx)), BAD,
         ("topk_idx", "contiguous", f"({2 * K}, 2)")),
    Case("layout-topk_idx-list", _layout(lambda e: e.topk_idx.tolist()), BAD, ("topk_idx", "list")),
    Case("layout-topk_idx-meta-device", _layout(lambda e: e.topk_idx.to("meta")), BAD,
         ("topk_idx", "meta")),
    Case("layout-num_experts-not-divisible", _layout(num_experts=7), BAD, ("num_experts", num(7)),
         min_ranks=2),
    Case("layout-num_experts-zero", _layout(num_experts=0), BAD, ("num_experts", num(0))),
    Case("layout-num_experts-negative", _layout(num_experts=-8), BAD, ("num_experts", num(-8))),
    Case("layout-num_experts-float", _layout(num_experts=8.0), BAD, ("num_experts", "8.0")),
    # §14.5 rules 1-2
    Case("layout-previous_event-str", _layout(previous_event="event"), BAD,
         ("previous_event", "str")),
    Case("layout-allocate_on_comm_stream-alone", _layout(allocate_on_comm_stream=True), BAD,
         ("allocate_on_comm_stream", "previous_event")),
    Case("layout-allocate_on_comm_stream-without-async",
         _layout(previous_event=lambda e: e.buffer.capture(), allocate_on_comm_stream=True), BAD,
         ("allocate_on_comm_stream", "async_finish")),
    Case("layout-allocate_on_comm_stream-valid",
         _layout(previous_event=lambda e: e.buffer.capture(), async_finish=True,
                 allocate_on_comm_stream=True), None,
         check=lambda e, out: all(map(torch.equal, out[:4:2] + out[3:4], (e.ntr, e.nte, e.itr)))),
]

DISPATCH_CASES = [  # §9.1, §9.2
    Case("dispatch-x-1d", _dispatch(lambda e: e.x.view(-1)), BAD, ("x", f"({N * H},)")),
    Case("dispatch-x-3d", _dispatch(lambda e: e.x.view(N, 2, H // 2)), BAD,
         ("x", f"({N}, 2, {H // 2})")),
    Case("dispatch-x-list", _dispatch(lambda e: e.x.tolist()), BAD, ("x", "list")),
    Case("dispatch-x-row-bytes-24", _dispatch(_zeros(N, 12)), BAD, ("x", num(12), "16")),
    Case("dispatch-x-row-bytes-fp32-hidden-6", _dispatch(_zeros(N, 6, dtype=torch.float32)), BAD,
         ("x", num(6), "16")),
    Case("dispatch-x-column-major", _dispatch(lambda e: e.x.t().contiguous().t()), BAD,
         ("x", "stride")),
    Case("dispatch-x-meta-device", _dispatch(lambda e: e.x.to("meta")), BAD, ("x", "meta")),
    # FP8 input tuples
    Case("dispatch-fp8-scales-float16", _dispatch(_fp8(_scales(dtype=torch.float16))), BAD,
         (X1, "float16")),
    Case("dispatch-fp8-scales-int64", _dispatch(_fp8(_scales(dtype=torch.int64))), BAD,
         (X1, "int64")),
    Case("dispatch-fp8-scales-rows", _dispatch(_fp8(_scales(rows=N - 1))), BAD, (X1, num(N - 1))),
    Case("dispatch-fp8-scales-1d", _dispatch(_fp8(lambda e: torch.ones(N))), BAD, (X1, f"({N},)")),
    Case("dispatch-fp8-data-2-byte", _dispatch(_fp8(_scales(), data=lambda e: e.x)), BAD,
         (any_of("x[0]", "data"), "bfloat16")),
    Case("dispatch-x-tuple-of-3", _dispatch(lambda e: (e.x, e.x, e.x)), BAD, ("x", num(3))),
    Case("dispatch-x-tuple-of-1", _dispatch(lambda e: (e.x,)), BAD, ("x", num(1))),
    # count tensors
    Case("dispatch-missing-num_tokens_per_rank", _dispatch(num_tokens_per_rank=None), BAD,
         ("num_tokens_per_rank",)),
    Case("dispatch-missing-is_token_in_rank", _dispatch(is_token_in_rank=None), BAD,
         ("is_token_in_rank",)),
    Case("dispatch-missing-num_tokens_per_expert", _dispatch(num_tokens_per_expert=None), BAD,
         ("num_tokens_per_expert",)),
    Case("dispatch-num_tokens_per_rank-int64",
         _dispatch(num_tokens_per_rank=lambda e: e.ntr.long()), BAD,
         ("num_tokens_per_rank", "int64")),
    Case("dispatch-num_tokens_per_rank-shape",
         _dispatch(num_tokens_per_rank=_zeros(lambda e: e.R + 1, dtype=torch.int32)), BAD,
         lambda e: ("num_tokens_per_rank", f"({e.R + 1},)")),
    Case("dispatch-is_token_in_rank-int32", _dispatch(is_token_in_rank=lambda e: e.itr.int()), BAD,
         ("is_token_in_rank", "int32")),
    Case("dispatch-is_token_in_rank-rows",
         _dispatch(is_token_in_rank=_zeros(N + 1, lambda e: e.R, dtype=torch.bool)), BAD,
         lambda e: ("is_token_in_rank", f"({N + 1}, {e.R})")),
    Case("dispatch-is_token_in_rank-columns",
         _dispatch(is_token_in_rank=_zeros(N, lambda e: e.R + 1, dtype=torch.bool)), BAD,
         lambda e: ("is_token_in_rank", f"({N}, {e.R + 1})")),
    Case("dispatch-is_token_in_rank-non-contiguous",
         _dispatch(is_token_in_rank=lambda e: _non_contiguous(e.itr)), BAD,
         ("is_token_in_rank", "contiguous")),
    Case("dispatch-num_tokens_per_expert-int64",
         _dispatch(num_tokens_per_expert=lambda e: e.nte.long()), BAD,
         ("num_tokens_per_expert", "int64")),
    Case("dispatch-num_tokens_per_expert-2d",
         _dispatch(num_tokens_per_expert=lambda e: e.nte.view(1, -1)), BAD,
         ("num_tokens_per_expert", f"(1, {NUM_EXPERTS})")),
    Case("dispatch-num_tokens_per_expert-not-divisible",
         _dispatch(num_tokens_per_expert=lambda e: e.nte[:7].contiguous()), BAD,
         ("num_tokens_per_expert", num(7)), min_ranks=2),
    Case("dispatch-num_tokens_per_expert-empty",
         _dispatch(num_tokens_per_expert=_zeros(0, dtype=torch.int32)), BAD,
         ("num_tokens_per_expert", num(0))),
    Case("dispatch-num_tokens_per_expert-non-contiguous",
         _dispatch(num_tokens_per_expert=lambda e: _non_contiguous(e.nte.view(1, -1)).view(-1)),
         BAD, ("num_tokens_per_expert", "contiguous")),
    Case("dispatch-num_tokens_per_expert-1025-per-rank",  # E // R <= 1024
         _dispatch(num_tokens_per_expert=_zeros(lambda e: 1025 * e.R, dtype=torch.int32)), BAD,
         ("num_tokens_per_expert", num(1025))),
    # top-k
    Case("dispatch-topk_idx-without-weights", _dispatch(topk_weights=None), BAD,
         ("topk_idx", "topk_weights")),
    Case("dispatch-topk_weights-without-idx", _dispatch(topk_idx=None), BAD,
         ("topk_idx", "topk_weights")),
    Case("dispatch-topk_idx-rows", _dispatch(topk_idx=lambda e: e.topk_idx[:4].contiguous()), BAD,
         ("topk_idx", f"(4, {K})")),
    Case("dispatch-topk_idx-float32", _dispatch(topk_idx=lambda e: e.topk_idx.float()), BAD,
         ("topk_idx", "float32")),
    Case("dispatch-topk_idx-non-contiguous",
         _dispatch(topk_idx=lambda e: _non_contiguous(e.topk_idx)), BAD,
         ("topk_idx", "contiguous")),
    Case("dispatch-topk_weights-shape", _dispatch(topk_weights=_zeros(N, K + 1, dtype=torch.float)),
         BAD, ("topk_weights", f"({N}, {K + 1})")),
    Case("dispatch-topk_weights-bfloat16",
         _dispatch(topk_weights=lambda e: e.topk_weights.bfloat16()), BAD,
         ("topk_weights", "bfloat16")),
    Case("dispatch-topk_weights-non-contiguous",
         _dispatch(topk_weights=lambda e: _non_contiguous(e.topk_weights)), BAD,
         ("topk_weights", "contiguous")),
    # scalars and config
    Case("dispatch-expert_alignment-zero", _dispatch(expert_alignment=0), BAD,
         ("expert_alignment", num(0))),
    Case("dispatch-expert_alignment-negative", _dispatch(expert_alignment=-4), BAD,
         ("expert_alignment", num(-4))),
    Case("dispatch-num_worst_tokens-negative", _dispatch(num_worst_tokens=-1), BAD,
         ("num_worst_tokens", num(-1))),
    Case("dispatch-num_worst_tokens-float", _dispatch(num_worst_tokens=16.0), BAD,
         ("num_worst_tokens", "16.0")),
    Case("dispatch-config-odd-num_sms", _dispatch(config=tritonep.Config(23, 6, 256)), BAD,
         ("num_sms", num(23))),
    Case("dispatch-config-zero-num_sms", _dispatch(config=tritonep.Config(0, 4, 16)), BAD,
         ("num_sms", num(0))),
    Case("dispatch-config-tuple", _dispatch(config=CFG), BAD, ("config", "tuple")),
    # streams and events (§14.5 rule 2)
    Case("dispatch-previous_event-str", _dispatch(previous_event="event"), BAD,
         ("previous_event", "str")),
    Case("dispatch-previous_event-tensor", _dispatch(previous_event=_zeros(1)), BAD,
         ("previous_event", "Tensor")),
    Case("dispatch-allocate_on_comm_stream-alone", _dispatch(allocate_on_comm_stream=True), BAD,
         ("allocate_on_comm_stream", "previous_event")),
    Case("dispatch-allocate_on_comm_stream-without-async",
         _dispatch(allocate_on_comm_stream=True, previous_event=lambda e: e.buffer.capture()), BAD,
         ("allocate_on_comm_stream", "async_finish")),
    # capacity (§15.3): V1's own check fails too (10 channels x R ranks x 256 rows x 14 KiB)
    Case("dispatch-num_nvl_bytes-too-small", _dispatch(_zeros(N, 7168), config=None), BAD,
         ("num_nvl_bytes", num(NVL_BYTES), Pred(_states_bytes_needed, "the bytes needed"))),
]

CACHED_CASES = [  # §9.3
    Case("cached-topk_idx-given", _cached(topk_idx=lambda e: e.topk_idx), BAD,
         ("topk_idx", "handle")),
    Case("cached-topk_weights-given", _cached(topk_weights=lambda e: e.topk_weights), BAD,
         ("topk_weights", "handle")),
    Case("cached-x-token-count", _cached(lambda e: e.x[:5]), BAD, ("x", num(5), num(N))),
    Case("cached-config-num_sms-mismatch", _cached(config=tritonep.Config(6, 4, 16)), BAD,
         ("channels", num(1), num(3))),
    Case("cached-config-odd-num_sms", _cached(config=tritonep.Config(23, 6, 256)), BAD,
         ("num_sms", num(23))),
    Case("cached-handle-5-tuple", _cached(handle=lambda e: e.handle[:5]), BAD, ("handle", num(5))),
    Case("cached-handle-7-tuple", _cached(handle=lambda e: (*e.handle, e.handle[0])), BAD,
         ("handle", num(7))),
    Case("cached-handle-str", _cached(handle="handle"), BAD, ("handle", "str")),
    Case("cached-handle-entry-dtype", _cached(handle=lambda e: (e.handle[0].long(), *e.handle[1:])),
         BAD, (any_of("handle[0]", "rank_prefix_matrix"), "int64")),
    Case("cached-handle-send_head-rows",
         _cached(handle=lambda e: (*e.handle[:5], e.handle[5][:3].contiguous())), BAD,
         lambda e: (any_of("handle[5]", "send_head"), f"(3, {e.R})")),
    Case("cached-previous_event-str", _cached(previous_event="event"), BAD,
         ("previous_event", "str")),
]

COMBINE_CASES = [  # §10
    Case("combine-x-int32", _combine(lambda e: e.recv_x.int()), BAD, ("x", "int32")),
    Case("combine-x-float64", _combine(lambda e: e.recv_x.double()), BAD, ("x", "float64")),
    Case("combine-x-rows", _combine(_zeros(lambda e: e.M + 1, H)), BAD,
         lambda e: ("x", num(e.M + 1))),
    Case("combine-x-1d", _combine(lambda e: e.recv_x.view(-1)), BAD,
         lambda e: ("x", f"({e.M * H},)")),
    Case("combine-x-row-bytes-24", _combine(_zeros(lambda e: e.M, 12)), BAD, ("x", num(12), "16")),
    Case("combine-x-non-contiguous", _combine(lambda e: _non_contiguous(e.recv_x)), BAD,
         ("x", "contiguous")),
    Case("combine-x-meta-device", _combine(lambda e: e.recv_x.to("meta")), BAD, ("x", "meta")),
    Case("combine-topk_weights-rows",
         _combine(topk_weights=_zeros(lambda e: e.M + 1, K, dtype=torch.float)), BAD,
         lambda e: ("topk_weights", f"({e.M + 1}, {K})")),
    Case("combine-topk_weights-1d", _combine(topk_weights=_zeros(lambda e: e.M, dtype=torch.float)),
         BAD, lambda e: ("topk_weights", f"({e.M},)")),
    Case("combine-topk_weights-non-contiguous",
         _combine(topk_weights=lambda e: _non_contiguous(e.recv_w)), BAD,
         ("topk_weights", "contiguous")),
    Case("combine-topk_weights-bfloat16", _combine(topk_weights=lambda e: e.recv_w.bfloat16()), BAD,
         ("topk_weights", "bfloat16")),
    Case("combine-bias-list", _combine(bias=lambda e: [torch.zeros(N, H, dtype=torch.bfloat16)]),
         BAD, ("bias", "list")),
    Case("combine-bias-tuple-of-3",
         _combine(bias=lambda e: (torch.zeros(N, H, dtype=torch.bfloat16),) * 3), BAD,
         ("bias", num(3))),
    Case("combine-bias-rows", _combine(bias=_zeros(N + 1, H)), BAD, ("bias", f"({N + 1}, {H})")),
    Case("combine-bias-hidden", _combine(bias=_zeros(N, 2 * H)), BAD, ("bias", f"({N}, {2 * H})")),
    Case("combine-bias-float32", _combine(bias=_zeros(N, H, dtype=torch.float)), BAD,
         ("bias", "float32")),
    Case("combine-bias-non-contiguous",
         _combine(bias=lambda e: _non_contiguous(torch.zeros(N, H, dtype=torch.bfloat16))), BAD,
         ("bias", "contiguous")),
    Case("combine-bias-pair-second-shape",
         _combine(bias=lambda e: (torch.zeros(N, H, dtype=torch.bfloat16),
                                  torch.zeros(N - 1, H, dtype=torch.bfloat16))), BAD,
         ("bias[1]", f"({N - 1}, {H})")),
    Case("combine-handle-as-list", _combine(handle=lambda e: list(e.handle), topk_weights=None),
         None, check=lambda e, out: torch.equal(
             out[0], (e.x.float() * e.itr.sum(1, keepdim=True)).to(torch.bfloat16))),
    Case("combine-handle-5-tuple", _combine(handle=lambda e: e.handle[:5]), BAD,
         ("handle", num(5))),
    Case("combine-handle-none", _combine(handle=None), BAD, ("handle", "None")),
    Case("combine-handle-entry-shape",
         _combine(handle=lambda e: (*e.handle[:2], e.handle[2][:, :0], *e.handle[3:])), BAD,
         lambda e: (any_of("handle[2]", "recv_channel_prefix_matrix"), f"({e.R}, 0)")),
    Case("combine-config-num_sms-mismatch", _combine(config=tritonep.Config(6, 4, 16)), BAD,
         ("channels", num(1), num(3))),
    Case("combine-config-odd-num_sms", _combine(config=tritonep.Config(23, 6, 256)), BAD,
         ("num_sms", num(23))),
    Case("combine-previous_event-str", _combine(previous_event="event"), BAD,
         ("previous_event", "str")),
    Case("combine-allocate_on_comm_stream-alone", _combine(allocate_on_comm_stream=True), BAD,
         ("allocate_on_comm_stream", "previous_event")),
    Case("combine-allocate_on_comm_stream-without-async",
         _combine(allocate_on_comm_stream=True, previous_event=lambda e: e.buffer.capture()), BAD,
         ("allocate_on_comm_stream", "async_finish")),
]

STATE_CASES = [
    # §13: every low-latency method needs low_latency_mode=True
    Case("ll-clean_low_latency_buffer",
         lambda e: e.buffer.clean_low_latency_buffer(N, 128, NUM_EXPERTS), STATE,
         ("low_latency_mode",)),
    Case("ll-low_latency_dispatch",
         lambda e: e.buffer.low_latency_dispatch(torch.zeros(N, 128, dtype=torch.bfloat16),
                                                 e.topk_idx, N, NUM_EXPERTS, use_fp8=False),
         STATE, ("low_latency_mode",)),
    Case("ll-low_latency_combine",
         lambda e: e.buffer.low_latency_combine(
             torch.zeros(NUM_EXPERTS // e.R, e.R * N, 128, dtype=torch.bfloat16), e.topk_idx,
             e.topk_weights, _ll_handle(e)),
         STATE, ("low_latency_mode",)),
    Case("ll-get_next_low_latency_combine_buffer",
         lambda e: e.buffer.get_next_low_latency_combine_buffer(_ll_handle(e)), STATE,
         ("low_latency_mode",)),
    # §13.5: the mask API needs enable_shrink=True
    Case("mask-update", lambda e: e.buffer.low_latency_update_mask_buffer(0, True), STATE,
         ("enable_shrink",)),
    Case("mask-query",
         lambda e: e.buffer.low_latency_query_mask_buffer(torch.zeros(e.R, dtype=torch.int32)),
         STATE, ("enable_shrink",)),
    Case("mask-clean", lambda e: e.buffer.low_latency_clean_mask_buffer(), STATE,
         ("enable_shrink",)),
    # §11: the internode entry points need more than 8 ranks; the message names the rank count
    Case("internode_dispatch-intranode",
         lambda e: e.buffer.internode_dispatch(e.x, None, e.ntr, None, e.itr, e.nte, config=e.cfg),
         STATE, lambda e: ("internode_dispatch", "8", num(e.R))),
    Case("internode_combine-intranode",
         lambda e: e.buffer.internode_combine(e.recv_x, e.handle, config=e.cfg), STATE,
         lambda e: ("internode_combine", "8", num(e.R))),
    # §5.5: destroy() needs explicitly_destroy=True
    Case("destroy-not-explicit", lambda e: e.buffer.destroy(), STATE, ("explicitly_destroy",)),
    # §7.2 get_local_buffer_tensor (local)
    Case("local-offset-not-multiple-of-itemsize", _local(torch.float32, offset=3), BAD,
         ("offset", num(3))),
    Case("local-offset-negative", _local(torch.float32, offset=-4), BAD, ("offset", num(-4))),
    Case("local-offset-beyond-buffer", _local(torch.uint8, offset=NVL_BYTES + 128), BAD,
         ("offset", num(NVL_BYTES + 128))),
    Case("local-offset-float", _local(torch.float32, offset=4.0), BAD, ("offset", "4.0")),
    Case("local-size-too-large", _local(torch.float32, torch.Size([NVL_BYTES // 4 + 1])), BAD,
         ("size", f"({NVL_BYTES // 4 + 1},)")),
    Case("local-size-too-large-after-offset",
         _local(torch.float32, torch.Size([2, NVL_BYTES // 8]), offset=128), BAD,
         ("size", f"(2, {NVL_BYTES // 8})", num(128))),
    Case("local-dtype-not-a-dtype", _local("float32"), BAD, ("dtype", "float32")),
    # boundaries that must pass: exactly the whole buffer; the 1-D view is clamped after an offset
    Case("local-size-exactly-fits", _local(torch.float32, torch.Size([NVL_BYTES // 4])), None,
         check=lambda e, t: t.shape == (NVL_BYTES // 4,) and t.dtype == torch.float32),
    Case("local-offset-clamps", _local(torch.int32, offset=128), None,
         check=lambda e, t: t.shape == ((NVL_BYTES - 128) // 4,)),
]
# fmt: on

TABLES = {
    "layout": LAYOUT_CASES,
    "dispatch": DISPATCH_CASES,
    "cached": CACHED_CASES,
    "combine": COMBINE_CASES,
    "state": STATE_CASES,
}


# ------------------------------------------------------------------------- constructor (§5.2)
def _ctor_cases(group, rank: int, num_ranks: int) -> list[Case]:
    """Bad constructor calls made on every rank; rule 6 cases pass rank-dependent arguments."""

    def make(group=group, **kw):
        return lambda _e: tritonep.Buffer(group, **kw)

    mb = NVL_BYTES
    # fmt: off
    cases = [
        Case("group-and-comm-none", make(group=None, num_nvl_bytes=mb), BAD,
             ("group", "comm", "None")),
        Case("group-and-comm-none-explicit", make(group=None, num_nvl_bytes=mb, comm=None), BAD,
             ("group", "comm", "None")),
        Case("num_nvl_bytes-not-multiple-of-128", make(num_nvl_bytes=100), BAD,
             ("num_nvl_bytes", num(100), "128")),
        Case("num_nvl_bytes-negative", make(num_nvl_bytes=-128), BAD,
             ("num_nvl_bytes", num(-128))),
        Case("num_nvl_bytes-float", make(num_nvl_bytes=1024.0), BAD, ("num_nvl_bytes", "1024.0")),
        Case("num_nvl_bytes-str", make(num_nvl_bytes="1024"), BAD, ("num_nvl_bytes", "'1024'")),
        Case("num_nvl_bytes-bool", make(num_nvl_bytes=True), BAD, ("num_nvl_bytes", "True")),
        Case("num_rdma_bytes-without-low_latency_mode", make(num_nvl_bytes=mb, num_rdma_bytes=mb),
             BAD, ("num_rdma_bytes", num(mb), "low_latency_mode")),
        Case("num_rdma_bytes-not-multiple-of-128",
             make(num_rdma_bytes=1000, low_latency_mode=True), BAD, ("num_rdma_bytes", num(1000))),
        Case("num_rdma_bytes-negative", make(num_rdma_bytes=-128, low_latency_mode=True), BAD,
             ("num_rdma_bytes", num(-128))),
        Case("num_qps_per_rank-zero-low-latency",
             make(num_rdma_bytes=mb, low_latency_mode=True, num_qps_per_rank=0), BAD,
             ("num_qps_per_rank", num(0))),
    ]
    if num_ranks >= 2:  # rule 6: ranks disagree; every rank must raise
        size = 1024 * (rank + 1)
        cases += [
            Case("rule6-num_nvl_bytes-differ", make(num_nvl_bytes=size), BAD,
                 ("num_nvl_bytes", num(1024), num(2048))),
            Case("rule6-num_rdma_bytes-differ", make(num_rdma_bytes=size, low_latency_mode=True),
                 BAD, ("num_rdma_bytes", num(1024), num(2048))),
            Case("rule6-low_latency_mode-differ",
                 make(num_nvl_bytes=mb, low_latency_mode=rank == 0), BAD,
                 ("low_latency_mode", "True", "False")),
            Case("rule6-enable_shrink-differ", make(num_nvl_bytes=mb, enable_shrink=rank == 1), BAD,
                 ("enable_shrink", "True", "False")),
        ]
    # fmt: on
    return cases


def run_constructor_table(ctx) -> list[str]:
    """Pool task: each bad constructor call, then a new valid Buffer must round-trip."""
    failures = []
    for case in _ctor_cases(ctx.group, ctx.rank, ctx.world_size):
        failures.append(_run_case(None, case))
        _, error = _try_round_trip(ctx)
        if not _all_ok(ctx.group, error is None):
            failures.append(f"no working Buffer after {case.id}: {error or 'another rank failed'}")
    return [f for f in failures if f]


# ------------------------------------------------------------------------ lifetime (§5.5, §9.1)
def run_lifetime_table(ctx) -> list[str]:
    """Pool task: use after destroy, destroy twice, a buffer without NVL memory."""
    rank, num_ranks = ctx.rank, ctx.world_size
    failures = []
    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES, explicitly_destroy=True)
    env = round_trip(buffer, rank, num_ranks)
    buffer.destroy()
    if buffer.runtime is not None:
        failures.append(f"destroy: runtime must be None afterwards, got {buffer.runtime!r}")
    gone = ("destroyed",)
    # fmt: off
    cases = [
        Case("destroyed-dispatch", _dispatch(), STATE, gone),
        Case("destroyed-cached-dispatch", _cached(), STATE, gone),
        Case("destroyed-combine", _combine(), STATE, gone),
        Case("destroyed-get_dispatch_layout", _layout(), STATE, gone),
        Case("destroyed-get_local_buffer_tensor", _local(torch.float32), STATE, gone),
        Case("destroyed-low_latency_dispatch",
             lambda e: e.buffer.low_latency_dispatch(e.x, e.topk_idx, N, NUM_EXPERTS), STATE, gone),
        Case("destroyed-destroy-again", lambda e: e.buffer.destroy(), STATE, gone),
    ]
    failures += [_run_case(env, c) for c in cases]

    # §9.1: HT data calls need num_nvl_bytes > 0 (EPStateError); the local layout still works.
    env.buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=0)
    cases = [
        Case("no-nvl-memory-dispatch", _dispatch(), STATE, ("num_nvl_bytes",)),
        Case("no-nvl-memory-combine", _combine(), STATE, ("num_nvl_bytes",)),
        Case("no-nvl-memory-get_local_buffer_tensor", _local(torch.float32), STATE,
             ("num_nvl_bytes",)),
        Case("no-nvl-memory-layout-works", _layout(), None,
             check=lambda e, out: torch.equal(out[3], e.itr) and torch.equal(out[0], e.ntr)),
    ]
    # fmt: on
    failures += [_run_case(env, c) for c in cases]
    # A new buffer in the same process group still works after all of this.
    _, error = _try_round_trip(ctx)
    if error:
        failures.append(f"no working Buffer after the lifetime cases: {error}")
    return [f for f in failures if f]


# -------------------------------------------------------------------------------- pytest side
def _assert_no_failures(results: list[list[str]]) -> None:
    lines = [f"rank {rank}: {f}" for rank, failures in enumerate(results) for f in failures]
    assert not lines, f"{len(lines)} validation failure(s):\n" + "\n".join(lines)


# 2 ranks for every table; 1 rank too where it is cheap (local calls, constructor, lifetime).
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


# Host-only rules (no pool).
def test_error_classes_catch_as_v1_exceptions():
    for family in (EPError, RuntimeError, ValueError, AssertionError):
        assert issubclass(EPInvalidArgument, family), family
    assert issubclass(EPUnsupported, EPInvalidArgument)
    assert issubclass(EPUnsupported, NotImplementedError)
    assert issubclass(EPStateError, AssertionError) and issubclass(EPStateError, RuntimeError)
    assert not issubclass(EPStateError, ValueError)
    assert issubclass(EPTimeoutError, TimeoutError) and issubclass(EPTimeoutError, EPError)
    # What V1-era except clauses see: a bad argument is caught as AssertionError and ValueError.
    for family in (AssertionError, ValueError, RuntimeError):
        with pytest.raises(family):
            tritonep.Buffer.set_num_sms(3)
        with pytest.raises(family):
            tritonep.Config(-2)


@pytest.mark.parametrize("value", [23, 1, 0, -2, -3, 24.0, "24", None])
def test_set_num_sms_rejects(value):
    """§6.2: odd values (V1), and values <= 0 and non-ints (tritonep) raise EPInvalidArgument."""
    before = tritonep.Buffer.num_sms
    with pytest.raises(EPInvalidArgument) as info:
        tritonep.Buffer.set_num_sms(value)
    message = str(info.value)
    assert type(info.value) is EPInvalidArgument, repr(info.value)
    assert "new_num_sms" in message and num(repr(value)).search(message), message
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


# ------------------------------------------------------------------- expert ids >= num_experts
def bad_expert_id_task(ctx) -> None:
    """An id >= E counts as -1 in the layout and is reported (once) by the buffer's next call."""
    from tritonep import reference

    buffer = tritonep.Buffer(ctx.group, num_nvl_bytes=NVL_BYTES)
    _, topk_idx, _ = make_inputs(ctx.rank)
    bad = topk_idx.clone()
    bad[5, 1] = NUM_EXPERTS + 3
    bad[7, 0] = 100
    got = buffer.get_dispatch_layout(bad, NUM_EXPERTS)[:4]  # no host synchronisation: it returns
    want = reference.layout(bad, NUM_EXPERTS, ctx.world_size, ctx.world_size)
    for g, w in zip(got, want, strict=False):
        assert (g is None and w is None) or torch.equal(g, w), (g, w)
    with pytest.raises(
        EPInvalidArgument,
        match=rf"rank {ctx.rank}: .*topk_idx\[5, 1\] = "
        rf"{NUM_EXPERTS + 3}.*num_experts={NUM_EXPERTS}",
    ):
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    round_trip(buffer, ctx.rank, ctx.world_size)  # reported once; the buffer stays usable


def test_expert_id_beyond_num_experts_is_reported_by_the_next_call_cpu(cpu_pool):
    cpu_pool(2).run(bad_expert_id_task, timeout=TASK_TIMEOUT)
