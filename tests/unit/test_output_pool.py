"""Pooled outputs (`runtime/outputs.py`): reused only when nothing outside the pool holds them."""

import pytest
import torch

from tritonep.runtime.outputs import OutputPools, carve

_PARTS = [((5, 3), torch.bool), ((7,), torch.int32), ((2, 3), torch.int64)]


def _make():
    return carve(torch.device("cpu"), _PARTS)


def _addresses(outputs):
    return [t.data_ptr() for t in outputs]


def test_carve_aligns_and_shapes_every_part():
    outputs = _make()
    assert [tuple(t.shape) for t in outputs] == [shape for shape, _ in _PARTS]
    assert [t.dtype for t in outputs] == [dtype for _, dtype in _PARTS]
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in outputs)
    assert len({t.untyped_storage().data_ptr() for t in outputs}) == 1


def test_dropped_outputs_are_reused_and_held_ones_never():
    pools = OutputPools(torch.device("cpu"))
    first = pools.take("k", _make, 3)
    before = _addresses(first)
    first[1].fill_(7)
    second = pools.take("k", _make, 3)  # `first` is held: a new set
    assert set(_addresses(second)).isdisjoint(before)
    assert torch.equal(first[1], torch.full((7,), 7, dtype=torch.int32))
    del first
    third = pools.take("k", _make, 3)
    assert _addresses(third) == before


@pytest.mark.parametrize(
    "alias",
    [
        lambda outputs: outputs[1][:2],
        lambda outputs: outputs[1].detach(),
        lambda outputs: outputs[1].data,
        lambda outputs: outputs[1].view(torch.float32),
        lambda outputs: outputs[0].untyped_storage(),
        lambda outputs: outputs,  # the returned tuple itself
    ],
    ids=["slice", "detach", "data", "dtype-view", "storage", "tuple"],
)
def test_any_alias_keeps_a_set_out_of_the_pool(alias):
    pools = OutputPools(torch.device("cpu"))
    outputs = pools.take("k", _make, 3)
    before = _addresses(outputs)
    kept = alias(outputs)
    del outputs
    assert set(_addresses(pools.take("k", _make, 3))).isdisjoint(before)
    del kept
    assert _addresses(pools.take("k", _make, 3)) == before


def test_depth_bounds_the_sets_kept():
    pools = OutputPools(torch.device("cpu"))
    held = [pools.take("k", _make, 2) for _ in range(4)]  # 2 pooled, 2 fresh
    addresses = [_addresses(outputs) for outputs in held]
    del held
    again = [pools.take("k", _make, 2) for _ in range(2)]
    assert sorted(_addresses(outputs) for outputs in again) == sorted(addresses[:2])


def test_clear_releases_the_pooled_memory():
    pools = OutputPools(torch.device("cpu"))
    outputs = pools.take("k", _make, 3)
    storage = outputs[0].untyped_storage()
    address = storage.data_ptr()
    del outputs
    uses = torch._C._storage_Use_Count(storage._cdata)
    pools.clear()
    assert torch._C._storage_Use_Count(storage._cdata) < uses  # the pool's views are gone
    assert storage.data_ptr() == address
