"""Events (reference §4): `EventHandle` (a recorded CUDA event), `EventOverlap` (DeepEP's wrapper).

On the CPU backend there are no streams: handles carry `event = None` and every wait is a no-op, so
V1 code that waits on events runs unchanged (the CPU backend finishes its work before returning).

`previous_handle` resolves a `previous_event` argument for the Buffer's stream rules
(reference §14.5).
"""

from collections.abc import Callable
from typing import Any

import torch

from ._device import cuda_available
from .errors import EPInvalidArgument, EPStateError


class EventHandle:
    """A CUDA event recorded on a stream; copies share the same event (as V1's shared_ptr does).

    `EventHandle()` records on the current stream of the current device. Without CUDA it is a no-op
    handle: `event` is None and `current_stream_wait()` does nothing.

    Attributes:
        event: the underlying `torch.cuda.Event`, or None for a CPU no-op handle.
    """

    def __init__(self) -> None:
        self.event: torch.cuda.Event | None = None
        if cuda_available():
            self._record(torch.cuda.current_stream())

    @classmethod
    def _on_stream(cls, stream: torch.cuda.Stream | None) -> "EventHandle":
        """Record a new event on `stream` (e.g. the comm stream); None gives a CPU no-op handle."""
        handle = cls.__new__(cls)
        handle.event = None
        if stream is not None:
            handle._record(stream)
        return handle

    def _record(self, stream: torch.cuda.Stream) -> None:
        # Default flags (no timing, non-blocking, not interprocess) match V1's at::cuda::CUDAEvent.
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event; asynchronous, the host never blocks."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __copy__(self) -> "EventHandle":
        return EventHandle._shared(self.event)

    def __deepcopy__(self, memo: dict) -> "EventHandle":
        # A recorded point in a stream cannot be duplicated; a deep copy shares it too.
        return EventHandle._shared(self.event)

    @classmethod
    def _shared(cls, event: torch.cuda.Event | None) -> "EventHandle":
        handle = cls.__new__(cls)
        handle.event = event
        return handle

    def __repr__(self) -> str:
        return f"EventHandle(event={self.event!r})"


class EventOverlap:
    """DeepEP's event wrapper: wait on the current stream, run an after-wait hook, or use `with`.

    Attributes:
        event: the `EventHandle` to wait for, or None when the call finished synchronously.
        extra_tensors: tensors kept alive as long as this object lives (a CUDA-graph-friendly
            replacement for `Tensor.record_stream`); tritonep never reads them.

    Example:
        ev = buffer.dispatch(..., async_finish=True)[-1]
        with ev:                      # enqueue overlapped work on the current stream here
            y = compute(z)
        # at block exit the current stream waits for the dispatch; `with` on event=None is a no-op
    """

    def __init__(
        self,
        event: EventHandle | None = None,
        extra_tensors: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self._hook: Callable[[], Any] | None = None
        self._release_on_exit = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """Make the current stream wait for `event`; then run the registered hook once.

        Args:
            release_handle: if True, set `event = None` afterwards (drops this object's reference).

        Raises:
            EPStateError: `event` is None (synchronous result, or the handle was released).
        """
        if self.event is None:
            raise EPStateError(
                "EventOverlap.current_stream_wait: event is None (the call finished synchronously "
                "or the handle was released); there is nothing to wait for"
            )
        self.event.current_stream_wait()
        # Take the hook before calling it, so it runs at most once even if it raises.
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, fn: Callable[[], Any]) -> None:
        """Register `fn` to run once, right after the next `current_stream_wait`.

        Raises:
            EPStateError: a hook is already registered.
        """
        if self._hook is not None:
            raise EPStateError(
                "EventOverlap.register_hook_after_wait: a hook is already registered, got another "
                f"one {fn!r}"
            )
        self._hook = fn

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        """Store `release_handle` for the next `with` block: `with ev(release_handle=True): ...`."""
        self._release_on_exit = release_handle
        return self

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            if self.event is not None:
                self.current_stream_wait(release_handle=self._release_on_exit)
        finally:
            self._release_on_exit = False
        # Returning None never suppresses an exception raised inside the block.


def previous_handle(previous_event: Any, op: str) -> EventHandle | None:
    """Resolve a `previous_event` argument to an `EventHandle`, or None when absent.

    Accepts None, an `EventOverlap` (its `event`; None there means absent) or an `EventHandle`
    (tritonep extension). Anything else raises `EPInvalidArgument` prefixed with `op`.
    """
    handle = previous_event.event if isinstance(previous_event, EventOverlap) else previous_event
    if handle is None or isinstance(handle, EventHandle):
        return handle
    raise EPInvalidArgument(
        f"{op}: previous_event must be an EventOverlap, an EventHandle or None, got "
        f"{type(previous_event).__name__}"
        + (f" holding {type(handle).__name__}" if handle is not previous_event else "")
    )
