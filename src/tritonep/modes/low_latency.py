"""Low-latency mode: decode-time dispatch and combine (reference §13, §14.4), orchestration.

Each call is one launch (`kernels/low_latency/`), or two with `return_recv_hook` (send now, receive
in `hook()`), into fresh outputs, with no host synchronisation: every call is capturable in a
CUDA graph. Calls alternate between two buffer sets (parity p, flipped by every dispatch and
combine); the kernels keep each set's epoch on the device, so graph replays stay correct.

Outstanding results: the hook of call k becomes stale when call k + 2 is issued (D = 2 of spec
§14.4: `send_k, send_k+1, hook_k, hook_k+1` is supported on this rank; calling a stale hook, or a
hook twice, raises `EPStateError`). Across ranks, call k + 2 writes into the set call k's receive
phase reads: a rank must not start call k + 2 before every peer has run hook k, which the V1-safe
order (`send_k, hook_k, send_k+1`) guarantees by itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _env, protocol
from .._validate import check_int, check_tensor, fail
from ..config import get_low_latency_rdma_size_hint
from ..errors import EPStateError
from ..event import EventOverlap
from ..runtime.calls import CheckedCalls
from ..runtime.host import HostBlock
from ..runtime.memory import BufferMemory
from ..runtime.outputs import OutputPools, addressed
from ..runtime.streams import CallStreams, CommStreams

MAX_LL_TOPK = 32  # V1: 11; the kernels take any K, 32 bounds a token's register tile of expert ids


# Experts the arrival counters hold from the start (16 KB in all); calls with more grow them.
_ARRIVAL_EXPERTS = 1024


@dataclass(frozen=True, slots=True)
class _DispatchCall:
    """What the signature of a dispatch call (shapes, dtypes, ints, flags) fixes, once checked:
    its launch plan, its output pool (key and allocator), whether the results are FP8, the token
    count, the handle's geometry (T, H, E) and whether the wait stats are V1's `[R, R]` form."""

    plan: object
    pool_key: tuple
    allocate: Callable
    use_fp8: bool
    num_tokens: int
    geometry: tuple
    wait_row: bool


@dataclass(frozen=True, slots=True)
class _CombineCall:
    """What the signature of a combine call fixes, once checked (as `_DispatchCall`)."""

    plan: object
    pool_key: tuple
    allocate: Callable
    num_tokens: int
    wait_row: bool


def _plain(tensor) -> bool:
    """None or a plain tensor: the arguments a call signature can stand for (subclasses and
    anything else take the full checks every call)."""
    return tensor is None or type(tensor) is torch.Tensor


def _key(tensor):
    """An optional tensor's part of a call signature."""
    return None if tensor is None else (tensor.shape, tensor.dtype)


class LowLatencyMode:
    """The low-latency calls of one Buffer (`ctx`: its `LaunchContext`; `shrink`: enable_shrink)."""

    def __init__(
        self,
        kernels,
        ctx,
        memory: BufferMemory,
        host: HostBlock,
        streams: CommStreams,
        backend: str,
        num_rdma_bytes: int,
        shrink: bool,
        ranks_on_gpu: int,
        outputs: OutputPools,
    ):
        self._kernels = kernels
        self._outputs = outputs
        # Handles a combine checked, by id of their src_info: (weak src_info, weak layout_range,
        # (T, H, E), regions); the next combine given one of them skips the checks.
        self._checked_handles: dict[int, tuple] = {}
        self._ctx = ctx
        self._memory = memory
        self._host = host
        self._streams = streams
        self._num_rdma_bytes = num_rdma_bytes
        self._shrink = shrink
        self._device = ctx.peer_bases.device
        self._num_ranks = ctx.num_ranks
        ll = kernels.low_latency
        self._mask = torch.zeros(ctx.num_ranks, dtype=torch.int32, device=self._device)
        self._workspace = torch.zeros(
            ll.sync.WORKSPACE_SLOTS, dtype=torch.int64, device=self._device
        )
        # Epoch 1, none counted (kernels/low_latency/sync.py): tags above zeroed memory.
        self._workspace[ll.sync.WS_EPOCH.value : ll.sync.WS_EPOCH.value + 2] = 1 << 32
        # The senders' arrival counters (kernels/low_latency), `[2 buffer sets, E]` int32 for
        # dispatch and for combine. Zeroed here, not with each plan: a plan first built while a
        # CUDA graph is captured would otherwise get counters that only the graph's replay zeroes.
        self._arrivals = torch.zeros(
            (2, 2 * _ARRIVAL_EXPERTS), dtype=torch.int32, device=self._device
        )
        self._gpu = backend == "cuda"
        # Programs per launch: in the interpreter as few as possible (they run one after another).
        # On the GPU as many as this rank's share of it holds at once (`resident_program_budget`):
        # a fused launch's receivers spin until every sender has run, so every rank's launch must
        # be resident at once, which a cooperative launch cannot check across processes (132 +
        # 132 programs per rank on a GPU shared by 2 timed out). Every program of a fused launch
        # sends, then receives, so each phase has all of them: senders own tokens (dispatch) or
        # rows (combine), receivers local experts (dispatch) or tokens (combine), each at most
        # one program per item. TRITONEP_LL_PROGRAMS lowers each count.
        self._program_budget = None
        overrides = _env.ll_program_overrides() if self._gpu else {}
        if self._gpu:
            self._program_budget = resident_program_budget(
                torch.cuda.get_device_properties(self._device).multi_processor_count,
                ranks_on_gpu,
                os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
            )
            asked = max(overrides.values(), default=0)
            if asked > self._program_budget:
                warnings.warn(
                    f"tritonep: TRITONEP_LL_PROGRAMS asks for up to {asked} programs per launch, "
                    f"but with {ranks_on_gpu} rank(s) on this GPU a launch holds "
                    f"{self._program_budget} (every rank's launch must be resident at once): "
                    "senders and receivers are capped there",
                    stacklevel=4,
                )
        most = self._program_budget if self._gpu else 2
        programs = dict.fromkeys(_env.LL_PROGRAM_FIELDS, most)
        programs.update(overrides)
        self._dispatch_programs = (programs["dispatch_senders"], programs["dispatch_receivers"])
        self._combine_programs = (programs["combine_senders"], programs["combine_receivers"])
        self._num_warps = 8 if self._gpu else 1
        self._parity = 0
        self._calls = 0
        self._plans: dict = {}
        sync = ll.sync
        self._roles = (sync.ROLE_SEND.value, sync.ROLE_RECV.value, sync.ROLE_BOTH.value)
        # What each call signature fixes, checked once (`_check_dispatch`, `_check_combine`): a
        # decode loop repeats a few signatures, and its calls then skip the checks and the
        # lookups by geometry (tens of microseconds of host time per step otherwise).
        self._dispatch_calls = CheckedCalls(self._device)
        self._combine_calls = CheckedCalls(self._device)

    # ---------------------------------------------------------------------------- geometry
    def _regions(self, op: str, max_tokens: int, hidden: int, num_experts: int):
        key = ("regions", max_tokens, hidden, num_experts)
        regions = self._plans.get(key)
        if regions is not None:
            return regions
        check_int(op, "num_max_dispatch_tokens_per_rank", max_tokens, minimum=1)
        check_int(op, "hidden", hidden, minimum=128)
        if hidden % 128 != 0:
            fail(op, f"hidden must be a multiple of 128, got {hidden}")
        check_int(op, "num_experts", num_experts, minimum=1)
        if num_experts % self._num_ranks != 0:
            fail(
                op,
                f"num_experts must be a multiple of the rank count {self._num_ranks}, got "
                f"{num_experts}",
            )
        regions = self._kernels.low_latency.regions.LowLatencyRegions(
            max_tokens, hidden, num_experts, self._num_ranks
        )
        if regions.num_bytes > self._num_rdma_bytes:
            hint = get_low_latency_rdma_size_hint(max_tokens, hidden, self._num_ranks, num_experts)
            fail(
                op,
                f"num_rdma_bytes={self._num_rdma_bytes} is too small for T={max_tokens}, "
                f"hidden={hidden}, num_experts={num_experts}: it needs {regions.num_bytes} bytes "
                f"(Buffer.get_low_latency_rdma_size_hint gives {hint})",
            )
        self._plans[key] = regions
        return regions

    def _arrivals_for(self, op: str, kind: int, num_experts: int) -> torch.Tensor:
        """Zeroed arrival counters for `2 * num_experts` entries (kind 0: dispatch, 1: combine),
        grown outside of CUDA-graph capture when a call has more experts than they hold."""
        if 2 * num_experts > self._arrivals.size(1):
            if self._gpu and torch.cuda.is_current_stream_capturing():
                raise EPStateError(
                    f"{op}: num_experts={num_experts} is above the {self._arrivals.size(1) // 2} "
                    "experts this buffer's counters hold, and they cannot grow while a CUDA graph "
                    "is captured; make one call with this expert count before capturing"
                )
            # Plans built earlier keep their own (smaller) tensor alive.
            self._arrivals = torch.zeros(
                (2, 2 * num_experts), dtype=torch.int32, device=self._device
            )
        return self._arrivals[kind, : 2 * num_experts]

    def _check_streams(self, op: str, async_finish, return_recv_hook) -> None:
        if async_finish and return_recv_hook:
            fail(op, "async_finish and return_recv_hook cannot both be True")

    def _issue(self, op: str, caller, plan, arguments: tuple, async_finish, return_recv_hook, kept):
        """Launch one call of `plan` with `arguments` (its launch's, after role and stream): the
        fused kernel, or with `return_recv_hook` the send phase now, on the caller's current
        stream `caller` (None on the CPU), and a hook for the receive phase. Every dispatch and
        combine flips the buffer-set parity, the first of `arguments`. Returns (event, hook);
        `kept()` gives the tensors that ride on an async call's event."""
        call_index = self._calls
        self._calls = call_index + 1
        self._parity ^= 1
        send, receive, both = self._roles
        if return_recv_hook:
            plan.launch(send, caller, *arguments)
            if not self._gpu:
                self._host.after_launch(op)
            return EventOverlap(None, None), self._hook(
                op, call_index, lambda: plan.launch(receive, caller, *arguments)
            )
        call = CallStreams(self._streams, None, async_finish, False, caller)
        plan.launch(both, call.launch, *arguments)
        if not self._gpu:
            self._host.after_launch(op)
        return call.finish(kept() if async_finish else (), keep_alive="extra_tensors"), None

    def _hook(self, op: str, call_index: int, launch):
        done = []

        def hook() -> None:
            if done:
                raise EPStateError(f"{op} hook: this hook already ran")
            if self._calls - call_index > 2:
                raise EPStateError(
                    f"{op} hook: stale, {self._calls - call_index - 1} low-latency calls were "
                    "issued after its call and its buffer set is reused from the second one on "
                    "(at most two results outstanding)"
                )
            done.append(True)
            with torch._C.DisableTorchFunction():
                launch()
                self._host.after_launch(op)

        return hook

    def _check_stats(self, op: str, name: str, stats, length: int, dtype: torch.dtype) -> bool:
        """Check an optional stats tensor; True when it is V1's `[R, R]` int64 form, of which the
        calls use this rank's row."""
        if stats is None:
            return False
        check_tensor(op, name, stats, device=self._device, dtypes=(dtype,))
        if stats.dim() == 2 and dtype == torch.int64 and tuple(stats.shape) == (length, length):
            return True
        if stats.dim() != 1 or stats.numel() != length:
            fail(op, f"{name} must have shape [{length}], got {tuple(stats.shape)}")
        return False

    def _grids(self, send_items: int, receive_items: int, programs: tuple[int, int]) -> dict:
        """Programs of each launch: {role: (senders, receivers)}, each at most `programs` and this
        rank's share of the GPU (`resident_program_budget`). A fused launch has
        max(senders, receivers) programs: each sends, then receives. The interpreter runs a
        launch's programs one after another, so its fused launch has one program: with more, the
        first would wait as a receiver for senders that have not run yet."""
        roles = self._kernels.low_latency.sync
        senders, receivers = program_counts(
            send_items, receive_items, programs, self._program_budget
        )
        return {
            roles.ROLE_BOTH.value: (senders, receivers) if self._gpu else (1, 1),
            roles.ROLE_SEND.value: (senders, 0),
            roles.ROLE_RECV.value: (0, receivers),
        }

    # ---------------------------------------------------------------------------- dispatch
    def dispatch(self, op, *arguments):
        """`arguments`: those of `Buffer.low_latency_dispatch`, in its order."""
        x, topk_idx, max_tokens, num_experts, cumulative_stats, wait_stats, *flags = arguments
        use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook = flags
        signature = None
        if (
            type(x) is torch.Tensor
            and type(topk_idx) is torch.Tensor
            and _plain(cumulative_stats)
            and _plain(wait_stats)
        ):
            signature = (
                x.shape,
                x.dtype,
                topk_idx.shape,
                topk_idx.dtype,
                type(max_tokens),
                max_tokens,
                type(num_experts),
                num_experts,
                use_fp8,
                round_scale,
                use_ue8m0,
                async_finish,
                return_recv_hook,
                _key(cumulative_stats),
                _key(wait_stats),
            )
        call = self._dispatch_calls.get(signature, x, topk_idx, cumulative_stats, wait_stats)
        if call is None:
            call = self._check_dispatch(op, signature, arguments)
        if call.wait_row:
            wait_stats = wait_stats[self._ctx.rank]
        caller = self._streams.current() if self._gpu else None
        outputs = self._outputs.take(call.pool_key, call.allocate, 3, caller)
        recv_x, recv_scales, recv_count, src_info, layout_range = outputs.tensors
        event, hook = self._issue(
            op,
            caller,
            call.plan,
            (self._parity, x, topk_idx, call.num_tokens, outputs, cumulative_stats, wait_stats),
            async_finish,
            return_recv_hook,
            lambda: (x, topk_idx, *outputs.tensors, cumulative_stats),
        )
        received = (recv_x, recv_scales) if call.use_fp8 else recv_x
        return received, recv_count, (src_info, layout_range, *call.geometry), event, hook

    def _check_dispatch(self, op, signature, arguments) -> _DispatchCall:
        """Check a dispatch's arguments and return what their signature fixes (cached under it)."""
        x, topk_idx, max_tokens, num_experts, cumulative_stats, wait_stats, *flags = arguments
        use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook = flags
        check_tensor(op, "x", x, device=self._device, dtypes=(torch.bfloat16,), dim=2)
        check_tensor(
            op, "topk_idx", topk_idx, device=self._device, dtypes=(torch.int64, torch.int32), dim=2
        )
        num_tokens, hidden = x.shape
        regions = self._regions(op, max_tokens, hidden, num_experts)
        if num_tokens > max_tokens:
            fail(
                op,
                f"x must have at most num_max_dispatch_tokens_per_rank={max_tokens} rows, got "
                f"{num_tokens}",
            )
        num_topk = topk_idx.size(1)
        if topk_idx.size(0) != num_tokens or not 0 < num_topk <= MAX_LL_TOPK:
            fail(
                op,
                f"topk_idx must have shape [{num_tokens}, K] with 1 <= K <= {MAX_LL_TOPK}, got "
                f"{tuple(topk_idx.shape)}",
            )
        if use_ue8m0 and not round_scale:
            fail(op, "use_ue8m0=True requires round_scale=True")
        self._check_streams(op, async_finish, return_recv_hook)
        num_local = num_experts // self._num_ranks
        self._check_stats(
            op, "cumulative_local_expert_recv_stats", cumulative_stats, num_local, torch.int32
        )
        wait_row = self._check_stats(
            op, "dispatch_wait_recv_cost_stats", wait_stats, self._num_ranks, torch.int64
        )
        use_fp8 = bool(use_fp8)
        round_scale, use_ue8m0 = use_fp8 and bool(round_scale), use_fp8 and bool(use_ue8m0)
        key = (
            "dispatch",
            regions,
            num_topk,
            use_fp8,
            round_scale,
            use_ue8m0,
            cumulative_stats is not None,
            wait_stats is not None,
        )
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._kernels.low_latency.dispatch.DispatchPlan(
                self._memory,
                self._ctx,
                regions,
                num_topk=num_topk,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                grids=self._grids(max_tokens, num_local, self._dispatch_programs),
                shrink=self._shrink,
                has_cumulative=cumulative_stats is not None,
                has_wait_stats=wait_stats is not None,
                num_warps=self._num_warps,
                mask=self._mask,
                workspace=self._workspace,
                arrivals=self._arrivals_for(op, 0, num_experts),
            )
        call = _DispatchCall(
            plan=plan,
            # Plain values only: the pool lookup hashes this key on every call.
            pool_key=("low_latency_dispatch", max_tokens, hidden, num_experts, use_fp8, use_ue8m0),
            allocate=_dispatch_outputs(regions, use_fp8, use_ue8m0, self._device),
            use_fp8=use_fp8,
            num_tokens=num_tokens,
            geometry=(max_tokens, hidden, num_experts),
            wait_row=wait_row,
        )
        self._dispatch_calls.remember(signature, call)
        return call

    # ----------------------------------------------------------------------------- combine
    def _check_handle(self, op: str, handle):
        if type(handle) is tuple and len(handle) == 5:
            # A handle checked before: the very tensors (still alive) and the same ints. Tuples
            # are immutable and a handle's tensors are outputs of this mode, which a loop's
            # pooled outputs hand back call after call.
            known = self._checked_handles.get(id(handle[0]))
            if (
                known is not None
                and known[0]() is handle[0]
                and known[1]() is handle[1]
                and known[2] == handle[2:]
            ):
                return known[3], handle[0], handle[1]
            regions, src_info, layout_range = self._check_new_handle(op, handle)
            if len(self._checked_handles) >= 16:  # forget the oldest (dicts keep insertion order)
                del self._checked_handles[next(iter(self._checked_handles))]
            # Weak references: a strong one would keep pooled outputs from ever being reused.
            self._checked_handles[id(src_info)] = (
                weakref.ref(src_info),
                weakref.ref(layout_range),
                handle[2:],
                regions,
            )
            return regions, src_info, layout_range
        return self._check_new_handle(op, handle)

    def _check_new_handle(self, op: str, handle):
        if not isinstance(handle, (tuple, list)) or len(handle) != 5:
            kind = (
                f"a {type(handle).__name__} of {len(handle)}"
                if isinstance(handle, (tuple, list))
                else type(handle).__name__
            )
            fail(op, f"handle must be the 5-tuple of a low_latency_dispatch, got {kind}")
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        regions = self._regions(op, max_tokens, hidden, num_experts)
        num_local = num_experts // self._num_ranks
        check_tensor(
            op,
            "handle[0] (packed_recv_src_info)",
            src_info,
            device=self._device,
            dtypes=(torch.int32,),
            shape=(num_local, self._num_ranks * max_tokens),
        )
        check_tensor(
            op,
            "handle[1] (packed_recv_layout_range)",
            layout_range,
            device=self._device,
            dtypes=(torch.int64,),
            shape=(num_local, self._num_ranks),
        )
        return regions, src_info, layout_range

    def combine(self, op, *arguments):
        """`arguments`: those of `Buffer.low_latency_combine`, in its order."""
        x, topk_idx, topk_weights, handle, *flags, out, wait_stats = arguments
        use_logfmt, zero_copy, async_finish, return_recv_hook = flags
        _, src_info, layout_range = self._check_handle(op, handle)
        signature = None
        if (
            type(x) is torch.Tensor
            and type(topk_idx) is torch.Tensor
            and type(topk_weights) is torch.Tensor
            and _plain(out)
            and _plain(wait_stats)
        ):
            signature = (
                handle[2:],
                x.shape,
                x.dtype,
                topk_idx.shape,
                topk_idx.dtype,
                topk_weights.shape,
                topk_weights.dtype,
                use_logfmt,
                zero_copy,
                async_finish,
                return_recv_hook,
                _key(out),
                _key(wait_stats),
            )
        call = self._combine_calls.get(signature, x, topk_idx, topk_weights, out, wait_stats)
        if call is None:
            call = self._check_combine(op, signature, arguments)
        if call.wait_row:
            wait_stats = wait_stats[self._ctx.rank]
        caller = self._streams.current() if self._gpu else None
        if out is not None:
            output = addressed((out,))
        else:
            output = self._outputs.take(call.pool_key, call.allocate, 3, caller)
        (combined,) = output.tensors
        event, hook = self._issue(
            op,
            caller,
            call.plan,
            (
                self._parity,
                x,
                topk_idx,
                topk_weights,
                call.num_tokens,
                src_info,
                layout_range,
                output,
                wait_stats,
            ),
            async_finish,
            return_recv_hook,
            lambda: (x, topk_idx, topk_weights, src_info, layout_range, combined),
        )
        return combined, event, hook

    def _check_combine(self, op, signature, arguments) -> _CombineCall:
        """Check a combine's arguments (the handle is checked) and return what their signature
        fixes (cached under it)."""
        x, topk_idx, topk_weights, handle, *flags, out, wait_stats = arguments
        use_logfmt, zero_copy, async_finish, return_recv_hook = flags
        max_tokens, hidden, num_experts = handle[2:]
        regions = self._regions(op, max_tokens, hidden, num_experts)
        num_local = num_experts // self._num_ranks
        check_tensor(
            op,
            "x",
            x,
            device=self._device,
            dtypes=(torch.bfloat16,),
            shape=(num_local, self._num_ranks * max_tokens, hidden),
        )
        check_tensor(
            op, "topk_idx", topk_idx, device=self._device, dtypes=(torch.int64, torch.int32), dim=2
        )
        num_tokens, num_topk = topk_idx.shape
        if num_tokens > max_tokens or not 0 < num_topk <= MAX_LL_TOPK:
            fail(
                op,
                f"topk_idx must have shape [N, K] with N <= {max_tokens} and 1 <= K <= "
                f"{MAX_LL_TOPK}, got {tuple(topk_idx.shape)}",
            )
        check_tensor(
            op,
            "topk_weights",
            topk_weights,
            device=self._device,
            dtypes=(torch.float32,),
            shape=(num_tokens, num_topk),
        )
        if use_logfmt and zero_copy:
            fail(op, "use_logfmt and zero_copy cannot both be True")
        if out is not None:
            check_tensor(
                op,
                "out",
                out,
                device=self._device,
                dtypes=(torch.bfloat16,),
                shape=(num_tokens, hidden),
            )
        wait_row = self._check_stats(
            op, "combine_wait_recv_cost_stats", wait_stats, self._num_ranks, torch.int64
        )
        self._check_streams(op, async_finish, return_recv_hook)
        use_logfmt, zero_copy = bool(use_logfmt), bool(zero_copy)
        key = ("combine", regions, num_topk, use_logfmt, zero_copy, wait_stats is not None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._kernels.low_latency.combine.CombinePlan(
                self._memory,
                self._ctx,
                regions,
                num_topk=num_topk,
                use_logfmt=use_logfmt,
                zero_copy=zero_copy,
                # Senders own rows: up to T from each rank for each of the L local experts.
                grids=self._grids(num_experts * max_tokens, max_tokens, self._combine_programs),
                shrink=self._shrink,
                has_wait_stats=wait_stats is not None,
                num_warps=self._num_warps,
                mask=self._mask,
                workspace=self._workspace,
                arrivals=self._arrivals_for(op, 1, num_experts),
            )
        call = _CombineCall(
            plan=plan,
            pool_key=("low_latency_combine", num_tokens, hidden),
            allocate=_combine_output(num_tokens, hidden, self._device),
            num_tokens=num_tokens,
            wait_row=wait_row,
        )
        self._combine_calls.remember(signature, call)
        return call

    def next_combine_buffer(self, op: str, handle) -> torch.Tensor:
        """bf16 `[L, R*T, H]` view of the send region of the set the next call uses (zero copy)."""
        regions, _, _ = self._check_handle(op, handle)
        num_local = regions.num_experts // self._num_ranks
        start = regions.send(self._parity)
        size = num_local * self._num_ranks * regions.max_tokens * regions.hidden
        view = self._memory.local_view(op, torch.bfloat16, None, start, rdma=True)
        return view[:size].view(num_local, self._num_ranks * regions.max_tokens, regions.hidden)

    # ------------------------------------------------------------------------------- clean
    def clean(self, op: str, max_tokens: int, hidden: int, num_experts: int) -> None:
        regions = self._regions(op, max_tokens, hidden, num_experts)
        plan = self._plans.get("clean")
        if plan is None:
            plan = self._plans["clean"] = self._kernels.low_latency.clean.CleanPlan(
                self._memory, self._ctx, regions.barrier, self._shrink
            )
        plan.launch(self._streams.current() if self._gpu else None, self._mask, self._workspace)
        self._host.after_launch(op)

    # ------------------------------------------------------------------------------- masks
    def update_mask(self, rank_to_mask: int, mask: bool) -> None:
        self._mask[rank_to_mask] = int(mask)

    def query_mask(self, mask_status: torch.Tensor) -> None:
        mask_status.copy_(self._mask.view(mask_status.shape))

    def clean_mask(self) -> None:
        self._mask.zero_()

    def kernel_resources(self) -> list[dict]:
        """Registers and spilled bytes of every LL data kernel compiled so far on this rank, one
        entry per launch plan and role (benchmarks record them: what fits on an SM decides
        whether the launches of ranks sharing a GPU are resident together)."""
        sync = self._kernels.low_latency.sync
        roles = {
            sync.ROLE_BOTH.value: "fused",
            sync.ROLE_SEND.value: "send",
            sync.ROLE_RECV.value: "receive",
        }
        options = {
            "dispatch": ("use_fp8", "round_scale", "use_ue8m0", "cumulative_stats", "wait_stats"),
            "combine": ("use_logfmt", "zero_copy", "wait_stats"),
        }
        return [
            {
                "kernel": key[0],
                "role": roles[role],
                **dict(zip(options[key[0]], key[3:], strict=True)),
                "registers": registers,
                "spilled_bytes": spilled,
            }
            for key, plan in self._plans.items()
            if isinstance(plan, sync.RolePlan)
            for role, (registers, spilled) in plan.resources().items()
        ]


# SMs of its share that a rank on a shared GPU leaves to kernels other than its LL launches.
SHARED_GPU_SPARE_SMS = 2


def resident_program_budget(sms: int, ranks_on_gpu: int, mps_percentage: str | None) -> int:
    """Programs one LL launch of a rank may use so that the launches of every rank sharing its
    GPU are resident together. `sms`: the SM count the device reports to this process, which
    under an MPS client limit (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, as a string) is that limit
    already (33 of an H200's 132 at 25 %).

    A fused launch is cooperative: its receivers spin until senders run, so all its programs must
    be resident at once. The driver checks that for one process, but not across the processes
    that share a GPU under MPS: at DeepEP's shape two ranks of 96 programs at one program per SM
    (the LogFMT combine once took 216 registers) did not fit 132 SMs, and one rank's receivers
    spun until the timeout. So each rank takes its share of the SMs: 1 / `ranks_on_gpu` of the
    GPU, or its MPS client limit if lower, less `SHARED_GPU_SPARE_SMS` when the GPU is shared:
    launches that fill every slot of the GPU together leave none for another kernel of a rank (2
    ranks sharing an H200 with 132-program dispatch launches each timed out; with 128 each they
    did not, 2026-12-02). Taking 25 % of the reported 33 SMs again gave 12 programs per launch
    and a 293 us decode step with 4 ranks (2026-12-03).

    With more than two ranks on the GPU each rank launches one program per SM of its share, not
    `protocol.LL_PROGRAMS_PER_SM`: 4 ranks sharing an H200 at DeepEP's decode shape timed out or
    left outputs unwritten with 60-62 programs per launch each (with and without an MPS limit,
    with and without the cooperative attribute), and passed with 31 and with 16 (checks, 20
    graph replays; 2026-12-03, `...-ll-shared-ep4-*-session19.json`). Two ranks with 128 each,
    more programs in all, pass: the cause is not found, and this is the measured safe size.

    Example: 132 SMs, 4 ranks on the GPU -> 33 - 2 SMs -> 31 programs per launch; the same at
    25 % (33 SMs reported); 2 ranks -> 128; 1 rank -> 264.
    """
    share = 1.0 / max(1, ranks_on_gpu)  # of the reported SMs
    limited = False
    # A value that is not a number: the MPS client refuses it before any launch.
    with contextlib.suppress(TypeError, ValueError):
        fraction = float(mps_percentage) / 100.0
        if 0.0 < fraction < 1.0:
            # The GPU has about sms / fraction SMs, of which this rank's share is sms /
            # (fraction * ranks), at most the sms it may use.
            share, limited = min(1.0, share / fraction), True
    sms_held = int(sms * share)
    if share < 1.0 or limited:
        sms_held -= SHARED_GPU_SPARE_SMS
    per_sm = protocol.LL_PROGRAMS_PER_SM if ranks_on_gpu <= 2 else 1
    return max(2, sms_held * per_sm)


def program_counts(
    send_items: int, receive_items: int, programs: tuple[int, int], budget: int | None
) -> tuple[int, int]:
    """(senders, receivers) of a launch: one program per item at most, at most `programs` (senders,
    receivers) and `budget` (None: no limit) each, at least one each. Example: 128 tokens to send
    and 144 local experts to receive, programs (264, 264), budget 132 -> (128, 132)."""
    most_senders, most_receivers = programs
    if budget is not None:
        most_senders, most_receivers = min(most_senders, budget), min(most_receivers, budget)
    return max(1, min(send_items, most_senders)), max(1, min(receive_items, most_receivers))


# The allocators are built once per geometry: a closure per call cost as much as the pool lookup.
@functools.lru_cache(maxsize=64)
def _dispatch_outputs(regions, use_fp8: bool, use_ue8m0: bool, device: torch.device):
    """The dispatch outputs of one geometry: [recv_x, recv_scales or None, recv_count, src_info,
    layout_range]."""
    num_local = regions.num_experts // regions.num_ranks
    slots, hidden = regions.num_ranks * regions.max_tokens, regions.hidden

    def allocate() -> list:
        recv_x = torch.empty(
            (num_local, slots, hidden),
            dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
            device=device,
        )
        recv_scales = None
        if use_fp8:
            columns = -(-hidden // 512) if use_ue8m0 else hidden // 128
            # Column-major in the last two dims: the transpose of a contiguous [L, columns, R*T].
            recv_scales = torch.empty(
                (num_local, columns, slots),
                dtype=torch.int32 if use_ue8m0 else torch.float32,
                device=device,
            ).transpose(1, 2)
        return [
            recv_x,
            recv_scales,
            torch.empty(num_local, dtype=torch.int32, device=device),
            torch.empty((num_local, slots), dtype=torch.int32, device=device),
            torch.empty((num_local, regions.num_ranks), dtype=torch.int64, device=device),
        ]

    return allocate


@functools.lru_cache(maxsize=64)
def _combine_output(num_tokens: int, hidden: int, device: torch.device):
    def allocate() -> list:
        return [torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)]

    return allocate
