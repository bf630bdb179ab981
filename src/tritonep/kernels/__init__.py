"""Triton kernels, one module per family. Import through `load_kernels(backend)`, never directly.

The CPU backend runs these very kernels in the Triton interpreter, which must be switched on
(`TRITON_INTERPRET=1`) before any `@triton.jit` decorator runs; `load_kernels` arranges that, and
refuses to mix interpreted and compiled kernels in one process.
"""

from __future__ import annotations

import importlib
import os
import sys

from .. import _env
from ..errors import EPStateError

_MODULES = (
    "common.sync",
    "layout",
    "intranode.notify",
    "intranode.dispatch",
    "intranode.combine",
    "internode.regions",
    "internode.notify",
    "internode.dispatch",
    "internode.combine",
    "low_latency.regions",
    "low_latency.sync",
    "low_latency.dispatch",
    "low_latency.combine",
    "low_latency.clean",
)


def load_kernels(backend: str):
    """Import the kernel modules for `backend` ('cuda' or 'cpu') and return this package."""
    interpreted = _env.interpret_enabled()
    imported = any(f"{__name__}.{m}" in sys.modules for m in _MODULES)
    if backend == "cpu" and not interpreted:
        if imported or "TRITON_INTERPRET" in os.environ:
            # Never overwrite a value the user chose, nor switch after kernels were compiled.
            raise EPStateError(
                "Buffer: the CPU backend runs kernels in the Triton interpreter, which needs "
                "TRITON_INTERPRET=1 before tritonep's kernels are first used; got "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}"
                + (" and kernels already compiled for the GPU in this process" if imported else "")
            )
        if "triton.language" in sys.modules:
            # Triton's own library functions were defined for compilation: interpreted kernels
            # calling them fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
            raise EPStateError(
                "Buffer: the CPU backend runs kernels in the Triton interpreter, but triton was "
                "imported before TRITON_INTERPRET=1 was set; set TRITON_INTERPRET=1 before "
                "importing triton (or anything that imports it)"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    elif backend != "cpu" and interpreted:
        raise EPStateError(
            "Buffer: TRITON_INTERPRET=1 is set, so kernels run in the CPU interpreter; unset it "
            f"to use the {backend!r} backend"
        )
    if backend == "cpu":
        from .common import interpreter

        interpreter.install()
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return sys.modules[__name__]
