"""Low-latency codecs on register tiles: FP8 per-128-channel quantisation, UE8M0 scale packing and
LogFMT-10, identical on the GPU and in the Triton interpreter where the spec asks for bits.

Problem: LL dispatch sends each BF16 token as FP8 with one scale per 128 channels (reference §14.9),
and LL combine may send each returned row as LogFMT-10 (§14.10). Both must match DeepEP V1 bit for
bit (FP8 bytes, scales) or as closely as its own arithmetic allows (LogFMT), and the CPU suite runs
the very same functions in the interpreter.

Tile convention: every function works on a `[NG, 128]` tile whose tile rows are 128-channel
groups. A kernel holding one token row of hidden H loads it as `[BLOCK_G, 128]` (BLOCK_G = next
power of two >= G = H / 128, groups >= G masked and loaded as 0); a kernel holding ROWS token rows
reshapes `[ROWS, BLOCK_G, 128]` to `[ROWS * BLOCK_G, 128]`, and per-group results `[NG]` back to
`[ROWS, BLOCK_G]`. NG must be a power of two (and a multiple of 4 for `ue8m0_pack`). The LogFMT
store/load helpers take a row address and a group index per tile row, so a kernel may also walk a
row a few groups at a time: in the sm_90 AOT of the test kernel, a whole 7168-channel row as one
`[64, 128]` LogFMT tile spills (1.6 KB of stack at 4 warps, 0.3 KB at 16), 8 groups at 4 warps take
~100 registers and no stack.

FP8 (`fp8_quantize`): amax = max(1e-4, max |x|) per group (NaNs ignored, as V1's fmaxf does);
scale_inv = amax * f32(1/448) and values sat_e4m3(x * (448 / amax)), or with ROUND_SCALE
scale_inv = 2**ceil(log2(amax * f32(1/448))) from the fp32 bits and values x * (1 / scale_inv)
(exact: a power of two). Inputs must be finite. Two GPU pitfalls: `/` compiles to `div.full.f32`
(up to 2 ulp off), so 448 / amax uses `div_rn`; the e4m3 cast is `cvt.rn.satfinite.e4m3x2.f32`,
which is what the spec's sat_e4m3 means. The interpreter's fp32 -> fp8 cast rounds ties away from
zero, lets a mantissa carry spill into the exponent field and does not saturate (a third of the
test's rows come out wrong), so under INTERPRETED the rounding is done on the integer bits
(`_e4m3_bits`). The interpreter also widens BF16 subnormals wrongly (`_widen` shifts the bits
instead) and, in triton 3.6, negates 0.0 to +0.0 (signs are set as bits).

UE8M0 (`ue8m0_pack`): byte = biased exponent of scale_inv; groups 4p..4p+3 -> int32 word p,
little-endian, invalid groups 0.

LogFMT-10 (`logfmt_encode` / `logfmt_decode`), per group of 128 BF16 values: la = log2(amax|x|),
lm = max(log2(amin|x|), la - 32) (la - 32 when amin is 0); the group is encoded iff la < 0 and
lm < la (and it holds no NaN: V1 would turn a NaN into 0), else sent as plain BF16. Encoded values
are a sign and a 9-bit code c = floor(max(0, log2|x| / step + offset)), clipped to 511, with
step = (la - lm) / 510 and offset = 2 - log2((1 + 2**step) / 2) / step - lm / step: the boundary
between levels c and c+1 sits at the arithmetic mean of their values (nearest in the linear
domain). Decoding gives 0 for c == 0, else ±2**((c - 1) * step + lm). On the GPU this is V1's
instruction sequence (`lg2.approx.f32`, `ex2.approx.f32` without ftz, IEEE divisions, and fused
multiply-adds where nvcc contracts V1's expressions: assumed from its source, not yet compared with
a DeepEP build), so codes and decoded values should equal V1's. In the interpreter log2 / exp2 are
numpy's (more exact than the approx instructions) and `tl.fma` rounds twice, so a value whose
level lies within the fp32 noise of an integer may get the neighbouring code. That noise is
~2**-22 * |lm| / step levels (log2|x| / step and lm / step cancel): negligible for typical groups
(no code differs from the float64 reference on 65536 Gaussian values), about one level when a
group is only a few BF16 neighbours wide (step ~1e-5); V1's own arithmetic has the same noise.
V1 does not clip the code: when step underflows its rounding term, a group's largest value gets
code 512 and corrupts its neighbour's bits; here it gets 511.

Wire value: both ends exchange, per element, a 16-bit "wire value" (held in int32): the raw BF16
bits for a BF16 group, `code | sign << 9` for an encoded one (top 6 bits zero). Per group one
metadata word: bits 0-14 amax and bits 16-30 amin (BF16 bits of non-negative values), bit 15 set
when the group is sent as BF16.

Row layout (`logfmt_store` / `logfmt_load`), H = 128 * G, byte offsets from the row start:

    [0, H)                  A: bits 0-7 of every wire value, one byte per element
    [H, 5H/4)               B: bits 8-9, 2 bits per element (sign and top code bit if encoded)
    [5H/4, 5H/4 + 4G)       metadata words, one per group
    [5H/4 + 4G, 7H/4 + 4G)  C: bits 10-13, 4 bits per element, written for BF16 groups only
    [7H/4 + 4G, 2H + 4G)    D: bits 14-15, 2 bits per element, written for BF16 groups only

A row therefore takes exactly V1's combine message size 2H + 4G bytes; with every group encoded
only its first H * 10/8 + 4G bytes are written (the §17.3 LogFMT byte count), one contiguous range.
Inside A, B, C, D group g owns bytes [g * 128 * bits/8, (g + 1) * 128 * bits/8) and element j of
the group sits at bit (j * bits) of that range, little-endian words. Rows must start 16-byte
aligned when H % 512 == 0 (the stores are hinted as 16-byte vectors), 4-byte aligned otherwise.
"""

import triton
import triton.language as tl

from .tiles import row_block

GROUP = tl.constexpr(128)  # channels per scale / LogFMT group (reference §14.9, §14.10)
_E4M3_MAX_INV = tl.constexpr(1.0 / 448.0)  # rounded to fp32 once, as V1's constant is
_E4M3_MAX_BITS = tl.constexpr(0x43E00000)  # 448.0f
_AMAX_FLOOR = tl.constexpr(1e-4)
_LOGFMT_LEVELS = tl.constexpr(510)  # codes 1..511 are levels 2**((c - 1) * step + lm); 0 is zero
_LOGFMT_CLIP = tl.constexpr(32.0)  # lm >= la - 32: at most 32 octaves below amax
_BF16_FLAG = tl.constexpr(0x8000)  # metadata bit 15 (amax's sign bit, always 0): sent as BF16


def logfmt_row_bytes(hidden: int) -> int:
    """Bytes of one LogFMT-10 row slot (any mix of encoded and BF16 groups): 2H + 4G."""
    return 2 * hidden + 4 * (hidden // 128)


def logfmt_encoded_bytes(hidden: int) -> int:
    """Bytes written for a row whose groups are all encoded: H * 10/8 + 4G, a prefix of the slot."""
    return hidden * 10 // 8 + 4 * (hidden // 128)


# ------------------------------------------------------------------------------------------ FP8
@triton.jit
def _widen(x, INTERPRETED: tl.constexpr):
    """`x.to(tl.float32)`, exact on every backend: the interpreter (3.6, 3.8) widens BF16
    subnormals wrongly (bits 0x0008 -> 0.0, 0x0007 -> 0x00600000), so it gets the bits shifted."""
    if INTERPRETED and x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _e4m3_bits(y):
    """sat_e4m3 on the integer bits: fp32 `y` -> e4m3fn codes (int32 0..255), RNE, NaN -> 0x7F.

    Example: 16.0 -> 0x58; 17.0 -> 0x58 and 19.0 -> 0x5A (ties go to the even mantissa, 16 and
    20); 500.0 -> 0x7E (saturated to 448); -2**-10 -> 0x80 (a tie between -0 and -2**-9).
    """
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    # Saturate first (positive floats order like their bits): 448 is representable, so
    # clamp-then-round equals round-then-saturate.
    mag = tl.minimum(mag, _E4M3_MAX_BITS)
    exponent = mag >> 23
    mantissa = (mag & 0x7FFFFF) | tl.where(exponent > 0, 0x800000, 0)
    # Keep 4 significant bits for normals (drop 20 of 24); below 2**-6 the quantum is 2**-9 and one
    # more bit goes per octave. 25 dropped bits already round every fp32 mantissa to 0.
    drop = tl.minimum(tl.maximum(141 - exponent, 20), 25)
    half = (1 << (drop - 1)) - 1 + ((mantissa >> drop) & 1)
    rounded = (mantissa + half) >> drop
    # A carry out of the mantissa (rounded == 16, or 8 for subnormals) lands in the exponent field.
    code = tl.where(drop == 20, ((exponent - 120) << 3) + rounded - 8, rounded)
    code = code | ((bits >> 24) & 0x80)
    return tl.where(is_nan, 0x7F, code)


@triton.jit
def fp8_quantize(x, ROUND_SCALE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Quantise each 128-channel group of `x` `[NG, 128]` (bf16 or fp32) to e4m3 (reference §14.9).

    Returns `(values [NG, 128] float8e4nv, scale_inv [NG] fp32)`; dequantise as
    `values * scale_inv[:, None]`. Padding channels must hold 0 (they do not raise amax).

    Example: a group with max |x| = 3.5 and x[0] = 1.0
        ROUND_SCALE=False -> scale_inv = 3.5 * f32(1/448) = 2**-7, values[0] = 448 / 3.5 = 128
        ROUND_SCALE=True  -> scale_inv = 2**ceil(log2(2**-7)) = 2**-7, values[0] = 128
    an all-zero group -> amax = 1e-4: scale_inv = 2.2321e-07 (2**-22 with ROUND_SCALE), values 0.
    """
    x = _widen(x, INTERPRETED)
    amax = tl.maximum(tl.max(tl.where(x == x, tl.abs(x), 0.0), axis=1), _AMAX_FLOOR)
    if ROUND_SCALE:
        bits = (amax * _E4M3_MAX_INV).to(tl.int32, bitcast=True)
        # ceil(log2) from the bits: amax >= 1e-4 keeps amax / 448 normal, so this is exact.
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale_inv = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
        scale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    else:
        scale_inv = amax * _E4M3_MAX_INV
        scale = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    y = x * scale[:, None]
    if INTERPRETED:
        values = _e4m3_bits(y).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        values = y.to(tl.float8e4nv)
    return values, scale_inv


@triton.jit
def ue8m0_pack(scale_inv, valid):
    """Pack power-of-two scales `[NG]` fp32 into `[NG // 4]` int32 UE8M0 words (reference §14.9).

    Word p holds the biased exponents of groups 4p..4p+3, group 4p in the low byte; groups where
    `valid` `[NG]` is false give 0 bytes.

    Example: scale_inv = [2**-7, 2**-8, 1.0, 2**-7], valid = [1, 1, 1, 0]
        -> bytes [120, 119, 127, 0] -> word 0x007F7778.
    """
    NG: tl.constexpr = scale_inv.shape[0]
    tl.static_assert(NG % 4 == 0, "ue8m0_pack: the group count of the tile must be a multiple of 4")
    exponents = tl.where(valid, (scale_inv.to(tl.int32, bitcast=True) >> 23) & 0xFF, 0)
    quads = tl.reshape(exponents, [NG // 4, 4])
    # Disjoint bytes: the sum is their OR, also when byte 3 sets the sign bit.
    return tl.sum(quads << (8 * tl.arange(0, 4))[None, :], axis=1)


# ------------------------------------------------------------------------------------- LogFMT-10
@triton.jit
def _log2(x, INTERPRETED: tl.constexpr):
    # V1 uses lg2.approx.f32; tl.log2 compiles to a longer, more exact sequence on sm_90.
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _exp2(x, INTERPRETED: tl.constexpr):
    # V1 uses ex2.approx.f32; tl.exp2 compiles to ex2.approx.ftz.f32, which flushes the subnormal
    # results that groups with amin below 2**-126 decode to.
    if INTERPRETED:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _logfmt_range(amax, amin, INTERPRETED: tl.constexpr):
    """(lm, step, encodable) per group from amax, amin `[NG]` fp32; lm = 0 and step = 1 where the
    group is not encodable, so that no lane computes with infinities."""
    # la matters only below 0 (amax < 1): clamping at 2 keeps an infinite amax out of la - lm.
    la = _log2(tl.where(amax > 0, tl.minimum(amax, 2.0), 1.0), INTERPRETED)
    lm = tl.maximum(_log2(tl.where(amin > 0, amin, 1.0), INTERPRETED), la - _LOGFMT_CLIP)
    lm = tl.where(amin > 0, lm, la - _LOGFMT_CLIP)
    encodable = (amax > 0) & (la < 0.0) & (lm < la)
    span = tl.where(encodable, la - lm, 1.0 * _LOGFMT_LEVELS)
    step = tl.math.div_rn(span, tl.full(span.shape, 1.0 * _LOGFMT_LEVELS, tl.float32))
    return tl.where(encodable, lm, 0.0), step, encodable


@triton.jit
def logfmt_encode(x, INTERPRETED: tl.constexpr):
    """LogFMT-10 wire values of each 128-channel group of `x` `[NG, 128]` (reference §14.10).

    `x` holds BF16 values (a bf16 tile or its exact fp32 widening). Returns `(wire [NG, 128]
    int32, meta [NG] int32)` in the format of the module docstring; store them with `logfmt_store`.

    Example: x[0] = 0.5, x[1:127] = 2**-10, x[127] = -0.0
        amax = 0.5, amin = 0 -> la = -1, lm = -33, step = 32/510
        -> wire[0] = 511 (level 511.49), wire[1] = 368 (level 368.06: 2**-10 is nearer to level
           368 = 1.0192 * 2**-10 than to level 367 = 0.9758 * 2**-10), wire[127] = 1 << 9 (code 0,
           negative), meta = 0x3F00 (amax 0.5 in bf16; amin 0).
    A group with amax >= 1, or amax == amin, or a NaN -> wire = raw BF16 bits, meta bit 15 set.
    """
    x = _widen(x, INTERPRETED)
    bits16 = (x.to(tl.int32, bitcast=True) >> 16) & 0xFFFF
    ax = tl.abs(x)
    is_num = x == x
    amax = tl.max(tl.where(is_num, ax, 0.0), axis=1)
    amin = tl.min(tl.where(is_num, ax, float("inf")), axis=1)
    has_nan = tl.min(is_num.to(tl.int32), axis=1) == 0
    lm, step, encoded = _logfmt_range(amax, amin, INTERPRETED)
    encoded = encoded & ~has_nan
    # V1's arithmetic: step_inv = 1/step (IEEE), then c = floor(max(fma(log2|x|, step_inv, offset)))
    # with offset = fma(-lm, step_inv, fma(-log2((1 + 2**step) / 2), step_inv, 2)).
    step_inv = tl.math.div_rn(tl.full(step.shape, 1.0, tl.float32), step)
    half_gap = _log2((1.0 + _exp2(step, INTERPRETED)) * 0.5, INTERPRETED)
    offset = tl.fma(-lm, step_inv, tl.fma(-half_gap, step_inv, 2.0))
    log_ax = _log2(tl.where(ax > 0, ax, 1.0), INTERPRETED)
    level = tl.fma(log_ax, step_inv[:, None], offset[:, None])
    code = tl.minimum(tl.floor(tl.maximum(level, 0.0)), 511.0).to(tl.int32)
    code = tl.where(ax > 0, code, 0) | ((bits16 >> 6) & 0x200)
    wire = tl.where(encoded[:, None], code, bits16)
    amax_bits = (amax.to(tl.int32, bitcast=True) >> 16) & 0x7FFF
    amin_bits = (amin.to(tl.int32, bitcast=True) >> 16) & 0x7FFF
    meta = amax_bits | (amin_bits << 16) | tl.where(encoded, 0, _BF16_FLAG)
    return wire, meta


@triton.jit
def logfmt_decode(wire, meta, INTERPRETED: tl.constexpr):
    """Values `[NG, 128]` fp32 of the wire values and metadata made by `logfmt_encode`.

    Example (the group of `logfmt_encode`'s example, step = 32/510): wire 511 ->
    2**(510 * step - 33) = 0.5, wire 368 -> 2**(367 * step - 33) = 1.0192 * 2**-10,
    wire 1 << 9 -> -0.0; a BF16 group -> its BF16 values exactly.
    """
    amax = ((meta & 0x7FFF) << 16).to(tl.float32, bitcast=True)
    amin = (((meta >> 16) & 0x7FFF) << 16).to(tl.float32, bitcast=True)
    lm, step, _ = _logfmt_range(amax, amin, INTERPRETED)
    is_bf16 = (meta & _BF16_FLAG)[:, None] != 0
    code = tl.where(is_bf16, 0, wire & 0x1FF)  # BF16 bits are no code: keep exp2's argument small
    magnitude = _exp2(tl.fma((code - 1).to(tl.float32), step[:, None], lm[:, None]), INTERPRETED)
    magnitude = tl.where(code == 0, 0.0, magnitude)
    # The sign goes in as a bit: triton 3.6's interpreter negates 0.0 to +0.0.
    sign = (wire & 0x200) << 22
    decoded = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    raw = (wire << 16).to(tl.float32, bitcast=True)
    return tl.where(is_bf16, raw, decoded)


@triton.jit
def _pack(fields, BITS: tl.constexpr):
    """`[NG, 128]` fields (low BITS bits used) -> `[NG, 128 * BITS // 32]` int32 words."""
    NG: tl.constexpr = fields.shape[0]
    PER_WORD: tl.constexpr = 32 // BITS
    parts = tl.reshape(fields & ((1 << BITS) - 1), [NG, GROUP // PER_WORD, PER_WORD])
    return tl.sum(parts << (BITS * tl.arange(0, PER_WORD))[None, None, :], axis=2)


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """Inverse of `_pack`: `[NG, 128 * BITS // 32]` int32 words -> `[NG, 128]` fields."""
    NG: tl.constexpr = words.shape[0]
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = BITS * tl.arange(0, PER_WORD)
    parts = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(parts, [NG, GROUP])


@triton.jit
def _words(addrs, WORDS: tl.constexpr, ALIGNED: tl.constexpr):
    """int32 pointers `[len(addrs), WORDS]` to the words following each byte address."""
    if ALIGNED:
        return row_block(addrs, tl.arange(0, WORDS), tl.int32, WORDS)
    else:
        return addrs.to(tl.pointer_type(tl.int32))[:, None] + tl.arange(0, WORDS)[None, :]


@triton.jit
def _regions(row_addrs, groups, HIDDEN: tl.constexpr):
    """Byte addresses of groups `groups` `[NG]` in regions A, B, meta, C, D of rows `row_addrs`."""
    G: tl.constexpr = HIDDEN // GROUP
    g = groups.to(tl.int64)
    a = row_addrs + g * 128
    b = row_addrs + HIDDEN + g * 32
    m = row_addrs + HIDDEN * 5 // 4 + g * 4
    c = row_addrs + (HIDDEN * 5 // 4 + 4 * G) + g * 64
    d = row_addrs + (HIDDEN * 7 // 4 + 4 * G) + g * 32
    return a, b, m, c, d


@triton.jit
def logfmt_store(row_addrs, groups, mask, wire, meta, HIDDEN: tl.constexpr):
    """Store `logfmt_encode`'s `(wire, meta)` as group `groups` `[NG]` of rows at byte addresses
    `row_addrs` `[NG]` int64 (tile rows where `mask` `[NG]` is false are skipped).

    Example: H = 256, one row at address r, groups [0, 1], group 1 sent as BF16
        -> A at r + [0, 256), B at r + [256, 320), meta words at r + 320 and r + 324,
           C of group 1 at r + 328 + [64, 128), D of group 1 at r + 456 + [32, 64).
    """
    G: tl.constexpr = HIDDEN // GROUP
    TAIL_ALIGNED: tl.constexpr = G % 4 == 0  # C and D start 16 bytes apart from A iff 4G % 16 == 0
    a, b, m, c, d = _regions(row_addrs, groups, HIDDEN)
    bf16 = mask & ((meta & _BF16_FLAG) != 0)
    tl.store(_words(a, 32, True), _pack(wire, 8), mask=mask[:, None])
    tl.store(_words(b, 8, True), _pack(wire >> 8, 2), mask=mask[:, None])
    tl.store(m.to(tl.pointer_type(tl.int32)), meta, mask=mask)
    tl.store(_words(c, 16, TAIL_ALIGNED), _pack(wire >> 10, 4), mask=bf16[:, None])
    tl.store(_words(d, 8, TAIL_ALIGNED), _pack(wire >> 14, 2), mask=bf16[:, None])


@triton.jit
def logfmt_load(row_addrs, groups, mask, HIDDEN: tl.constexpr):
    """Load `(wire [NG, 128], meta [NG])` int32 stored by `logfmt_store` (masked tile rows: 0s);
    regions C and D are read only for groups sent as BF16. The rows come from peers: the loads
    bypass L1 (`.cg`), as every other load of peer-written rows does."""
    G: tl.constexpr = HIDDEN // GROUP
    TAIL_ALIGNED: tl.constexpr = G % 4 == 0
    a, b, m, c, d = _regions(row_addrs, groups, HIDDEN)
    meta = tl.load(m.to(tl.pointer_type(tl.int32)), mask=mask, other=0, cache_modifier=".cg")
    bf16 = mask & ((meta & _BF16_FLAG) != 0)
    wire = _unpack(_load_words(a, 32, True, mask), 8)
    wire |= _unpack(_load_words(b, 8, True, mask), 2) << 8
    wire |= _unpack(_load_words(c, 16, TAIL_ALIGNED, bf16), 4) << 10
    wire |= _unpack(_load_words(d, 8, TAIL_ALIGNED, bf16), 2) << 14
    return wire, meta


@triton.jit
def _load_words(addrs, WORDS: tl.constexpr, ALIGNED: tl.constexpr, mask):
    """The WORDS int32 words after each byte address of `addrs` (0 where `mask` is false)."""
    return tl.load(_words(addrs, WORDS, ALIGNED), mask=mask[:, None], other=0, cache_modifier=".cg")
