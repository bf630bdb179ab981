"""Rounding fp32 accumulators to the output dtype identically on the GPU and in the interpreter.

The Triton interpreter (3.6-3.8) converts float32 to bfloat16 by truncation, while the GPU rounds
to nearest-even (`cvt.rn.bf16.f32`). Kernels that sum in fp32 and must agree bit for bit with a
torch reference on both backends call `round_to(acc, DTYPE, INTERPRETED)`: compiled kernels keep the
hardware conversion, interpreted ones round to nearest-even with integer arithmetic.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(values, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """`values.to(DTYPE)` with round-to-nearest-even for bfloat16 on every backend."""
    if INTERPRETED and tl.bfloat16 == DTYPE:
        bits = values.to(tl.uint32, bitcast=True)
        is_nan = values != values
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(DTYPE)
