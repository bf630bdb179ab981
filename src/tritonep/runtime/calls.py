"""Call signatures whose arguments were checked, each with what it fixes (plan, output pool).

A call signature is a hashable tuple of what a call's checks depend on besides its tensors' memory
layout and device: tensor shapes and dtypes, ints (with their types) and flags. A loop repeats a
handful of signatures (one per batch size in a decode loop), so each is checked once; later calls
with it check only that their tensors are contiguous and on the Buffer's device. A signature of
None (an argument that is not a plain tensor) is never remembered: such calls take the full checks
every time, and their errors stay those of the full checks.
"""

from __future__ import annotations

import torch


class CheckedCalls:
    """The checked signatures of one kind of call on one Buffer (tensors on `device`); the
    `limit` newest are kept (the oldest is forgotten first)."""

    __slots__ = ("_calls", "_device", "_limit")

    def __init__(self, device: torch.device, limit: int = 256):
        self._calls: dict = {}
        self._device = device
        self._limit = limit

    def get(self, signature, *tensors):
        """What `signature` fixes, if it was checked and every one of `tensors` (None allowed) is
        contiguous and on the device; else None (the caller runs the full checks)."""
        call = self._calls.get(signature)
        if call is None:
            return None
        device = self._device
        for t in tensors:  # a loop, not all(...): this runs on every call
            if t is not None and not (t.is_contiguous() and t.device == device):
                return None
        return call

    def remember(self, signature, call) -> None:
        if signature is None:
            return
        if len(self._calls) >= self._limit:
            del self._calls[next(iter(self._calls))]  # dicts keep insertion order
        self._calls[signature] = call
