"""The CPU backend's interpreter fast path (`kernels/common/interpreter.py`) is in place and keeps
results: helper calls inside a launch no longer re-patch `triton.language`, and a kernel built of
helpers (ours and Triton's own `tl.sum`) computes the same values as NumPy.

Runs in a fresh interpreter process: the interpreter must be on before triton is imported. If a
Triton upgrade moves the entry points, `install` returns False and this test says so, instead of the
suite silently running twice as slowly.
"""

import os
import subprocess
import sys

CHILD = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
from tritonep.kernels import load_kernels
load_kernels("cpu")
import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from tritonep.kernels.common import interpreter as fast

assert fast.install(), "fast path not installed"
assert getattr(interpreter.InterpretedFunction, "_tritonep_fast_calls", False)

calls = {"n": 0}
original = interpreter._patch_lang
def counting(fn):
    calls["n"] += 1
    return original(fn)
interpreter._patch_lang = counting

@triton.jit
def scaled(x, factor):
    return x * factor

@triton.jit
def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    for _ in range(4):
        x = scaled(x, 2)
    tl.store(out_ptr + offs, x, mask=offs < n)
    tl.store(out_ptr + BLOCK, tl.sum(x, axis=0))

x = torch.arange(10, dtype=torch.int32)
out = torch.zeros(17, dtype=torch.int32)
kernel[(1,)](x, out, 10, BLOCK=16)
expected = np.arange(10) * 16
assert out[:10].tolist() == expected.tolist(), out
assert out[16].item() == int(expected.sum()), out
print("PATCHES", calls["n"])
"""


def test_helper_calls_do_not_repatch_the_language():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONEP_BACKEND")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    patches = int(out.stdout.strip().splitlines()[-1].split()[1])
    # The launch patches once; 4 calls of our helper add none. Triton's `tl.sum` sees `tl.core`,
    # which the launch did not patch: its first call takes the original path (one more patch).
    assert patches <= 2, out.stdout
