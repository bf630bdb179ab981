"""Test kernels around the LL codecs (`tritonep.kernels.common.codecs`) and the worker tasks that
run them in the Triton interpreter; `test_ll_codecs.py` compares their outputs with
`tritonep.reference` and compiles the same kernels for sm_90.

The kernels hold ROWS token rows as one `[ROWS * BLOCK_G, 128]` tile, the layout a multi-row LL
kernel uses, so the group-to-row bookkeeping is exercised too. Task functions are module-level:
the rank workers unpickle them by reference and import this module with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonep.kernels.common.codecs import (
    fp8_quantize,
    logfmt_decode,
    logfmt_encode,
    logfmt_load,
    logfmt_row_bytes,
    logfmt_store,
    ue8m0_pack,
)


@triton.jit
def _tile(num_rows, HIDDEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows, groups and a `[ROWS * BLOCK_G, 128]` channel tile of this program's rows."""
    i = tl.arange(0, ROWS * BLOCK_G)
    rows = tl.program_id(0) * ROWS + i // BLOCK_G
    groups = i % BLOCK_G
    channels = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
    live = (rows < num_rows) & (groups * 128 < HIDDEN)
    return rows, groups, channels, live


@triton.jit
def fp8_kernel(
    x_ptr,
    values_ptr,
    scales_ptr,
    packed_ptr,
    num_rows,
    HIDDEN: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ROUND_SCALE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    G: tl.constexpr = (HIDDEN + 127) // 128
    P: tl.constexpr = (G + 3) // 4
    rows, groups, channels, live = _tile(num_rows, HIDDEN, ROWS, BLOCK_G)
    in_row = live[:, None] & (channels < HIDDEN)
    offsets = rows[:, None].to(tl.int64) * HIDDEN + channels
    x = tl.load(x_ptr + offsets, mask=in_row, other=0.0)
    values, scale_inv = fp8_quantize(x, ROUND_SCALE, INTERPRETED)
    tl.store(values_ptr + offsets, values, mask=in_row)
    tl.store(scales_ptr + rows.to(tl.int64) * G + groups, scale_inv, mask=live)
    words = ue8m0_pack(scale_inv, live)
    w = tl.arange(0, ROWS * BLOCK_G // 4)
    word_rows = tl.program_id(0) * ROWS + (4 * w) // BLOCK_G
    p = (4 * w) % BLOCK_G // 4
    word_ok = (word_rows < num_rows) & (p < P)
    tl.store(packed_ptr + word_rows.to(tl.int64) * P + p, words, mask=word_ok)


@triton.jit
def logfmt_kernel(
    x_ptr,
    wire_ptr,
    meta_ptr,
    loaded_wire_ptr,
    loaded_meta_ptr,
    decoded_ptr,
    slots_addr,
    num_rows,
    HIDDEN: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    G: tl.constexpr = HIDDEN // 128
    SLOT_BYTES: tl.constexpr = 2 * HIDDEN + 4 * G
    rows, groups, channels, live = _tile(num_rows, HIDDEN, ROWS, BLOCK_G)
    offsets = rows[:, None].to(tl.int64) * HIDDEN + channels
    x = tl.load(x_ptr + offsets, mask=live[:, None], other=0.0)
    wire, meta = logfmt_encode(x, INTERPRETED)
    tl.store(wire_ptr + offsets, wire, mask=live[:, None])
    tl.store(meta_ptr + rows.to(tl.int64) * G + groups, meta, mask=live)
    slots = slots_addr + rows.to(tl.int64) * SLOT_BYTES
    logfmt_store(slots, groups, live, wire, meta, HIDDEN)
    # Other threads of the program stored some of the words loaded next: on a GPU the barrier
    # makes them visible (the interpreter runs the stores first anyway).
    tl.debug_barrier()
    loaded_wire, loaded_meta = logfmt_load(slots, groups, live, HIDDEN)
    tl.store(loaded_wire_ptr + offsets, loaded_wire, mask=live[:, None])
    tl.store(loaded_meta_ptr + rows.to(tl.int64) * G + groups, loaded_meta, mask=live)
    decoded = logfmt_decode(loaded_wire, loaded_meta, INTERPRETED)
    tl.store(decoded_ptr + offsets, decoded, mask=live[:, None])


def _block_g(hidden: int) -> int:
    return max(4, triton.next_power_of_2(-(-hidden // 128)))


def run_fp8(ctx, x: torch.Tensor, round_scale: bool, rows: int = 2):
    """(values uint8 [N, H], scale_inv fp32 [N, ceil(H/128)], packed int32 [N, ceil(H/512)])."""
    num_rows, hidden = x.shape
    groups = -(-hidden // 128)
    values = torch.full((num_rows, hidden), 0x5A, dtype=torch.uint8)
    scales = torch.full((num_rows, groups), -1.0)
    packed = torch.full((num_rows, -(-groups // 4)), -1, dtype=torch.int32)
    fp8_kernel[(triton.cdiv(num_rows, rows),)](
        x,
        values.view(torch.float8_e4m3fn),
        scales,
        packed,
        num_rows,
        HIDDEN=hidden,
        ROWS=rows,
        BLOCK_G=_block_g(hidden),
        ROUND_SCALE=round_scale,
        INTERPRETED=True,
    )
    return values, scales, packed


POISON = 0x5A  # the byte slots are filled with before the stores: unwritten bytes keep it


def run_logfmt(ctx, x: torch.Tensor, rows: int = 2, num_warps: int = 4) -> dict:
    """Encode, store, load and decode every row of `x` `[N, H]` bf16; all intermediate results (on
    the CPU). Runs where `x` is: in the interpreter for a CPU tensor, compiled for a CUDA one."""
    num_rows, hidden = x.shape
    groups = hidden // 128
    on = dict(device=x.device)
    out = {
        "wire": torch.full((num_rows, hidden), -1, dtype=torch.int32, **on),
        "meta": torch.full((num_rows, groups), -1, dtype=torch.int32, **on),
        "loaded_wire": torch.full((num_rows, hidden), -1, dtype=torch.int32, **on),
        "loaded_meta": torch.full((num_rows, groups), -1, dtype=torch.int32, **on),
        "decoded": torch.full((num_rows, hidden), float("nan"), **on),
        "slots": torch.full((num_rows, logfmt_row_bytes(hidden)), POISON, dtype=torch.uint8, **on),
    }
    logfmt_kernel[(triton.cdiv(num_rows, rows),)](
        x,
        out["wire"],
        out["meta"],
        out["loaded_wire"],
        out["loaded_meta"],
        out["decoded"],
        out["slots"].data_ptr(),
        num_rows,
        HIDDEN=hidden,
        ROWS=rows,
        BLOCK_G=_block_g(hidden),
        INTERPRETED=x.device.type == "cpu",
        num_warps=num_warps,
    )
    return {name: t.cpu() for name, t in out.items()}
