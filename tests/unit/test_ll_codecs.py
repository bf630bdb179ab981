"""LL codecs and LL reference semantics (reference §13.2, §13.3, §14.9, §14.10).

- `interpreter`: the device functions of `tritonep.kernels.common.codecs` run in the Triton
  interpreter (a one-rank CPU pool: TRITON_INTERPRET=1 before any kernel is defined) and must give
  the reference's FP8 bytes, fp32 scales and UE8M0 words bit for bit on edge-case inputs; LogFMT-10
  codes must equal the float64 reference except within rounding noise of a level boundary, and its
  row layout must hold exactly the documented bytes.
- `unit`: the plain-torch LL reference on hand-made examples (its docstrings' worked examples),
  and the codec kernels compile for sm_90 on this CPU machine (run in a subprocess without
  TRITON_INTERPRET, since the suite may run under it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ll_codec_cases as cases
import pytest
import torch

from tritonep import reference


# ------------------------------------------------------------------------------------ inputs
def _groups_scaled(gen, num_rows, hidden, low, high):
    """Normal values, each 128-channel group scaled by 2**e, e uniform in [low, high)."""
    num_groups = -(-hidden // 128)
    exponents = torch.randint(low, high, (num_rows, num_groups), generator=gen).float()
    scale = torch.exp2(exponents).repeat_interleave(128, dim=1)[:, :hidden]
    return torch.randn((num_rows, hidden), generator=gen) * scale


def fp8_inputs(hidden: int, seed: int) -> torch.Tensor:
    """bf16 `[12, hidden]`: random groups over 2**-30..2**40 (UE8M0 bytes on both sides of 128),
    then edge-case rows."""
    gen = torch.Generator().manual_seed(seed)
    x = _groups_scaled(gen, 12, hidden, -30, 40)
    n = min(hidden, 128)
    x[0, :n] = 0.0  # all-zero group: amax = 1e-4
    x[1, :n] = -0.0  # negative zeros: e4m3 0x80
    x[2, :n] = torch.randn(n, generator=gen) * 1e-6  # below the 1e-4 amax floor
    x[3, :n] = torch.randn(n, generator=gen) * 1e-39  # bf16 subnormals
    # amax 448 makes the scale exactly 1: e4m3 ties (17 and 19 between multiples of 2, 8.5,
    # 3 * 2**-10 between subnormals 2**-9 and 2**-8, 2**-10 between 0 and 2**-9) and exact values.
    ties = torch.tensor([448.0, 17.0, 8.5, 3 * 2.0**-10, 2.0**-10, 19.0, 0.1875, 240.0])
    x[4, :n] = torch.cat([ties, -ties]).repeat(n // 16)
    # amax 2.421875: 2.421875 * f32(448 / 2.421875) rounds to 448.00003, saturated to 448.
    x[5, :n] = torch.linspace(-2.421875, 2.421875, n)
    x[6, :n] = torch.full((n,), 1e30)  # huge: exponent byte far above 127
    return x.to(torch.bfloat16)


def logfmt_inputs(hidden: int, seed: int) -> torch.Tensor:
    """bf16 `[16, hidden]` mixing encoded groups, every BF16-fallback reason and narrow ranges."""
    gen = torch.Generator().manual_seed(seed)
    x = _groups_scaled(gen, 16, hidden, -40, 3)  # groups with amax >= 1 fall back to BF16
    g = hidden // 128
    x[0, :128] = 0.0  # amax == 0: BF16
    x[0, 128:256] = 0.25  # amax == amin: BF16
    x[1, :128] = 0.0
    x[1, 5] = -0.375  # one value, zeros elsewhere: lm = la - 32; codes 511 and 0
    x[1, 128:256] = -torch.rand(128, generator=gen) * 0.99  # amax just below 1: encoded
    x[2, :128] = torch.exp2(-torch.rand(128, generator=gen) * 60 - 1)  # 60 octaves: clipped at 32
    x[2, 128:256] = torch.randn(128, generator=gen) * 1e-39  # subnormals
    x[3, :128] = torch.randn(128, generator=gen) * 1e-3
    x[3, 7] = float("nan")  # NaN: BF16 (V1 would zero it)
    x[3, 128:256] = torch.randn(128, generator=gen) * 1e-3
    x[3, 130] = float("-inf")  # amax = inf: BF16
    x[4, :128] = -0.0  # all negative zeros: BF16 (amax == 0)
    x[4, 128:256] = torch.randn(128, generator=gen) * 1e-2
    x[4, 128:256:7] = -0.0  # signed zeros inside an encoded group
    # Narrow ranges (a few bf16 neighbours, step down to ~1e-5) at magnitudes 2**-130..2**-1.
    base = torch.exp2(-torch.randint(1, 130, (4, g, 1), generator=gen).float())
    width = torch.exp2(-torch.randint(2, 9, (4, g, 1), generator=gen).float())
    sign = torch.where(torch.rand((4, g, 128), generator=gen) < 0.5, -1.0, 1.0)
    x[5:9] = (base * (1 - width * torch.rand((4, g, 128), generator=gen)) * sign).view(4, hidden)
    return x.to(torch.bfloat16)


def _run(cpu_pool, fn, *args):
    return cpu_pool(1).run(fn, *args, timeout=120)[0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.uint8)


# ----------------------------------------------------------------------------------------- FP8
@pytest.mark.interpreter
@pytest.mark.parametrize("hidden", [640, 512, 320])  # G = 5 (H % 512 != 0), 4, 2.5 (partial group)
@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_quantize_is_bit_exact(cpu_pool, hidden, round_scale):
    x = fp8_inputs(hidden, seed=hidden)
    values, scales, packed = _run(cpu_pool, cases.run_fp8, x, round_scale)
    want_values, want_scales = reference.ll_quantize(x, round_scale)
    assert torch.equal(values, _bits(want_values)), "fp8 bytes differ"
    assert torch.equal(_bits(scales), _bits(want_scales)), "scale_inv bits differ"
    if round_scale:
        _, want_packed = reference.ll_quantize(x, round_scale, use_ue8m0=True)
        assert torch.equal(packed, want_packed), "UE8M0 words differ"
        if hidden >= 512:  # byte 3 of a word exists
            assert (packed < 0).any(), "inputs must reach exponent bytes >= 128 in byte 3"


@pytest.mark.interpreter
def test_codec_docstring_examples(cpu_pool):
    """The worked examples of `fp8_quantize`, `_e4m3_bits`, `ue8m0_pack`, `logfmt_encode` and
    `logfmt_decode`, through the device functions."""
    x = torch.zeros((1, 384), dtype=torch.bfloat16)
    x[0, :2] = torch.tensor([1.0, 3.5])  # amax 3.5 -> 2**-7
    x[0, 128:133] = torch.tensor([448.0, 16.0, 17.0, 19.0, -(2.0**-10)])  # amax 448 -> scale 1
    values, scales, _ = _run(cpu_pool, cases.run_fp8, x, False)
    assert scales[0, 0] == 2.0**-7 and values[0, 0] == 0x70  # e4m3 128.0
    assert values[0, 128:133].tolist() == [0x7E, 0x58, 0x58, 0x5A, 0x80]
    assert scales[0, 2] == torch.tensor(1e-4) * torch.tensor(1 / 448, dtype=torch.float32)
    x[0, 256] = 1.75  # -> 2**-8
    values, scales, packed = _run(cpu_pool, cases.run_fp8, x, True)
    assert scales[0].tolist() == [2.0**-7, 1.0, 2.0**-8] and values[0, 0] == 0x70
    assert packed.tolist() == [[120 | 127 << 8 | 119 << 16]]  # group 3 does not exist: byte 0

    x = torch.full((1, 128), 2.0**-10, dtype=torch.bfloat16)
    x[0, 0], x[0, 127] = 0.5, -0.0
    out = _run(cpu_pool, cases.run_logfmt, x)
    assert out["wire"][0, :2].tolist() == [511, 368] and out["wire"][0, 127] == 1 << 9
    assert out["meta"].tolist() == [[0x3F00]]
    decoded = out["decoded"][0]
    assert decoded[0] == 0.5 and abs(float(decoded[1]) / 2.0**-10 - 1.0192) < 1e-4
    assert decoded[127] == 0.0 and torch.signbit(decoded[127])


# ------------------------------------------------------------------------------------ LogFMT-10
def _expected_slot(wire, meta, hidden):
    """The bytes `logfmt_store` must write for one row, written out from the module docstring's
    layout; unwritten bytes (C and D of encoded groups) hold `cases.POISON`."""
    g = hidden // 128
    wire = wire.to(torch.int64).view(g, 128)
    slot = torch.full((2 * hidden + 4 * g,), cases.POISON, dtype=torch.int64).view(-1)
    bf16 = (meta & 0x8000) != 0
    regions = [
        (0, 8, 0, None),
        (hidden, 2, 8, None),
        (hidden * 5 // 4 + 4 * g, 4, 10, bf16),
        (hidden * 7 // 4 + 4 * g, 2, 14, bf16),
    ]
    for offset, bits, shift, written in regions:
        per_byte = 8 // bits
        fields = ((wire >> shift) & ((1 << bits) - 1)).view(g, 128 // per_byte, per_byte)
        group_bytes = (fields << (bits * torch.arange(per_byte))).sum(dim=2)  # [G, 16 * bits]
        for i in range(g):
            if written is None or written[i]:
                start = offset + i * group_bytes.size(1)
                slot[start : start + group_bytes.size(1)] = group_bytes[i]
    meta_bytes = (meta.to(torch.int64).unsqueeze(1) >> torch.tensor([0, 8, 16, 24])) & 0xFF
    slot[hidden * 5 // 4 : hidden * 5 // 4 + 4 * g] = meta_bytes.flatten()
    return slot.to(torch.uint8)


@pytest.mark.interpreter
@pytest.mark.parametrize("hidden", [256, 512, 640])  # G = 2, 4, 5: C and D 4- or 16-byte aligned
def test_logfmt_codec(cpu_pool, hidden):
    x = logfmt_inputs(hidden, seed=hidden + 1)
    check_logfmt(x, _run(cpu_pool, cases.run_logfmt, x))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hidden, rows, num_warps",
    [(512, 2, 4), (7168, 1, 8)],  # the second: the LL combine's whole-row tile at DeepEP's hidden
)
def test_logfmt_codec_gpu(hidden, rows, num_warps):
    """The same codec compiled (lg2/ex2.approx, 16-byte vectors), on the same inputs."""
    x = logfmt_inputs(hidden, seed=hidden + 1)
    check_logfmt(x, cases.run_logfmt(None, x.cuda(), rows=rows, num_warps=num_warps))


def check_logfmt(x: torch.Tensor, out: dict) -> None:
    """`cases.run_logfmt`'s results for `x` against the reference and the documented layout."""
    num_rows, hidden = x.shape
    g = hidden // 128
    codes, encoded, levels = reference.logfmt_codes(x)
    wire, meta = out["wire"], out["meta"]

    # Store -> load returns what was stored, and the slot holds exactly the documented bytes.
    assert torch.equal(out["loaded_wire"], wire) and torch.equal(out["loaded_meta"], meta)
    for row in range(num_rows):
        want_slot = _expected_slot(wire[row], meta[row], hidden)
        assert torch.equal(out["slots"][row], want_slot), f"row {row}: slot bytes differ"
        if encoded[row].all():
            written = int((out["slots"][row] != cases.POISON).nonzero().max()) + 1
            assert written <= hidden * 10 // 8 + 4 * g

    # Group decisions and metadata are exact: amax, amin of |x| (NaN ignored) and the BF16 flag.
    assert torch.equal((meta & 0x8000) != 0, ~encoded), "BF16 fallback decisions differ"
    assert encoded.any() and (~encoded).any()
    groups = x.float().view(num_rows, g, 128)
    ax = torch.where(groups.isnan(), torch.zeros_like(groups), groups.abs())
    amax_bits = _bits(ax.amax(dim=2)) >> 16
    amin_bits = _bits(torch.where(groups.isnan(), torch.inf, ax).amin(dim=2)) >> 16
    assert torch.equal(meta & 0x7FFF, amax_bits) and torch.equal((meta >> 16) & 0x7FFF, amin_bits)

    # BF16 groups travel and decode bit for bit (NaN and -inf included).
    bf16 = (~encoded).repeat_interleave(128, dim=1)
    raw = x.view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(wire[bf16], raw[bf16])
    assert torch.equal(_bits(out["decoded"])[bf16], _bits(x.float())[bf16])

    # Encoded groups: sign bit exact; 9-bit codes equal the float64 reference except where the
    # exact level lies within the fp32 evaluation error of an integer. That error: log2|x| / step
    # and lm / step are ~|lm| / step and cancel down to the level, so their ~2 ulp
    # (2**-22 * (|lm| + 1) / step) survive; the fmas add ~512 * 2**-23. V1 has the same noise: in
    # groups of magnitude 2**-100 and relative width 2**-7 (step ~2e-5) half the codes move by one
    # level (1.5e-5 relative), with no loss of accuracy.
    enc = encoded.repeat_interleave(128, dim=1)
    assert torch.equal((wire[enc] >> 9) & 1, (raw[enc] >> 15) & 1), "sign bits differ"
    assert torch.equal(wire[enc] >> 10, torch.zeros_like(wire[enc])), "bits 10-15 must be 0"
    xd = x.double().abs().view(num_rows, g, 128)
    la = torch.log2(xd.amax(dim=2))
    lm = torch.maximum(torch.log2(xd.amin(dim=2)), la - 32)
    step = ((la - lm) / 510).clamp(min=1e-30)
    noise = (2.0**-22 * (lm.abs() + 1) / step + 512 * 2.0**-23).repeat_interleave(128, dim=1)
    distance = (levels - levels.round()).abs()
    diff = (wire & 0x1FF) - codes
    clear = enc & (distance > noise)
    assert (diff.abs() <= 1 + noise.ceil())[enc].all(), "a code is off by more than the fp32 noise"
    assert clear.sum() > 0.8 * enc.sum()
    assert torch.equal(diff[clear], torch.zeros_like(diff[clear])), "codes differ away from ties"

    # Decoded values: where the codes agree, the fp32 exp2 of an argument of magnitude <= ~170
    # is within ~2**-16 relative of the float64 value (argument rounding ~2**-17, times ln 2,
    # plus the fma); and nowhere less accurate than the reference quantiser beyond that.
    decoded, want = out["decoded"].double(), reference.logfmt_roundtrip(x).double()
    same = enc & (diff == 0)
    assert torch.equal(torch.signbit(decoded[enc]), torch.signbit(want[enc]))
    assert ((decoded - want).abs() <= 2.0**-15 * want.abs())[same].all()
    xf = x.double()
    err, want_err = (decoded - xf).abs(), (want - xf).abs()
    assert (err <= want_err * (1 + 2.0**-10) + 2.0**-15 * xf.abs())[enc].all()


# -------------------------------------------------------------------------- reference examples
@pytest.mark.unit
def test_ll_quantize_examples():
    x = torch.zeros((1, 512), dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = 1.0, 3.5  # group 0: amax 3.5 -> scale_inv 3.5 * f32(1/448)
    x[0, 128] = 448.0 * 4  # group 1: amax 1792 -> 2**2 (byte 129)
    values, scales = reference.ll_quantize(x)
    assert scales[0, 0] == torch.tensor(3.5) * torch.tensor(1 / 448, dtype=torch.float32)
    assert values[0, 0].float() == 128.0 and values[0, 1].float() == 448.0
    assert scales[0, 2] == torch.tensor(1e-4) * torch.tensor(1 / 448, dtype=torch.float32)
    _, words = reference.ll_quantize(x, round_scale=True, use_ue8m0=True)
    # bytes [120 (2**-7), 129 (2**2), 105, 105 (1e-4 / 448 -> 2**-22)], group 0 in the low byte
    assert words.tolist() == [[120 | 129 << 8 | 105 << 16 | 105 << 24]]
    assert torch.equal(reference.ll_dequantize(*reference.ll_quantize(x, True)), x.float())
    assert torch.equal(reference.ll_dequantize(*reference.ll_quantize(x, True, True)), x.float())
    with pytest.raises(ValueError, match="use_ue8m0 requires round_scale"):
        reference.ll_quantize(x, round_scale=False, use_ue8m0=True)


@pytest.mark.unit
def test_logfmt_reference_example():
    x = torch.full((1, 128), 2.0**-10, dtype=torch.bfloat16)
    x[0, 0], x[0, 127] = 0.5, 0.0
    codes, encoded, levels = reference.logfmt_codes(x)
    assert encoded.tolist() == [[True]]
    assert codes[0, 0] == 511 and codes[0, 1] == 368 and codes[0, 127] == 0
    assert abs(float(levels[0, 1]) - 368.057) < 1e-3
    decoded = reference.logfmt_roundtrip(x)
    assert decoded[0, 0] == 0.5 and decoded[0, 127] == 0.0
    assert abs(float(decoded[0, 1]) / 2.0**-10 - 1.0192) < 1e-4


@pytest.mark.unit
def test_ll_dispatch_example():
    """ll_dispatch's docstring example: R=2, E=4, T=2, seen from rank 1."""
    hidden = 8
    xs = [
        torch.arange(2 * hidden).view(2, hidden).to(torch.bfloat16),
        -torch.arange(1, 1 + hidden).view(1, hidden).to(torch.bfloat16),
    ]
    topk = [torch.tensor([[2, 3], [3, -1]]), torch.tensor([[3, 3]])]
    got = reference.ll_dispatch(1, 2, 4, 2, xs, topk)
    assert got["recv_count"].tolist() == [1, 4]
    assert got["packed_recv_src_info"].tolist() == [[0, 0, 0, 0], [0, 1, 0, 0]]
    assert got["packed_recv_layout_range"].tolist() == [[1, 1 << 32], [2, 2 << 32 | 2]]
    recv_x = got["recv_x"]
    assert recv_x.shape == (2, 4, hidden) and recv_x.dtype == torch.bfloat16
    assert torch.equal(recv_x[0, 0], xs[0][0])
    assert torch.equal(recv_x[1], torch.stack([xs[0][0], xs[0][1], xs[1][0], xs[1][0]]))
    assert not recv_x[0, 1:].any()
    # Rank 0 masks rank 1 (rank 1 does not know yet): nothing flows either way.
    masked = reference.ll_dispatch(1, 2, 4, 2, xs, topk, mask=[[0, 1], [0, 0]])
    assert masked["recv_count"].tolist() == [0, 2]
    assert masked["packed_recv_layout_range"].tolist() == [[0, 0], [0, 2]]


@pytest.mark.unit
def test_ll_combine_example():
    """ll_combine's docstring example, then a duplicated expert and a masked owner."""
    num_ranks, num_experts, hidden = 2, 4, 4
    topk_idx = torch.tensor([[1, 3], [-1, -1]])
    weights = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    xs = [torch.ones((n, hidden), dtype=torch.bfloat16) for n in (2, 1)]
    routing = [topk_idx, torch.tensor([[-1, -1]])]
    handles = [reference.ll_dispatch(r, num_ranks, num_experts, 2, xs, routing) for r in range(2)]
    outputs = [torch.zeros((2, 4, hidden), dtype=torch.bfloat16) for _ in range(2)]
    outputs[0][1, 0] = 1.0  # expert 1 (rank 0, local 1), its only row: token 0 of rank 0
    outputs[1][1, 0] = -0.25  # expert 3 (rank 1, local 1)
    src_infos = [h["packed_recv_src_info"] for h in handles]
    layouts = [h["packed_recv_layout_range"] for h in handles]
    args = (0, num_ranks, num_experts, outputs, topk_idx, weights, src_infos, layouts)
    combined = reference.ll_combine(*args)
    assert combined.dtype == torch.bfloat16 and combined.shape == (2, hidden)
    assert not combined.any()  # 0.5 * 1.0 + 2.0 * -0.25, and token 1 selects nothing
    masked = reference.ll_combine(*args, mask=[[0, 1], [0, 0]])
    assert masked[0].tolist() == [0.5] * hidden  # expert 3's owner is masked: its term is dropped

    # A token picking expert 3 twice: two rows, matched to its two k in order.
    dup = [torch.tensor([[3, 3], [-1, -1]]), torch.tensor([[-1, -1]])]
    handles = [reference.ll_dispatch(r, num_ranks, num_experts, 2, xs, dup) for r in range(2)]
    assert handles[1]["recv_count"].tolist() == [0, 2]
    outputs[1][1, 0], outputs[1][1, 1] = 1.0, 3.0
    src_infos = [h["packed_recv_src_info"] for h in handles]
    layouts = [h["packed_recv_layout_range"] for h in handles]
    combined = reference.ll_combine(
        0, num_ranks, num_experts, outputs, dup[0], weights, src_infos, layouts
    )
    assert combined[0].tolist() == [6.5] * hidden and not combined[1].any()  # 0.5 * 1 + 2 * 3


@pytest.mark.unit
def test_ll_dispatch_combine_identity_experts():
    """Random routing over 3 ranks with identity experts: combine returns bf16(sum_k w_k * x)."""
    num_ranks, num_experts, tokens, hidden, topk = 3, 6, 5, 128, 3
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn((tokens, hidden), generator=gen).to(torch.bfloat16) for _ in range(num_ranks)]
    idx = [torch.randint(-1, num_experts, (tokens, topk), generator=gen) for _ in range(num_ranks)]
    weights = [torch.rand((tokens, topk), generator=gen) for _ in range(num_ranks)]
    handles = [
        reference.ll_dispatch(r, num_ranks, num_experts, tokens, xs, idx) for r in range(num_ranks)
    ]
    for r, h in enumerate(handles):
        counts = h["packed_recv_layout_range"] & 0xFFFFFFFF
        assert torch.equal(counts.sum(dim=1).to(torch.int32), h["recv_count"])
        for local in range(num_experts // num_ranks):
            want = sum(int((t == r * 2 + local).sum()) for t in idx)
            assert int(h["recv_count"][local]) == want
    outputs = [h["recv_x"] for h in handles]
    src_infos = [h["packed_recv_src_info"] for h in handles]
    layouts = [h["packed_recv_layout_range"] for h in handles]
    for r in range(num_ranks):
        got = reference.ll_combine(
            r, num_ranks, num_experts, outputs, idx[r], weights[r], src_infos, layouts
        )
        acc = torch.zeros((tokens, hidden))
        for k in range(topk):
            w = torch.where(idx[r][:, k] >= 0, weights[r][:, k], 0.0).unsqueeze(1)
            acc = acc + w * xs[r].float()
        assert torch.equal(got, acc.to(torch.bfloat16))
        logfmt = reference.ll_combine(
            r,
            num_ranks,
            num_experts,
            outputs,
            idx[r],
            weights[r],
            src_infos,
            layouts,
            use_logfmt=True,
        )
        assert reference.calc_diff(logfmt, got) < 1e-4


@pytest.mark.unit
def test_calc_diff():
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    assert reference.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert reference.calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0
    # x + 1 = [1, 1], y + 1 = [1, 3]: 1 - 2 * 4 / (2 + 10) = 1/3
    assert reference.calc_diff(torch.zeros(2), torch.tensor([0.0, 2.0])) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------- sm_90
_AOT = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ll_codec_cases as cases

def compile(fn, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return sorted(set(re.findall(r"\\b(?:lg2|ex2|div|cvt)\\.[a-z0-9.]+", ptx)))

report = {}
fp8 = {"x_ptr": "*bf16", "values_ptr": "*fp8e4nv", "scales_ptr": "*fp32", "packed_ptr": "*i32",
       "num_rows": "i32"}
for round_scale in (False, True):
    report[f"fp8 round_scale={round_scale}"] = compile(cases.fp8_kernel, fp8, dict(
        HIDDEN=7168, ROWS=1, BLOCK_G=64, ROUND_SCALE=round_scale, INTERPRETED=False))
logfmt = {"x_ptr": "*bf16", "wire_ptr": "*i32", "meta_ptr": "*i32", "loaded_wire_ptr": "*i32",
          "loaded_meta_ptr": "*i32", "decoded_ptr": "*fp32", "slots_addr": "i64", "num_rows": "i32"}
for hidden in (7168, 640):
    report[f"logfmt H={hidden}"] = compile(cases.logfmt_kernel, logfmt, dict(
        HIDDEN=hidden, ROWS=1, BLOCK_G=8, INTERPRETED=False))
print(json.dumps(report))
"""


@pytest.mark.aot
def test_codecs_compile_for_sm90():
    """Both codecs compile for sm_90 with V1's instructions: the saturating RNE e4m3 convert,
    IEEE divisions only (`/` would be div.full.f32), and lg2/ex2.approx without ftz."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name, ops in report.items():
        assert not any(op.startswith("div.full") for op in ops), (name, ops)
        if name.startswith("fp8"):
            assert "cvt.rn.satfinite.e4m3x2.f32" in ops, (name, ops)
        else:
            assert {"lg2.approx.f32", "ex2.approx.f32", "div.rn.f32"} <= set(ops), (name, ops)
            assert not any(".ftz" in op for op in ops if op.startswith(("lg2", "ex2"))), (name, ops)
