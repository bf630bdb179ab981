"""The compiled launch path of `KernelLaunch` (kernels/common/launch.py), against a stand-in for
Triton's launcher object: after the first compiled launch, launches call the launcher's C entry
point directly with what the launcher would have passed it, and a launcher with per-call work (a
scratch buffer allocated per launch) is never bypassed."""

import pytest

pytestmark = pytest.mark.unit


class _Launcher:
    """Triton's launcher object in miniature: a Python `__call__` that passes the constant launch
    attributes, the per-call scratch and the arguments (as one tuple) to `self.launch`, the C entry
    point."""

    def __init__(self, scratch_bytes: int = 0):
        self.global_scratch_size = scratch_bytes
        self.profile_scratch_size = 0
        self.entry_calls: list[tuple] = []
        self.object_calls = 0
        self.launch = lambda *entry_args: self.entry_calls.append(entry_args)

    def __call__(self, gx, gy, gz, stream, function, metadata, meta, enter, leave, *args):
        self.object_calls += 1
        scratch = bytearray(self.global_scratch_size) if self.global_scratch_size else None
        constant = (True, False, metadata, meta, enter, leave)
        self.launch(gx, gy, gz, stream, function, *constant, scratch, None, "ann", b"sig", args)


class _Compiled:
    function = 0xF00
    packed_metadata = (8, 1, 0)

    def __init__(self, launcher):
        self.run = launcher


class _Stream:
    cuda_stream = 77


def _compiled_launch(launcher):
    from tritonep.kernels.common.launch import KernelLaunch

    launch = KernelLaunch(lambda: None)
    launch._kernel = _Compiled(launcher)  # as after the first (JIT) launch
    launch._tail = (64,)  # a constexpr the launcher takes after the runtime arguments
    return launch


def test_launches_after_the_first_call_the_entry_point_directly():
    launcher = _Launcher()
    launch = _compiled_launch(launcher)
    launch.run((3,), _Stream(), 1, 2)
    assert launch.direct
    launch.run((5, 2), _Stream(), 10, 20)
    launch.run((6, 1, 4), _Stream(), 11, 21)
    assert launcher.object_calls == 1  # only the first went through the launcher object
    first, second, third = launcher.entry_calls
    constant = (True, False, (8, 1, 0), None, None, None, None, None, "ann", b"sig")
    assert first == (3, 1, 1, 77, 0xF00, *constant, (1, 2, 64))
    assert second == (5, 2, 1, 77, *first[4:-1], (10, 20, 64))
    assert third == (6, 1, 4, 77, *first[4:-1], (11, 21, 64))


def test_a_launcher_with_per_call_work_is_never_bypassed():
    launcher = _Launcher(scratch_bytes=128)
    launch = _compiled_launch(launcher)
    for value in range(3):
        launch.run((2,), _Stream(), value)
    assert not launch.direct
    assert launcher.object_calls == 3
    assert [call[-1] for call in launcher.entry_calls] == [(0, 64), (1, 64), (2, 64)]
    assert all(call[11] is not None for call in launcher.entry_calls)  # a fresh scratch each


class _FlatLauncher(_Launcher):
    """triton 3.6's shape: the arguments go to the entry point one by one, after the metadata."""

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.object_calls += 1
        self.launch(gx, gy, gz, stream, function, True, False, None, None, *args)


def test_an_entry_point_that_takes_the_arguments_one_by_one():
    launcher = _FlatLauncher()
    launch = _compiled_launch(launcher)
    launch.run((2,), _Stream(), 5)
    launch.run((3,), _Stream(), 6)
    assert launch.direct and launcher.object_calls == 1
    constant = (0xF00, True, False, None, None, (8, 1, 0), None, None, None)
    first, second = launcher.entry_calls
    assert first == (2, 1, 1, 77, *constant, 5, 64)
    assert second == (3, 1, 1, 77, *constant, 6, 64)


class _CopyingLauncher(_Launcher):
    """A launcher that hands the entry point copies of the arguments: not bypassed."""

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.object_calls += 1
        self.launch(gx, gy, gz, stream, function, [*args])


def test_an_entry_call_of_another_shape_keeps_the_launcher_object():
    launcher = _CopyingLauncher()
    launch = _compiled_launch(launcher)
    launch.run((2,), _Stream(), 5)
    launch.run((2,), _Stream(), 6)
    assert not launch.direct
    assert launcher.object_calls == 2


def test_choose_gives_addresses_only_to_the_compiled_launcher():
    import torch

    from tritonep.runtime.outputs import addressed

    inputs = (torch.zeros(8), None)
    fixed, outputs = addressed((torch.zeros(4),)), addressed((torch.zeros(2), None))
    launch = _compiled_launch(_Launcher())
    launch._kernel = None  # before the first launch: the JIT, which specialises on tensors
    run, got_inputs, got_fixed, got_outputs = launch.choose(inputs, fixed, outputs)
    assert run == launch.launch_jit
    assert got_inputs is inputs
    assert got_fixed is fixed.tensors and got_outputs is outputs.tensors
    launch._kernel = _Compiled(_Launcher())
    run, got_inputs, got_fixed, got_outputs = launch.choose(inputs, fixed, outputs)
    assert run == launch.run
    assert list(got_inputs) == [inputs[0].data_ptr(), None]
    assert got_fixed == (fixed.tensors[0].data_ptr(),)
    assert got_outputs == (outputs.tensors[0].data_ptr(), None)


def test_choose_sends_an_input_that_is_not_16_byte_aligned_through_the_jit():
    """The compiled kernel assumes the alignment Triton specialised on at its first launch; an
    input off that alignment must make the JIT specialise again instead of reading misaligned."""
    import torch

    from tritonep.runtime.outputs import addressed

    base = torch.zeros(16, dtype=torch.int64)
    assert base.data_ptr() % 16 == 0
    outputs = addressed((torch.zeros(2),))
    launch = _compiled_launch(_Launcher())
    launch._kernel = _Compiled(_Launcher())
    run, got_inputs, got_outputs = launch.choose((base[1:],), outputs)
    assert run == launch.launch_jit
    assert got_inputs[0] is not None and got_inputs[0].data_ptr() % 16 == 8
    assert got_outputs is not None and got_outputs[0] is outputs.tensors[0]
    run, _, _ = launch.choose((base[2:],), outputs)
    assert run == launch.run
