"""Output tensors of a call, handed out again once nothing outside tritonep refers to them.

DeepEP returns new tensors from every call. On an H200 host one `torch.empty` costs 5-7 us of
host time; a layout call makes two and a low-latency dispatch five, and a host-bound call is timed
by its host path. So the outputs of a call geometry come from a small pool instead (the layout's
outputs: 16.3 us fresh, 4.3 us from the pool; `2026-12-02-h200-host-overhead-19f4fdb.json`), and
a set of them goes out again only when nobody else holds any of it:

* no Python reference to any of its tensors (the caller dropped the results), and
* no other tensor or storage object on its memory (the use counts of its storages and the
  reference counts of their Python objects are back at their baselines): views, `detach()`,
  `.data`, dtype views and a kept `untyped_storage()` all raise one of them.

So a caller never sees memory it still holds overwritten, exactly as with fresh tensors; what it
dropped is rewritten in stream order on the stream that writes the new results, just as the
caching allocator hands a freed block to the next allocation on that stream. A set handed out on
one stream and taken again on another first makes the new stream wait for everything queued on
the old one so far (the caching allocator would not hand the block to the other stream at all):
kernels of the old stream still reading the set then finish before the new call writes it.
During CUDA-graph capture the pool allocates fresh (the graph's own memory pool) and keeps nothing:
a graph replays into its captured outputs, which must never be handed to a later eager call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

# Use count of a storage (tensors and Python storage objects on it) without making a new Python
# object: if a torch lacks it, nothing is pooled.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _cuda_capturing() -> bool:
    """Whether the current CUDA stream is being captured (0.2 us; `torch.cuda`'s wrapper adds a
    Python layer)."""
    return torch._C._cuda_isCurrentStreamCapturing()


class AddressedTensors(NamedTuple):
    """Tensors (None allowed) and their addresses, which a launch plan passes in place of the
    tensors once its kernel is compiled (`KernelLaunch.ready`): a set of pooled outputs, or the
    tensors a Buffer keeps for all its calls."""

    tensors: tuple
    addresses: tuple


def addressed(tensors) -> AddressedTensors:
    """`tensors` with their addresses, read now (they must not be reallocated later)."""
    tensors = tuple(tensors)
    return AddressedTensors(tensors, tuple([None if t is None else t.data_ptr() for t in tensors]))


class _Entry:
    """One set of outputs, the reference count it has when nobody holds it, and the stream of the
    call it was last handed to (None on the CPU)."""

    __slots__ = ("outputs", "addresses", "stream", "_objects", "_storage_ids", "_baseline")

    def __init__(self, outputs: list[torch.Tensor | None], stream):
        self.stream = stream
        # The list itself, not a copy: while a copy and the original both lived, every tensor
        # would count one reference more than it does later, and the entry would never be idle.
        self.outputs = outputs
        self.addresses = addressed(outputs).addresses
        tensors = [t for t in outputs if t is not None]
        # Held, so their addresses stay valid; they are part of the baseline count.
        storages = {}
        for t in tensors:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
        # The storages' Python objects are counted too: torch hands out one object per storage, so
        # a caller's `untyped_storage()` is one of these very objects.
        self._objects = tensors + list(storages.values())
        self._storage_ids = [s._cdata for s in storages.values()]
        del tensors, storages, storage, t
        self._baseline = self._count()

    def _count(self) -> int:
        # One sum over every use count and reference count: none of them ever drops below its
        # value at the baseline (the pool's own references stay), so the sum is back at the
        # baseline exactly when each of them is (a third of the time of comparing them one by
        # one, which this runs on every call).
        return sum(map(_storage_use_count, self._storage_ids)) + sum(
            map(sys.getrefcount, self._objects)
        )

    def idle(self) -> bool:
        return self._count() == self._baseline

    def hand_to(self, stream) -> None:
        """Order `stream` after the work queued so far on the stream the set was last handed to,
        when that was another one."""
        if stream is not None and stream.cuda_stream != self.stream.cuda_stream:
            event = torch.cuda.Event()
            event.record(self.stream)
            stream.wait_event(event)
            self.stream = stream


class OutputPool:
    """The outputs of one call geometry: `take(stream)` returns `AddressedTensors` of the list
    that `make()` returns, reused when idle; the `depth` newest sets are kept. `stream` is the
    caller's current stream (None on the CPU). `make` must not hold tensors of the call that
    created the pool."""

    __slots__ = ("_make", "_depth", "_cuda", "_entries", "_last")

    def __init__(self, make: Callable[[], list[torch.Tensor | None]], depth: int, cuda: bool):
        self._make = make
        self._depth = depth
        self._cuda = cuda  # the outputs are CUDA tensors: a graph capture may be under way
        self._entries: list[_Entry] = []
        self._last = 0  # index of the entry handed out last

    def take(self, stream) -> AddressedTensors:
        capturing = self._cuda and _cuda_capturing()
        if not capturing:
            # From the entry handed out last: a loop that drops its results before the next call
            # finds it idle at once, even while an older set stays held (a caller keeping the
            # first call's results would otherwise cost an idle check, ~1 us, on every call).
            entries, start = self._entries, self._last
            for i in range(len(entries)):
                index = (start + i) % len(entries)
                entry = entries[index]
                if entry.idle():
                    entry.hand_to(stream)
                    self._last = index
                    # A new tuple: holding it counts as holding the tensors.
                    return AddressedTensors(tuple(entry.outputs), entry.addresses)
        if capturing or _storage_use_count is None:
            return addressed(self._make())
        if len(self._entries) >= self._depth:
            # Every set is held: the oldest leaves the pool (it stays its holder's, like any
            # fresh tensor), so a caller that keeps some results for good does not leave the
            # pool full of them.
            del self._entries[0]
        entry = _Entry(self._make(), stream)
        self._entries.append(entry)
        self._last = len(self._entries) - 1
        return AddressedTensors(tuple(entry.outputs), entry.addresses)


class OutputPools:
    """Every output pool of one Buffer (outputs on `device`) by call geometry (`key`); `clear()`
    at `destroy()`. `take`'s `stream`: the caller's current stream (None on the CPU).

    At most `max_keys` geometries are kept (the oldest is dropped first): a caller whose token
    count changes every call gets fresh tensors, as it would without pools.
    """

    def __init__(self, device: torch.device, max_keys: int = 32):
        self._pools: dict = {}
        self._cuda = device.type == "cuda"
        self._max_keys = max_keys

    def take(
        self, key, make: Callable[[], list[torch.Tensor | None]], depth: int, stream
    ) -> AddressedTensors:
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= self._max_keys:
                del self._pools[next(iter(self._pools))]
            pool = self._pools[key] = OutputPool(make, depth, self._cuda)
        return pool.take(stream)

    def clear(self) -> None:
        self._pools.clear()
