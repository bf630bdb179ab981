"""Profiler-visible kernel names (reference §16).

Triton names a kernel after its Python function. A function named with an Itanium-mangled symbol
(`_ZN8tritonep9intranode8dispatchEv`) keeps that symbol in the PTX, and the profiler demangles it
to `tritonep::intranode::dispatch()`: that is how `dispatch`, `combine` and `notify` each appear in
exactly one profiler row, namespace-qualified as DeepEP harnesses expect.
"""

import triton

from ... import _env


def mangled_name(*parts: str) -> str:
    """`mangled_name("tritonep", "ll", "dispatch")` -> `_ZN8tritonep2ll8dispatchEv`."""
    return "_ZN" + "".join(f"{len(p)}{p}" for p in parts) + "Ev"


def named_kernel(namespace: str, name: str, **jit_kwargs):
    """`@triton.jit`, but the kernel's symbol is `tritonep::<namespace>::<name>()`."""

    def wrap(fn):
        # The interpreter re-executes the function's source and looks it up by its own name, and
        # profiler names do not exist there: keep the Python name when interpreting.
        if not _env.interpret_enabled():
            fn.__name__ = fn.__qualname__ = mangled_name("tritonep", namespace, name)
        return triton.jit(fn, **jit_kwargs)

    return wrap
