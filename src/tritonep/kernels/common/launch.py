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


def _hooks_active() -> bool:
    """True when a Triton launch hook is registered (triton 3.8 keeps empty `HookChain`s, 3.6
    None)."""
    knobs = triton.knobs.runtime
    return any(
        hook is not None and getattr(hook, "calls", True)
        for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook)
    )


# The raw handle of the current CUDA stream, as Triton's own launcher asks torch for it (absent
# from CPU-only builds of torch, where nothing is launched this way).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class KernelLaunch:
    """`fn` bound to constexprs and launch options; `launch(grid, stream, *runtime_args)`.

    `stream` is a `torch.cuda.Stream` or None (the current stream). `wrap`, if given, turns `fn`
    into what is launched on the JIT path (e.g. NVSHMEM linking, which must also see the first
    compilation).
    """

    __slots__ = ("fn", "_jit", "_constexprs", "_kernel", "_tail", "_compiled")

    def __init__(self, fn, wrap=None, **constexprs_and_options):
        self.fn = fn
        self._jit = wrap(fn) if wrap is not None else fn
        self._constexprs = constexprs_and_options
        self._kernel = None
        self._tail: tuple = ()
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

    def launch(self, grid: tuple, stream, *args) -> None:
        kernel = self._kernel
        if kernel is None or _hooks_active():
            self._launch_jit(grid, stream, args)
            return
        handle = stream.cuda_stream if stream is not None else _raw_stream(_current_device())
        kernel.run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            handle,
            kernel.function,
            kernel.packed_metadata,
            None,
            None,
            None,
            *args,
            *self._tail,
        )

    def _launch_jit(self, grid, stream, args) -> None:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            compiled = self._jit[grid](*args, **self._constexprs)
        if (
            self._compiled
            and self._kernel is None
            and isinstance(compiled, triton.compiler.CompiledKernel)
        ):
            # Remember the compiled kernel and the constexpr values its launcher takes after the
            # runtime arguments (Triton passes every parameter, constexprs included, in order).
            names = self.fn.arg_names
            self._tail = tuple(self._constexprs[name] for name in names[len(args) :])
            self._kernel = compiled
