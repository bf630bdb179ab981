"""Pooled outputs (`runtime/outputs.py`): reused only when nothing outside the pool holds them."""

import pytest
import torch

from tritonep.runtime import outputs as outputs_module
from tritonep.runtime.outputs import OutputPools

_PARTS = [((5, 3), torch.bool), ((7,), torch.int32), ((2, 3), torch.int64)]


def _make():
    outputs = [torch.empty(shape, dtype=dtype) for shape, dtype in _PARTS]
    return [outputs[0], None, outputs[1], outputs[2]]  # a missing output (None) is allowed


def _addresses(outputs):
    return [t.data_ptr() for t in outputs if t is not None]


def test_addresses_are_those_of_the_tensors():
    pools = OutputPools(torch.device("cpu"))
    for _ in range(2):  # a new set, then the same set from the pool
        taken = pools.take("k", _make, 3, None)
        assert taken.addresses == tuple(
            t.data_ptr() if t is not None else None for t in taken.tensors
        )
        del taken


def test_dropped_outputs_are_reused_and_held_ones_never():
    pools = OutputPools(torch.device("cpu"))
    first = pools.take("k", _make, 3, None).tensors
    before = _addresses(first)
    first[2].fill_(7)
    second = pools.take("k", _make, 3, None).tensors  # `first` is held: a new set
    assert set(_addresses(second)).isdisjoint(before)
    assert torch.equal(first[2], torch.full((7,), 7, dtype=torch.int32))
    del first
    third = pools.take("k", _make, 3, None).tensors
    assert _addresses(third) == before


@pytest.mark.parametrize(
    "alias",
    [
        lambda outputs: outputs[2][:2],
        lambda outputs: outputs[2].detach(),
        lambda outputs: outputs[2].data,
        lambda outputs: outputs[2].view(torch.float32),
        lambda outputs: outputs[3].untyped_storage(),
        lambda outputs: outputs,  # the returned tuple itself
    ],
    ids=["slice", "detach", "data", "dtype-view", "storage", "tuple"],
)
def test_any_alias_keeps_a_set_out_of_the_pool(alias):
    pools = OutputPools(torch.device("cpu"))
    outputs = pools.take("k", _make, 3, None).tensors
    before = _addresses(outputs)
    kept = alias(outputs)
    del outputs
    assert set(_addresses(pools.take("k", _make, 3, None).tensors)).isdisjoint(before)
    del kept
    # Both sets are idle now: taking two (held) hands out both, the first set among them.
    again = [pools.take("k", _make, 3, None).tensors for _ in range(2)]
    assert before in [_addresses(outputs) for outputs in again]


def test_a_held_old_set_does_not_slow_the_loop(monkeypatch):
    """A caller that keeps the first call's results: later calls reuse the set handed out last,
    whose results the loop dropped, checking it first."""
    pools = OutputPools(torch.device("cpu"))
    kept = pools.take("k", _make, 3, None).tensors
    looped = _addresses(pools.take("k", _make, 3, None).tensors)
    checked = []
    idle = outputs_module._Entry.idle
    monkeypatch.setattr(
        outputs_module._Entry, "idle", lambda entry: checked.append(entry) or idle(entry)
    )
    for _ in range(3):
        assert _addresses(pools.take("k", _make, 3, None).tensors) == looped
    assert checked == [pools._pools["k"]._entries[1]] * 3  # never the held first set
    del kept


def test_the_newest_sets_are_kept():
    pools = OutputPools(torch.device("cpu"))
    held = [
        pools.take("k", _make, 2, None).tensors for _ in range(4)
    ]  # sets 0 and 1 leave the pool
    addresses = [_addresses(outputs) for outputs in held]
    del held
    again = [pools.take("k", _make, 2, None).tensors for _ in range(2)]
    assert sorted(_addresses(outputs) for outputs in again) == sorted(addresses[2:])


def test_clear_releases_the_pooled_memory():
    pools = OutputPools(torch.device("cpu"))
    outputs = pools.take("k", _make, 3, None).tensors
    storage = outputs[0].untyped_storage()
    address = storage.data_ptr()
    del outputs
    uses = torch._C._storage_Use_Count(storage._cdata)
    pools.clear()
    assert torch._C._storage_Use_Count(storage._cdata) < uses  # the pool's views are gone
    assert storage.data_ptr() == address


class _FakeStream:
    """What `_Entry.hand_to` uses of a CUDA stream: its handle and `wait_event`."""

    def __init__(self, handle: int):
        self.cuda_stream = handle
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


class _FakeEvent:
    def record(self, stream):
        self.recorded_on = stream


def test_a_set_taken_on_another_stream_waits_for_the_old_one(monkeypatch):
    """A dropped set goes to a call on another stream only behind an event of the stream it was
    last handed to (kernels there may still read it); on the same stream it goes as it is."""
    monkeypatch.setattr(outputs_module.torch.cuda, "Event", _FakeEvent)
    pools = OutputPools(torch.device("cpu"))
    a, b = _FakeStream(1), _FakeStream(2)
    before = _addresses(pools.take("k", _make, 3, a).tensors)
    taken = pools.take("k", _make, 3, a).tensors  # dropped, same stream: no wait
    assert _addresses(taken) == before and a.waited == []
    del taken
    assert _addresses(pools.take("k", _make, 3, b).tensors) == before
    assert [event.recorded_on for event in b.waited] == [a]
    pools.take("k", _make, 3, b)  # now b's: no second wait
    assert len(b.waited) == 1 and a.waited == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_set_reused_on_another_stream_is_not_overwritten_under_a_reader():
    pools = OutputPools(torch.device("cuda"))
    a, b = torch.cuda.Stream(), torch.cuda.Stream()

    def make():
        return [torch.ones(1 << 20, device="cuda")]

    with torch.cuda.stream(a):
        (first,) = pools.take("k", make, 3, a).tensors
        address = first.data_ptr()
        torch.cuda._sleep(100_000_000)  # stream a reads the set well after the next call
        seen = first * 1
    del first
    with torch.cuda.stream(b):
        (second,) = pools.take("k", make, 3, b).tensors
        assert second.data_ptr() == address  # the dropped set, reused
        second.fill_(2.0)
    torch.cuda.synchronize()
    assert torch.equal(seen, torch.ones_like(seen)), "stream b overwrote the set under a reader"
