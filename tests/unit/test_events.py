"""EventHandle / EventOverlap (reference §4), deep_ep aliases (§1.3), import hygiene (§1.2).

CPU tests use no-op handles or a fake handle that counts waits; CUDA tests are marked `gpu`.
"""

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import tritonep
from tritonep import EPInvalidArgument, EPStateError, EventHandle, EventOverlap, _device
from tritonep import event as event_mod
from tritonep.event import previous_handle

# conftest may also skip `gpu` tests; the skipif keeps this file self-contained.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeHandle:
    """Stands in for an EventHandle: counts waits and logs them into a shared order list."""

    def __init__(self, log=None):
        self.waits = 0
        self.log = log if log is not None else []

    def current_stream_wait(self):
        self.waits += 1
        self.log.append("wait")


# ---------------------------------------------------------------- EventHandle (CPU no-op handles)


def test_event_handle_without_cuda_is_noop(monkeypatch):
    monkeypatch.setattr(event_mod, "cuda_available", lambda: False)
    handle = EventHandle()
    assert handle.event is None
    handle.current_stream_wait()  # no-op, no error


def test_event_handle_on_none_stream_is_noop():
    handle = EventHandle._on_stream(None)
    assert isinstance(handle, EventHandle) and handle.event is None
    handle.current_stream_wait()


def test_event_handle_copies_share_the_event():
    handle = EventHandle._on_stream(None)
    handle.event = marker = object()
    assert copy.copy(handle).event is marker
    assert copy.deepcopy(handle).event is marker


def test_tritonep_exports_event_classes_in_all_v1_places():
    assert tritonep.buffer.EventOverlap is tritonep.utils.EventOverlap is EventOverlap
    assert tritonep.buffer.EventHandle is tritonep.utils.EventHandle is EventHandle
    assert tritonep.deep_ep_cpp.EventHandle is EventHandle


# ---------------------------------------------------------------- EventOverlap


def test_defaults():
    ev = EventOverlap()
    assert ev.event is None and ev.extra_tensors is None


def test_with_block_on_none_event_does_nothing():
    ev = EventOverlap()
    with ev as entered:
        assert entered is ev
    assert ev.event is None


def test_current_stream_wait_on_none_raises_state_error():
    ev = EventOverlap()
    with pytest.raises(EPStateError, match="event is None"):
        ev.current_stream_wait()
    # V1 used `assert self.event is not None`: V1-era `except AssertionError` still catches it.
    with pytest.raises(AssertionError):
        ev.current_stream_wait()


def test_current_stream_wait_waits_once_per_call():
    fake = FakeHandle()
    ev = EventOverlap(fake)
    ev.current_stream_wait()
    ev.current_stream_wait()
    assert fake.waits == 2 and ev.event is fake


def test_with_block_waits_at_exit_only():
    fake = FakeHandle()
    ev = EventOverlap(fake)
    with ev:
        assert fake.waits == 0  # overlapped work goes here
    assert fake.waits == 1 and ev.event is fake


def test_with_block_does_not_suppress_exceptions():
    fake = FakeHandle()
    with pytest.raises(KeyError), EventOverlap(fake):
        raise KeyError("inside")
    assert fake.waits == 1


def test_noop_handle_inside_overlap_waits_silently():
    ev = EventOverlap(EventHandle._on_stream(None))
    ev.current_stream_wait()
    with ev:
        pass


def test_hook_runs_once_after_the_wait():
    log = []
    ev = EventOverlap(FakeHandle(log))
    ev.register_hook_after_wait(lambda: log.append("hook"))
    ev.current_stream_wait()
    ev.current_stream_wait()
    assert log == ["wait", "hook", "wait"]


def test_hook_runs_at_with_exit():
    log = []
    ev = EventOverlap(FakeHandle(log))
    ev.register_hook_after_wait(lambda: log.append("hook"))
    with ev:
        log.append("body")
    assert log == ["body", "wait", "hook"]


def test_second_hook_is_rejected_until_the_first_ran():
    ev = EventOverlap(FakeHandle())
    ev.register_hook_after_wait(lambda: None)
    with pytest.raises(EPStateError, match="already registered"):
        ev.register_hook_after_wait(lambda: None)
    ev.current_stream_wait()
    ev.register_hook_after_wait(lambda: None)  # cleared after running


def test_release_handle_clears_event():
    fake = FakeHandle()
    ev = EventOverlap(fake)
    ev.current_stream_wait(release_handle=True)
    assert ev.event is None and fake.waits == 1
    with pytest.raises(EPStateError):
        ev.current_stream_wait()
    with ev:  # released: the with-block is a no-op now
        pass


def test_call_sets_release_flag_for_next_with_block_only():
    first = FakeHandle()
    ev = EventOverlap(first)
    assert ev(release_handle=True) is ev
    with ev(release_handle=True):
        pass
    assert ev.event is None and first.waits == 1
    # The flag was reset at exit: the next plain with-block keeps the event.
    second = FakeHandle()
    ev.event = second
    with ev:
        pass
    assert ev.event is second and second.waits == 1


def test_extra_tensors_are_kept():
    tensors = (torch.ones(3), torch.zeros(2))
    ev = EventOverlap(None, tensors)
    assert ev.extra_tensors is tensors
    with ev:
        pass
    assert ev.extra_tensors is tensors


# ---------------------------------------------------------------- previous_event helpers (§14.5)


def test_previous_handle_accepts_overlap_handle_and_none():
    handle = EventHandle._on_stream(None)
    assert previous_handle(None, "dispatch") is None
    assert previous_handle(EventOverlap(), "dispatch") is None
    assert previous_handle(EventOverlap(handle), "dispatch") is handle
    assert previous_handle(handle, "dispatch") is handle


@pytest.mark.parametrize("bad", [1, "event", FakeHandle()])
def test_previous_handle_rejects_other_types(bad):
    with pytest.raises(
        EPInvalidArgument, match=rf"dispatch: previous_event .* got {type(bad).__name__}"
    ):
        previous_handle(bad, "dispatch")
    with pytest.raises(EPInvalidArgument, match="holding"):
        previous_handle(EventOverlap(bad), "dispatch")


def test_previous_handle_resolves_overlaps_and_handles():
    handle = EventHandle._on_stream(None)
    assert previous_handle(EventOverlap(handle), "combine") is handle
    assert previous_handle(handle, "combine") is handle
    assert previous_handle(None, "combine") is None
    with pytest.raises(EPInvalidArgument, match="combine: previous_event"):
        previous_handle(3.0, "combine")


# ---------------------------------------------------------------- device helpers


def test_is_sm90_compiled_false_without_cuda(monkeypatch):
    monkeypatch.setattr(_device, "cuda_available", lambda: False)
    assert _device.is_sm90_compiled() is False


def test_is_sm90_compiled_false_on_cpu_backend(monkeypatch):
    monkeypatch.setattr(_device, "cuda_available", lambda: True)
    monkeypatch.setenv("TRITONEP_BACKEND", "cpu")
    assert _device.is_sm90_compiled() is False


def test_deep_ep_cpp_surface():
    cpp = tritonep.deep_ep_cpp
    assert cpp.Config is tritonep.Config
    assert cpp.topk_idx_t is tritonep.topk_idx_t
    assert isinstance(cpp.is_sm90_compiled(), bool)
    assert cpp.get_low_latency_rdma_size_hint(128, 4096, 2, 64) == 272_630_400


def test_check_nvlink_connections_is_noop_without_process_group():
    assert tritonep.utils.check_nvlink_connections(None) is None


def test_check_nvlink_connections_single_rank_gloo():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert tritonep.utils.check_nvlink_connections(dist.group.WORLD) is None
    finally:
        dist.destroy_process_group()


def test_missing_peer_access_names_both_devices():
    # Two hosts; on host "a" GPU 1 cannot reach GPU 0 (one direction is enough to fail).
    table = [
        ("a", 0, "u0", {"u1": True}),
        ("a", 1, "u1", {"u0": False}),
        ("b", 0, "v0", {"v1": True}),
        ("b", 1, "v1", {"v0": True}),
    ]
    message = tritonep.utils._missing_peer_access(table)
    assert message is not None
    assert "host a, GPU 1 (rank 1) cannot access GPU 0 (rank 0)" in message


def test_missing_peer_access_ignores_other_hosts_and_unseen_devices():
    table = [
        ("a", 0, "u0", {}),  # per-rank CUDA_VISIBLE_DEVICES: rank 0 sees no other device
        ("a", 0, "u1", {"x": False}),  # an unrelated local device without access
        ("b", 0, "u2", {"u0": False}),  # another host: its reach to "u0" does not matter
    ]
    assert tritonep.utils._missing_peer_access(table) is None


# ---------------------------------------------------------------- as_deep_ep (§1.3)

ALIASES = ("deep_ep", "deep_ep.buffer", "deep_ep.utils", "deep_ep_cpp")


@pytest.fixture
def clean_aliases():
    saved = {name: sys.modules.pop(name, None) for name in ALIASES}
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def test_as_deep_ep_registers_aliases(clean_aliases):
    assert tritonep.as_deep_ep() is tritonep
    assert sys.modules["deep_ep"] is tritonep
    assert sys.modules["deep_ep.buffer"] is tritonep.buffer
    assert sys.modules["deep_ep.utils"] is tritonep.utils
    assert sys.modules["deep_ep_cpp"] is tritonep.deep_ep_cpp
    assert importlib.import_module("deep_ep.utils").EventOverlap is EventOverlap
    from deep_ep import Buffer  # the V1 import form

    assert Buffer is tritonep.Buffer


def test_as_deep_ep_without_cpp(clean_aliases):
    tritonep.as_deep_ep(register_cpp=False)
    assert "deep_ep_cpp" not in sys.modules


def test_as_deep_ep_is_idempotent(clean_aliases):
    tritonep.as_deep_ep()
    before = {name: sys.modules[name] for name in ALIASES}
    assert tritonep.as_deep_ep() is tritonep
    assert {name: sys.modules[name] for name in ALIASES} == before


@pytest.mark.parametrize("occupied", ["deep_ep", "deep_ep_cpp"])
def test_as_deep_ep_refuses_foreign_module_unless_forced(clean_aliases, occupied):
    foreign = type(sys)("real_deep_ep")
    sys.modules[occupied] = foreign
    with pytest.raises(EPStateError, match="force=True"):
        tritonep.as_deep_ep()
    assert sys.modules[occupied] is foreign
    tritonep.as_deep_ep(force=True)
    assert sys.modules["deep_ep"] is tritonep
    assert sys.modules["deep_ep_cpp"] is tritonep.deep_ep_cpp


def test_no_deep_ep_alias_by_default():
    code = "import sys, tritonep; print('deep_ep' in sys.modules or 'deep_ep_cpp' in sys.modules)"
    assert _run_python(code).strip() == "False"


# ---------------------------------------------------------------- import hygiene (§1.2)


def _run_python(code: str) -> str:
    src = os.path.dirname(os.path.dirname(tritonep.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_initialises_no_cuda_and_sets_no_env():
    code = (
        "import json, os, torch\nbefore = dict(os.environ)\nimport tritonep\nafter = "
        "dict(os.environ)\nprint(json.dumps({'cuda': torch.cuda.is_initialized(),\n                "
        "  'changed': sorted(k for k in before.keys() | after.keys()\n                             "
        "       if before.get(k) != after.get(k))}))\n"
    )
    report = json.loads(_run_python(code).strip().splitlines()[-1])
    assert report == {"cuda": False, "changed": []}


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
def test_cuda_event_handle_records_and_waits():
    handle = EventHandle()
    assert isinstance(handle.event, torch.cuda.Event)
    assert copy.copy(handle).event is handle.event
    handle.current_stream_wait()
    handle.event.synchronize()
    assert handle.event.query()


@pytest.mark.gpu
@needs_cuda
def test_cuda_stream_ordering_through_events():
    side = torch.cuda.Stream()
    x = torch.zeros(1 << 20, device="cuda")
    side.wait_stream(torch.cuda.current_stream())  # side stream ordered after the zero-fill
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000)
        x.add_(1)
    ev = EventOverlap(EventHandle._on_stream(side))
    with ev:
        pass  # current stream now waits for `side`
    y = x.sum()  # enqueued on the current stream after the wait
    assert y.item() == x.numel()
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda
def test_cuda_is_sm90_compiled_matches_capability(monkeypatch):
    monkeypatch.delenv("TRITONEP_BACKEND", raising=False)
    assert _device.is_sm90_compiled() == (torch.cuda.get_device_capability() >= (9, 0))
