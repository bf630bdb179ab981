"""Kernel-only timing from profiler events (`tritonep.bench.kernel_times`, `per_call_time`)."""

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from tritonep.bench import kernel_times, per_call_time


def event(name: str, start: float, us: float, device=DeviceType.CUDA):
    return SimpleNamespace(
        name=name,
        device_type=device,
        device_time_total=us,
        time_range=SimpleNamespace(start=start),
    )


@pytest.mark.unit
def test_kernel_times_keep_gpu_kernels_in_launch_order():
    events = [
        event("tritonep::ll::dispatch()", 30.0, 12.0),
        event("tritonep::ll::combine()", 20.0, 50.0),
        event("tritonep::ll::dispatch()", 10.0, 900.0),
        # A host-side range of the same name: its device total is its kernels', counted twice.
        event("tritonep::ll::dispatch", 5.0, 912.0, device=DeviceType.CPU),
    ]
    assert kernel_times(events, "::dispatch") == [900.0, 12.0]


@pytest.mark.unit
def test_per_call_time_leaves_out_the_first_call():
    # The first call waited for a peer whose profiler started later.
    assert per_call_time([900.0, 10.0, 12.0], 3) == pytest.approx(11e-6)
    # Two kernels per call (send and receive launches): calls are whole pairs.
    assert per_call_time([500.0, 400.0, 10.0, 20.0, 12.0, 18.0], 3) == pytest.approx(30e-6)


@pytest.mark.unit
def test_per_call_time_falls_back_to_the_mean_over_every_launch():
    # 5 launches over 2 calls do not split evenly: the plain mean per call (DeepEP's convention).
    assert per_call_time([1.0, 2.0, 3.0, 4.0, 5.0], 2) == pytest.approx(7.5e-6)
    assert per_call_time([], 3) == 0.0
    assert per_call_time([8.0], 1) == pytest.approx(8e-6)
