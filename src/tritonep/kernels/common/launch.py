"""Launch plans: compiled kernels launched without Triton's per-call Python work.

`JITFunction.__getitem__(grid)(...)` re-derives the specialisation of every argument, reads
environment-backed knobs and looks the kernel up on each call: 10.6 us of host time per launch
(15.9 under a default device; measured on H200 with triton 3.6), against 4.9 us for the compiled
kernel's own launcher. A collective call launches two kernels, and a low-latency decode step
has a budget of tens of microseconds in all, so that difference matters.

`KernelLaunch(fn, **constexprs)` binds a kernel to its constexprs and launch options. The first
call compiles it for the specialisation of the arguments it is given; every later call goes
straight to the compiled launcher. The caller owns the contract that makes this safe: one
`KernelLaunch` per geometry (a launch plan), whose arguments keep what Triton specialises on —
tensor dtypes, pointer alignment (every address tritonep passes is 16-byte aligned: checked at
the boundary), integer width, and `== 1` / divisibility by 16 of integers not listed in the
kernel's `do_not_specialize`.

Below the compiled launcher there is little left to take. On the H200 host (a VM),
`benchmarks/host_overhead.py` times an empty kernel at 9.0 us through this launcher and 6.3 us
through `cuLaunchKernel` itself (ctypes, prebuilt parameter block), and a torch `fill_` of 256
floats at 9.7 us (`2026-12-02-h200-host-overhead-19f4fdb.json`). A launch layer of our own on the
driver (026ba41) added ctypes argument conversion and a parameter fill per call and did not win
back that gap, so it was removed (ecc863a).

The compiled launcher asks each tensor argument for its `data_ptr()` and the driver for that
pointer's attributes (about 0.6 us per tensor on that host: the LL dispatch's 12 tensors cost 19.5
us per launch, their addresses as ints 12.1). So once `ready()`, plans pass addresses: those of
tensors that outlive the call (the buffer's own memory, pooled outputs, bound once as `fixed`) and
those of the caller's tensors, read per call (`choose`). The compiled launcher takes an int for a
pointer as it is. The JIT path (the first call, the interpreter, an input whose alignment differs
from what the kernel was compiled for) needs the tensors themselves: it specialises on them.

Triton's launcher object is itself a Python layer over its C entry point (`launcher.launch`):
scratch allocation, profiler checks and closures on every call, 0.9 us on a fast host. Where that
layer has nothing to do for a kernel (no global or profile scratch, no sanitizer), the first
compiled launch records the call it makes to the C entry point, and later launches call it
directly with the recorded constant part. The record is used only if it has a known shape (grid,
stream, function first; the arguments last, untouched, as one tuple (triton 3.8) or one by one
(3.6)); otherwise every launch keeps going through the launcher object, as before.

In the interpreter (CPU backend), and whenever a Triton launch hook is set (e.g. a Triton
profiler), it launches through the JIT as usual, so nothing is hidden from such tools.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ... import _env


def pow2(value: int) -> int:
    """Smallest power of two >= max(value, 1): host-side `triton.next_power_of_2` without its
    constexpr-unwrapping wrapper (a few microseconds per call in triton 3.6)."""
    return 1 << max(0, value - 1).bit_length()


_runtime_knobs = triton.knobs.runtime


def _hooks_active() -> bool:
    """True when a Triton launch hook is registered (triton 3.8 keeps empty `HookChain`s, 3.6
    None)."""
    enter, leave = _runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook
    return (enter is not None and bool(getattr(enter, "calls", True))) or (
        leave is not None and bool(getattr(leave, "calls", True))
    )


# `KernelLaunch._direct` of a launcher whose C entry point cannot be called directly.
_NO_DIRECT = ()


# The raw handle of the current CUDA stream, as Triton's own launcher asks torch for it (absent
# from CPU-only builds of torch, where nothing is launched this way).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def _same(passed: tuple, expected: tuple) -> bool:
    """The very objects, in order (tensors do not compare with `==`)."""
    return len(passed) == len(expected) and all(
        a is b for a, b in zip(passed, expected, strict=True)
    )


class KernelLaunch:
    """`fn` bound to constexprs and launch options; `launch(grid, stream, *runtime_args)`.

    `stream` is a `torch.cuda.Stream` or None (the current stream). `wrap`, if given, turns `fn`
    into what is launched on the JIT path (e.g. NVSHMEM linking, which must also see the first
    compilation). `fixed`, if given, holds the runtime arguments that end every launch's list (a
    plan's own tensors and ints, as `tensors` for the JIT and `addresses` once compiled, like
    `runtime.outputs.AddressedTensors`): a launch passes only the arguments before them.
    """

    __slots__ = ("fn", "_jit", "_fixed", "_constexprs", "_kernel", "_tail", "_compiled", "_direct")

    def __init__(self, fn, wrap=None, fixed=None, **constexprs_and_options):
        self.fn = fn
        self._jit = wrap(fn) if wrap is not None else fn
        self._fixed = fixed
        self._constexprs = constexprs_and_options
        self._kernel = None
        self._tail: tuple = ()
        # (C entry point, its constant arguments, whether the arguments go as one tuple) once
        # learnt, `_NO_DIRECT` if unusable.
        self._direct: tuple | None = None
        self._compiled = (
            isinstance(fn, triton.runtime.jit.JITFunction) and not _env.interpret_enabled()
        )

    @property
    def resources(self) -> tuple[int, int] | None:
        """(registers per thread, spilled bytes) of the compiled kernel; None before its first
        launch or in the interpreter. The build on the machine at hand: ptxas versions differ."""
        if self._kernel is None:
            return None
        return self._kernel.n_regs, self._kernel.n_spills

    def ready(self) -> bool:
        """Whether a launch now goes straight to the compiled launcher: then pointer arguments may
        be addresses (`run`); otherwise they must be tensors (`launch`)."""
        return self._kernel is not None and not _hooks_active()

    def choose(self, inputs: tuple, *sets) -> tuple:
        """(launch function, then `inputs` and each of `sets` as it takes them): `run` and their
        addresses once `ready()`, else the JIT and their tensors (it specialises on tensors).

        `inputs` are the caller's tensors (None allowed), their addresses read here, only when
        they are used; `sets` are the plan's own `runtime.outputs.AddressedTensors`. The compiled
        kernel assumes what Triton specialised on at its first launch, 16-byte aligned pointers
        among it: a call with an input that is not aligned goes through the JIT, which specialises
        on it (tritonep's own memory always is)."""
        if self.ready():
            addresses = [None if t is None else t.data_ptr() for t in inputs]
            for address in addresses:
                if address is not None and address & 15:
                    break
            else:
                return (self.run, addresses, *[s.addresses for s in sets])
        return (self.launch_jit, inputs, *[s.tensors for s in sets])

    def launch(self, grid: tuple, stream, *args) -> None:
        """Launch `args` (tensors for pointers) on `stream`, through the JIT when not `ready()`."""
        if self._kernel is None or _hooks_active():
            self._launch_jit(grid, stream, args)
            return
        self.run(grid, stream, *args)

    def launch_jit(self, grid: tuple, stream, *args) -> None:
        """Launch `args` (tensors for pointers) on `stream` through the JIT."""
        self._launch_jit(grid, stream, args)

    @property
    def direct(self) -> bool:
        """Whether launches call Triton's C entry point directly (see the module docstring)."""
        return bool(self._direct)

    def run(self, grid: tuple, stream, *args) -> None:
        """Launch through the compiled launcher; only when `ready()`. Pointers may be addresses."""
        handle = stream.cuda_stream if stream is not None else _raw_stream(_current_device())
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        direct = self._direct
        if direct:
            # The recorded constant part starts with the function handle.
            entry, constant, packed = direct
            if packed:
                entry(grid[0], grid_y, grid_z, handle, *constant, (*args, *self._tail))
            else:
                entry(grid[0], grid_y, grid_z, handle, *constant, *args, *self._tail)
        elif direct is None:
            self._run_and_learn(grid[0], grid_y, grid_z, handle, args)
        else:
            self._through_launcher(grid[0], grid_y, grid_z, handle, (*args, *self._tail))

    def _through_launcher(self, grid_x, grid_y, grid_z, handle, full: tuple) -> None:
        """Launch through Triton's launcher object (`full`: the arguments, constexprs included)."""
        kernel = self._kernel
        kernel.run(
            grid_x,
            grid_y,
            grid_z,
            handle,
            kernel.function,
            kernel.packed_metadata,
            None,
            None,
            None,
            *full,
        )

    def _run_and_learn(self, grid_x: int, grid_y: int, grid_z: int, handle: int, args) -> None:
        """The first compiled launch: through the launcher object, recording its call to the C
        entry point when the launcher has no per-call work for this kernel."""
        kernel = self._kernel
        launcher = kernel.run
        entry = getattr(launcher, "launch", None)
        calls = []
        learn = (
            entry is not None
            and getattr(launcher, "global_scratch_size", 1) == 0
            and getattr(launcher, "profile_scratch_size", 1) == 0
            and not getattr(launcher, "gsan_enabled", False)
            and getattr(launcher, "_tvmffi_host_launch", None) is None
        )
        if learn:

            def record(*entry_args, **entry_kwargs):
                calls.append((entry_args, entry_kwargs))
                return entry(*entry_args, **entry_kwargs)

            try:
                launcher.launch = record
            except AttributeError:
                learn = False
        full = (*args, *self._tail)
        try:
            self._through_launcher(grid_x, grid_y, grid_z, handle, full)
        finally:
            if learn:
                launcher.launch = entry
        self._direct = _NO_DIRECT
        if len(calls) != 1 or calls[0][1]:
            return
        entry_args = calls[0][0]
        if entry_args[:5] != (grid_x, grid_y, grid_z, handle, kernel.function):
            return
        # The arguments go as one tuple at the end (triton 3.8) or one by one at the end (3.6).
        last, flat_start = entry_args[-1], len(entry_args) - len(full)
        if isinstance(last, tuple) and _same(last, full):
            self._direct = (entry, entry_args[4:-1], True)
        elif flat_start >= 5 and _same(entry_args[flat_start:], full):
            self._direct = (entry, entry_args[4:flat_start], False)

    def _launch_jit(self, grid, stream, args) -> None:
        fixed = self._fixed
        if fixed is not None:
            args = (*args, *fixed.tensors)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            compiled = self._jit[grid](*args, **self._constexprs)
        if (
            self._compiled
            and self._kernel is None
            and isinstance(compiled, triton.compiler.CompiledKernel)
        ):
            # Remember the compiled kernel and what its launcher takes after a launch's own
            # arguments: the fixed ones (as addresses), then the constexpr values (Triton passes
            # every parameter, constexprs included, in order).
            names = self.fn.arg_names
            constexprs = tuple(self._constexprs[name] for name in names[len(args) :])
            self._tail = (*fixed.addresses, *constexprs) if fixed is not None else constexprs
            self._kernel = compiled
