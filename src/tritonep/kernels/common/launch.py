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

Even the compiled launcher costs 8-11 us per launch on the H200 host (a Python layer that
allocates scratch space, then a C layer that checks every pointer with the driver), against
2-3 us for `cuLaunchKernel` itself. So once a kernel is compiled, a plan whose kernel has the plain
ABI (one CTA per cluster, no PDL launch, no scratch space, scalar parameters) is launched
through the driver directly (`_DriverLaunch`): its parameters are read from the kernel's
own PTX entry, so the layout cannot drift from the Triton version at hand (3.6 and 3.8 both pass
the runtime arguments, then two scratch pointers). Any other kernel keeps Triton's launcher.

In the interpreter (CPU backend), and whenever a Triton launch hook is set (e.g. a Triton
profiler), it launches through the JIT as usual, so nothing is hidden from such tools.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import struct
import threading

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


# A parameter of a PTX kernel entry: `.param .u64 .ptr .global .align 1 name_param_0`,
# `.param .u32 name_param_3`; arrays (`.b8 name[128]`, e.g. TMA descriptors) are not scalars.
_PTX_ENTRY = re.compile(r"\.entry\s+[\w$]+\s*\((.*?)\)", re.S)
_PTX_SCALAR = re.compile(r"^\s*\.param\s+(?:\.align\s+\d+\s+)?\.([bsuf])(\d+)\b[^\[]*$")
# Triton signature type -> (PTX kind, bits) of its parameter; "*" marks a pointer.
_SCALAR_ABI = {
    "i8": ("bsu", 8), "u8": ("bsu", 8), "i16": ("bsu", 16), "u16": ("bsu", 16),
    "i32": ("bsu", 32), "u32": ("bsu", 32), "i64": ("bsu", 64), "u64": ("bsu", 64),
    "fp32": ("f", 32), "fp64": ("f", 64),
}  # fmt: skip
# Largest dynamic shared memory a plain `cuLaunchKernel` may request on sm_90.
_MAX_PLAIN_SHARED = 228 * 1024


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _f64_bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


_libcuda_handle = None


def _libcuda():
    """The driver library (ctypes), or None where it cannot be loaded."""
    global _libcuda_handle
    if _libcuda_handle is None:
        _libcuda_handle = False
        for name in ("libcuda.so.1", "libcuda.so"):
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.cuLaunchKernel.argtypes = (
                [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
            )
            lib.cuLaunchKernel.restype = ctypes.c_int
            # The same without `extra`: every program resident at once (Triton's cooperative grid).
            lib.cuLaunchCooperativeKernel.argtypes = (
                [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 2
            )
            lib.cuLaunchCooperativeKernel.restype = ctypes.c_int
            lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            _libcuda_handle = lib
            break
    return _libcuda_handle or None


def plain_abi(kernel, num_args: int) -> tuple[list[str], int] | None:
    """How `_DriverLaunch` fills the parameters of a compiled `kernel` called with `num_args`
    runtime arguments (constexprs after them): one Python expression per runtime parameter and
    the kernel's parameter count. None when the kernel is not a plain launch (clusters, PDL
    launch, scratch space, TMA descriptors, types without a fill)."""
    meta = kernel.metadata
    src = getattr(kernel, "src", None)
    ptx = kernel.asm.get("ptx") if hasattr(kernel, "asm") else None
    if (
        not isinstance(ptx, str)
        or not hasattr(src, "signature")
        or getattr(meta, "num_ctas", 1) != 1
        or getattr(meta, "launch_pdl", False)
        or getattr(meta, "global_scratch_size", 0)
        or getattr(meta, "profile_scratch_size", 0)
        or getattr(meta, "tensordesc_meta", None)
        or "gsan" in str(getattr(meta, "instrumentation_mode", ""))
        or meta.shared > _MAX_PLAIN_SHARED
    ):
        return None
    entry = _PTX_ENTRY.search(ptx)
    if entry is None:
        return None
    params = []
    for text in entry.group(1).split(","):
        scalar = _PTX_SCALAR.match(text)
        if scalar is None:
            return None
        params.append((scalar.group(1), int(scalar.group(2))))
    fields = []
    for position, kind in enumerate(list(src.signature.values())[:num_args]):
        if kind == "constexpr":
            continue
        if len(fields) >= len(params) or not isinstance(kind, str):
            return None
        ptx_kind, bits = params[len(fields)]
        if kind.startswith("*"):
            if ptx_kind not in "bu" or bits != 64:
                return None
            fields.append(f"args[{position}].data_ptr()")
            continue
        abi = _SCALAR_ABI.get(kind)
        if abi is None or ptx_kind not in abi[0] or bits != abi[1]:
            return None
        if kind == "fp32":
            fields.append(f"f32(args[{position}])")
        elif kind == "fp64":
            fields.append(f"f64(args[{position}])")
        else:
            fields.append(f"args[{position}]")
    # What follows the runtime arguments: Triton's global and profile scratch pointers.
    extra = params[len(fields) :]
    if len(extra) > 2 or any(bits != 64 for _, bits in extra):
        return None
    return fields, len(params)


def make_fill(fields: list[str], name: str):
    """`fill(slots, args)`: writes the runtime arguments into their parameter slots with one
    slice assignment (the cheapest fill Python has); `fields` come from `plain_abi`."""
    code = f"def fill(slots, args):\n    slots[0:{len(fields)}] = ({', '.join(fields)},)\n"
    namespace = {"f32": _f32_bits, "f64": _f64_bits}
    exec(compile(code, f"<tritonep launch of {name}>", "exec"), namespace)
    return namespace["fill"]


class _DriverLaunch:
    """`cuLaunchKernel` (`cuLaunchCooperativeKernel` for a cooperative grid) of one compiled
    kernel, its parameter block built once.

    Every parameter lives in an 8-byte slot of one array (little-endian: a 4-byte parameter reads
    the low half); `kernelParams` points at the slots, and the slots past the runtime arguments
    (Triton's scratch pointers) stay zero. Per call, one generated function writes the runtime
    arguments into their slots (`data_ptr()` of tensors, integers as they are, floats as their
    bits). The driver copies the parameters during the call, which runs with the GIL released:
    a lock keeps two threads launching the same plan from interleaving.
    """

    __slots__ = ("_lib", "_function", "_name", "_block", "_shared", "_slots", "_params", "_fill",
                 "_lock", "_cooperative")  # fmt: skip

    def __init__(self, lib, kernel, fill, num_params: int):
        self._lib = lib
        self._function = kernel.function
        self._name = kernel.name
        self._block = 32 * kernel.metadata.num_warps
        self._shared = kernel.metadata.shared
        self._slots = (ctypes.c_uint64 * num_params)()
        base = ctypes.addressof(self._slots)
        self._params = (ctypes.c_void_p * num_params)(*(base + 8 * i for i in range(num_params)))
        self._fill = fill
        self._lock = threading.Lock()
        self._cooperative = bool(getattr(kernel.metadata, "launch_cooperative_grid", False))

    @classmethod
    def build(cls, kernel, num_args: int) -> _DriverLaunch | None:
        """A driver launch of the loaded `kernel`, or None (see `plain_abi`)."""
        lib = _libcuda()
        abi = plain_abi(kernel, num_args)
        if lib is None or abi is None or kernel.function is None:
            return None
        fields, num_params = abi
        return cls(lib, kernel, make_fill(fields, kernel.name), num_params)

    def __call__(self, grid: tuple, stream_handle: int, args: tuple) -> None:
        grid_x = grid[0]
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        if grid_x * grid_y * grid_z == 0:
            return
        with self._lock:
            self._fill(self._slots, args)
            if self._cooperative:
                result = self._lib.cuLaunchCooperativeKernel(
                    self._function, grid_x, grid_y, grid_z, self._block, 1, 1, self._shared,
                    stream_handle, self._params,
                )  # fmt: skip
            else:
                result = self._lib.cuLaunchKernel(
                    self._function, grid_x, grid_y, grid_z, self._block, 1, 1, self._shared,
                    stream_handle, self._params, None,
                )  # fmt: skip
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            what = "cuLaunchCooperativeKernel" if self._cooperative else "cuLaunchKernel"
            raise RuntimeError(
                f"{what} of {self._name} (grid {grid}, {self._block} threads, "
                f"{self._shared} B shared) failed: {(name.value or b'?').decode()} ({result})"
            )


class KernelLaunch:
    """`fn` bound to constexprs and launch options; `launch(grid, stream, *runtime_args)`.

    `stream` is a `torch.cuda.Stream` or None (the current stream). `wrap`, if given, turns `fn`
    into what is launched on the JIT path (e.g. NVSHMEM linking, which must also see the first
    compilation).
    """

    __slots__ = ("fn", "_jit", "_constexprs", "_kernel", "_tail", "_compiled", "_driver")

    def __init__(self, fn, wrap=None, **constexprs_and_options):
        self.fn = fn
        self._jit = wrap(fn) if wrap is not None else fn
        self._constexprs = constexprs_and_options
        self._kernel = None
        self._driver: _DriverLaunch | None = None
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
        if self._driver is not None:
            self._driver(grid, handle, args)
            return
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
            if _env.driver_launch():
                self._driver = _DriverLaunch.build(compiled, len(args))
