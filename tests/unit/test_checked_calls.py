"""`runtime.calls.CheckedCalls`: a remembered signature stands for its checks only while the
tensors are contiguous and on the Buffer's device; None is never remembered; the oldest goes
first."""

import torch

from tritonep.runtime.calls import CheckedCalls


def test_a_remembered_signature_needs_contiguous_tensors_on_the_device():
    calls = CheckedCalls(torch.device("cpu"))
    x = torch.zeros(4, 8)
    signature = (x.shape, x.dtype)
    assert calls.get(signature, x) is None
    calls.remember(signature, "checked")
    assert calls.get(signature, x, None) == "checked"
    assert calls.get(signature, torch.zeros(8, 4).t()) is None  # same shape, strided
    assert calls.get(signature, x.to("meta")) is None  # same shape, another device
    assert calls.get((x.shape, torch.float16), x) is None


def test_none_is_never_remembered_and_the_oldest_goes_first():
    calls = CheckedCalls(torch.device("cpu"), limit=2)
    calls.remember(None, "unchecked")
    assert calls.get(None) is None
    for n in range(3):
        calls.remember(n, f"call {n}")
    assert [calls.get(n) for n in range(3)] == [None, "call 1", "call 2"]
