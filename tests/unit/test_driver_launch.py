"""The driver launch path of launch plans (kernels/common/launch.py): the parameter layout read
from a kernel compiled for sm_90, and the slots one call writes."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from tritonep.kernels.common.launch import make_fill

_COMPILE = r"""
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonep.kernels.common.launch import plain_abi


@triton.jit
def probe(out_ptr, maybe_ptr, n, big, scale, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    value = (tl.load(maybe_ptr + offs) * scale).to(tl.int32) + n + big
    tl.store(out_ptr + offs, value, mask=offs < n)


def compile(signature):
    source = ASTSource(fn=probe, signature=signature, constexprs={"BLOCK": 64}, attrs={})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


plain = compile(
    {"out_ptr": "*i32", "maybe_ptr": "*fp32", "n": "i32", "big": "i64", "scale": "fp32",
     "BLOCK": "constexpr"}
)
print(json.dumps(plain_abi(plain, 5)))
"""


@pytest.mark.aot
def test_plain_abi_follows_the_compiled_parameters(tmp_path):
    # Triton compiles only kernels defined in a file, and not under TRITON_INTERPRET.
    script = tmp_path / "probe_kernel.py"
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    fields, num_params = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert fields == [
        "args[0].data_ptr()",
        "args[1].data_ptr()",
        "args[2]",
        "args[3]",
        "f32(args[4])",
    ]
    # The five runtime parameters, then Triton's global and profile scratch pointers.
    assert num_params == 7


@pytest.mark.unit
def test_fill_writes_each_argument_into_its_slot():
    fill = make_fill(["args[0].data_ptr()", "args[2]", "args[3]", "f32(args[4])"], "probe")
    slots = (ctypes.c_uint64 * 6)()
    tensor = torch.zeros(4)
    fill(slots, (tensor, None, -3, 1 << 40, 1.5))
    assert slots[0] == tensor.data_ptr()
    # A negative 4-byte integer: its low half is what the kernel reads (little-endian).
    assert slots[1] & 0xFFFFFFFF == (-3) & 0xFFFFFFFF
    assert slots[2] == 1 << 40
    assert slots[3] == 0x3FC00000  # 1.5f
    assert slots[4] == slots[5] == 0  # scratch pointers stay null


@triton.jit
def _scaled_offset(out_ptr, x_ptr, n, big, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x * scale + (big >> 32).to(tl.float32), mask=offs < n)


@pytest.mark.gpu
@pytest.mark.parametrize("cooperative", [False, True])
def test_driver_launch_matches_the_reference_gpu(cooperative):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tritonep.kernels.common.launch import KernelLaunch

    plan = KernelLaunch(_scaled_offset, BLOCK=128, num_warps=4, launch_cooperative_grid=cooperative)
    for call, n in enumerate((1000, 700, 1000)):
        x = torch.randn(1000, device="cuda")
        out = torch.full_like(x, float("nan"))
        plan.launch(((n + 127) // 128,), None, out, x, n, (call + 5) << 32, -1.5)
        torch.cuda.synchronize()
        torch.testing.assert_close(out[:n], x[:n] * -1.5 + (call + 5), rtol=0, atol=1e-6)
        assert out[n:].isnan().all()
    assert plan._driver is not None
