"""Launching compiled kernels without Triton's per-call Python work.

`JITFunction.__getitem__(grid)(...)` re-derives the specialisation of every argument, reads
several environment-backed knobs and looks the kernel up on each call: about 15-20 us of host time
per launch (measured on H200, triton 3.6), more than the layout kernel's 4 us on the GPU, and paid
on every dispatch and combine. `fast(kernel)[grid](*args, **constexprs)` does the same launch with
a cache keyed on exactly what Triton specialises on (tensor dtype and 16-byte alignment; integer
width, `== 1` and divisibility by 16), compiling through Triton on a miss and afterwards calling the
compiled kernel's launcher directly.

Falls back to the ordinary launch in the interpreter and whenever Triton launch hooks are set
(e.g. a Triton profiler), so nothing is hidden from such tools.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .. import _env


def pow2(value: int) -> int:
    """Smallest power of two >= max(value, 1): host-side `triton.next_power_of_2` without its
    constexpr-unwrapping wrapper (a few microseconds per call in triton 3.6)."""
    return 1 << max(0, value - 1).bit_length()


def _specialization(args) -> tuple:
    """What Triton's specialisation can depend on, per runtime argument: tensor dtype and 16-byte
    alignment; integer `== 1`, divisibility by 16 and width. One comprehension, no call per argument:
    dispatch passes ~30 arguments, and this key is built on every launch."""
    return tuple([
        (a & 15 == 0, a == 1, -0x80000000 <= a < 0x80000000) if type(a) is int
        else (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor)
        else type(a)
        for a in args
    ])


def _hooks_active() -> bool:
    """True when a Triton launch hook is registered (triton 3.8 keeps empty `HookChain`s, 3.6 None)."""
    knobs = triton.knobs.runtime
    return any(
        hook is not None and getattr(hook, "calls", True)
        for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook)
    )


class FastKernel:
    """Drop-in for `jit_fn[grid](*args, **kwargs)`: positional runtime args, keyword constexprs and
    options, plus `stream=` (a `torch.cuda.Stream`, default the current one) to launch on."""

    def __init__(self, fn):
        self.fn = fn
        self._cache: dict = {}
        self._names = getattr(fn, "arg_names", ())
        self._compiled = isinstance(fn, triton.runtime.jit.JITFunction) and not _env.interpret_enabled()

    def __getitem__(self, grid):
        return lambda *args, stream=None, **kwargs: self._launch(grid, stream, args, kwargs)

    def _launch(self, grid, stream, args, kwargs):
        if not self._compiled or _hooks_active():
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return self.fn[grid](*args, **kwargs)
        key = (_specialization(args), tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            tail = tuple(kwargs[name] for name in self._names[len(args):])
            entry = self._cache[key] = (kernel, tail)
        kernel, tail = entry
        grid = tuple(grid) + (1,) * (3 - len(grid))
        handle = stream.cuda_stream if stream is not None else _raw_stream(_device())
        kernel.run(grid[0], grid[1], grid[2], handle, kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *tail)


# The raw handle of the current CUDA stream: what Triton's own launcher asks torch for (absent
# from CPU-only builds of torch, where nothing is launched this way).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_device = getattr(torch._C, "_cuda_getDevice", None)

_fast: dict = {}


def fast(kernel):
    """The `FastKernel` wrapping `kernel` (in the interpreter, or for a stand-in, it only forwards)."""
    wrapper = _fast.get(id(kernel))
    if wrapper is None or wrapper.fn is not kernel:
        wrapper = _fast[id(kernel)] = FastKernel(kernel)
    return wrapper
