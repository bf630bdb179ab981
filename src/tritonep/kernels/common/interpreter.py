"""The CPU backend's Triton interpreter, minus one repeated cost: re-patching `triton.language` on
every device-function call.

Triton's interpreter maps `tl.load`, `tl.where` and the rest onto NumPy by patching the language
module when a launch starts, and restores it when the launch ends. It patches again on every call
of a `@triton.jit` helper inside the kernel: one `inspect.getmembers` walk per module per call,
with nothing left to patch, since the launch already did it. In tritonep's kernels, which are made
of small helpers, that walk took 12 of 29 s of interpreted time in a 2-rank intranode check
(cProfile, triton 3.8). `install` skips it while a launch is running and the helper sees the same
language modules as the launch (any other helper still takes the original path), and memoises the
NumPy dtype lookup, which rebuilt a table on every call. Kernels, semantics and results do not
change; only where the time goes.

Installed by `load_kernels` for the CPU backend; a Triton whose interpreter lacks the expected
entry points is left as it is.
"""

from __future__ import annotations

import threading

_state = threading.local()


def _launch_depth() -> int:
    return getattr(_state, "depth", 0)


def install() -> bool:
    """Patch the interpreter once per process; True when the fast path is in place."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    grid_executor = getattr(interpreter, "GridExecutor", None)
    function = getattr(interpreter, "InterpretedFunction", None)
    if grid_executor is None or function is None or not hasattr(function, "rewrite"):
        return False
    if getattr(function, "_tritonep_fast_calls", False):
        return True
    import triton.language as tl

    language_modules: dict[int, frozenset] = {}

    def modules_of(fn) -> frozenset:
        """The language modules (`tl`, `tl.core`) in fn's globals: the ones a patch touches."""
        key = id(fn)
        found = language_modules.get(key)
        if found is None:
            found = language_modules[key] = frozenset(
                id(v) for v in fn.__globals__.values() if v is tl or v is tl.core
            )
        return found

    run_grid = grid_executor.__call__
    call_helper = function.__call__

    def grid_call(self, *args, **kwargs):
        depth = _launch_depth()
        if depth == 0:
            _state.patched = set(modules_of(self.fn))  # what the launch itself patches
        _state.depth = depth + 1
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            _state.depth = depth

    def helper_call(self, *args, **kwargs):
        modules = modules_of(self.fn)
        if _launch_depth() == 0 or not modules <= _state.patched:
            # First helper of this launch to see a module (Triton's own library functions see
            # `tl.core`): the original path patches it, and Triton never restores a helper's
            # patch, so it stays in place for the rest of the launch.
            result = call_helper(self, *args, **kwargs)
            if _launch_depth() > 0:
                _state.patched |= modules
            return result
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    grid_executor.__call__ = grid_call
    function.__call__ = helper_call
    function._tritonep_fast_calls = True
    _memoize_np_dtype(interpreter, tl)
    return True


def _memoize_np_dtype(interpreter, tl) -> None:
    """`_get_np_dtype` builds a 19-entry dict of NumPy dtypes on every call (tens of thousands of
    calls per launch); remember its answer per scalar dtype instead."""
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None:
        return
    pointer = original(tl.pointer_type(tl.int8))
    by_scalar: dict = {}

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):
            return pointer
        found = by_scalar.get(scalar)
        if found is None:
            found = by_scalar[scalar] = original(scalar)
        return found

    interpreter._get_np_dtype = np_dtype
