"""Stream and event rules of the high-throughput calls (reference §14.5), with the hand-offs that
cost host time only where the caller's arguments need them.

Spec: the comm stream first waits for `previous_event` (or the caller's current stream), all
kernels run on the comm stream, and then either the caller's stream waits for the comm stream
(`async_finish=False`) or an event recorded on the comm stream is returned.

A hand-off costs host time (event record 5.5-7.3 us, a wait 7.8-14.4 us, measured on H200),
twice per call. When a call is synchronous, has no `previous_event`, and the comm stream holds
nothing that the caller's stream is not already ordered after (the buffer's previous call was a
synchronous one finished on this same stream), running the kernels on the caller's stream is
observably identical: the same work, in the same order relative to everything else. That is the
common case of a training or inference loop, and it then needs no hand-off at all.
"""

from __future__ import annotations

import contextlib

import torch

from .._validate import fail
from ..event import EventHandle, EventOverlap, previous_handle

# Reentrant and stateless: one instance serves every call that allocates on the caller's stream.
_NO_CONTEXT = contextlib.nullcontext()


class CommStreams:
    """The comm stream of one Buffer and the bookkeeping that lets a call skip its hand-offs.

    `comm` is None on the CPU backend, where every call has finished when it returns.
    """

    def __init__(self, device: torch.device | None):
        self.device = device
        if device is None:
            self.comm = None
            return
        self.comm = torch.cuda.Stream(device=device, priority=-1)
        self._to_comm = torch.cuda.Event()
        self._to_compute = torch.cuda.Event()
        self._current_cache: tuple = (None, None)
        # Raw handle of the stream that is ordered after everything on the comm stream, or None.
        self._caught_up_stream = None
        self._skip_allowed = True

    def expose(self) -> torch.cuda.Stream | None:
        """The comm stream, for a caller who asked for it (`Buffer.get_comm_stream`). Whoever holds
        it may enqueue work there that later calls must follow, so calls never skip their
        hand-offs again."""
        self._skip_allowed = False
        self._caught_up_stream = None
        return self.comm

    def current(self) -> torch.cuda.Stream:
        """The caller's current stream; the Stream object is cached per raw handle, because
        building one (`torch.cuda.current_stream()`) costs microseconds on every call."""
        raw = torch._C._cuda_getCurrentRawStream(self.device.index)
        if raw != self._current_cache[0]:
            self._current_cache = (raw, torch.cuda.current_stream(self.device))
        return self._current_cache[1]

    def begin(
        self, op: str, previous_event, async_finish: bool, allocate_on_comm_stream: bool
    ) -> CallStreams:
        previous = previous_handle(previous_event, op)
        if allocate_on_comm_stream and (previous is None or not async_finish):
            fail(op, "allocate_on_comm_stream=True requires a previous_event and async_finish=True")
        return CallStreams(self, previous, async_finish, allocate_on_comm_stream)


class CallStreams:
    """The streams of one call: where to allocate and launch, and how to finish.

    Attributes:
        launch: the stream the call's kernels go to (None on the CPU backend).
        caller: the caller's current stream (None on the CPU backend).
    """

    __slots__ = ("_streams", "caller", "_async", "_allocate_on_comm", "launch")

    def __init__(
        self,
        streams: CommStreams,
        previous: EventHandle | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        caller: torch.cuda.Stream | None = None,
    ):
        """`caller`: the caller's current stream when the call has it already (`streams.current()`
        otherwise)."""
        self._streams = streams
        self._async = async_finish
        self._allocate_on_comm = allocate_on_comm_stream
        comm = streams.comm
        if comm is None:
            self.launch = self.caller = None
            return
        compute = caller if caller is not None else streams.current()
        self.caller = compute
        if (
            previous is None
            and not async_finish
            and streams._caught_up_stream == compute.cuda_stream
        ):
            self.launch = compute  # nothing to hand off (see the module docstring)
            return
        if previous is not None and previous.event is not None:
            comm.wait_event(previous.event)
        else:
            streams._to_comm.record(compute)
            comm.wait_event(streams._to_comm)
        self.launch = comm

    def allocation(self):
        """Context in which output tensors are allocated (the comm stream only when asked)."""
        if self._allocate_on_comm and self.launch is not None:
            return torch.cuda.stream(self.launch)
        return _NO_CONTEXT

    def finish(self, tensors, keep_alive: str = "record_stream") -> EventOverlap:
        """Order the caller after the call (synchronous) or return its event (`async_finish`).

        With `async_finish`, `tensors` stay alive until the event: through `record_stream` on the
        comm stream (high-throughput calls), or as the event's `extra_tensors` (low-latency calls,
        CUDA-graph friendly)."""
        streams = self._streams
        comm = streams.comm
        if comm is None:
            if not self._async:
                return EventOverlap()
            return EventOverlap(
                EventHandle._on_stream(None),
                extra_tensors=tuple(tensors) if keep_alive == "extra_tensors" else None,
            )
        if self._async:
            streams._caught_up_stream = None
            if keep_alive == "extra_tensors":
                return EventOverlap(EventHandle._on_stream(comm), extra_tensors=tuple(tensors))
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(comm)
                    if self._allocate_on_comm:
                        t.record_stream(self.caller)
            return EventOverlap(EventHandle._on_stream(comm))
        if self.launch is comm:
            streams._to_compute.record(comm)
            self.caller.wait_event(streams._to_compute)
        if streams._skip_allowed:
            streams._caught_up_stream = self.caller.cuda_stream
        return EventOverlap()
