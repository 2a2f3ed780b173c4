"""W4A8 decode GEMV: int4 weights times int8-quantized activations, in integer dot products.

Why: the weight-only int4 GEMV (cpu_gemv_int4.py) widens every nibble to fp32 and multiplies in
fp32, about 17 vector instructions per 32 weights on AVX2, so a decode step is compute-bound, not
bandwidth-bound. llama.cpp's route (ggml_vec_dot_q4_1_q8_1) quantizes the activation row once
per call and multiplies 4-bit by 8-bit integers with the CPU's byte dot products: about 7
instructions per 32 weights here. This module is that route for TVM.

Per call, for x[b, K] (fp32):

1. `quantize_activations`: per group of `GROUP` = 32 along K, `sx = max|x| / 127`,
   `xq = round(x / sx)` (int8, symmetric: llama.cpp's Q8_0/Q8_1 activations), and the group's
   `xs = sx * sum(xq)` (llama.cpp Q8_1's `s`, for the weights' min term: with the exact sum of x
   instead, the min term no longer cancels the rounding errors of the d * q term, whose q are all
   >= 0, and SmolLM2's GEMVs moved ~2x further from fp32); `sx` is stored 4 times per group
   (`sx4[b, K/8]`)
   so that a vector of per-group scales is one load. The int8 row is laid out for the kernel's
   instruction set (`layout_for`): on x86, per pair of groups (g, g + 1), the 16 x's that meet low
   nibbles of g then of g + 1, then the 16 that meet high nibbles of g then g + 1, so one 32-byte
   load of packed weights (two groups) meets one 32-byte load of x per nibble half; on ARM, each
   group's 32 x's in order (one 16-byte load of packed weights per group).
2. `w4a8_gemv`: per output row n and group g, `isum = sum_k q[n, k] * xq[k]` exactly in int32,
   then `acc += float(isum) * d[n, g] * sx[g]`; the min term `sum_g m[n, g] * xs[g]` is one
   vector dot over the groups per row. The weights keep decoder/quantized_int4.py's planes
   (GGUF's Q4_0/Q4_1 blocks), untouched. A prompt's rows take `w4a8_gemm` (AVX2), the same
   products with each weight load shared by 2 rows.

One kernel per instruction-set family (`dot_isa`, from the profile's int8 kernel, itself chosen
from the profile's `requires`, never from the build machine):

| family | instructions per 64 weights (two groups)                      | profiles            |
|--------|----------------------------------------------------------------|---------------------|
| avx2   | vpand/vpsrlw, 2 vpmaddubsw, vpaddw, vpmaddwd, vcvtdq2ps, FMA   | every x86-64 one    |
| sdot   | and/ushr, 2 sdot per group, scvtf, fmul, fmla                  | arm64-dotprod, sve  |
| neon   | and/ushr, smull/smlal on 8-byte halves, saddlp, scvtf, fmla    | arm64-neon          |

vpmaddubsw multiplies unsigned bytes (the nibbles, 0..15) by signed ones (xq) into saturating
int16 pairs; here no sum can saturate (2 x 2 x 15 x 127 = 7620 after adding both nibble halves).
AVX-512 and VNNI profiles reuse the 256-bit AVX2 kernel (a 32-byte load is two groups, the natural
unit; vpdpbusd would save one instruction of seven). CUDA has its own (gpu_gemv.py).

Accuracy: the activation quantization adds at most half a step (sx / 2) of error per x, as
llama.cpp's; the decoder's quality gate measures it (docs/benchmarks.md).
"""

from __future__ import annotations

from functools import cache  # kernel builders: once per shape in a process, not once per layer

from tvm import tirx
from tvm.script import tirx as T

from .cpu_int8 import OPAQUE_PATTERN

#: Weights per group (one d, one m): GGUF's Q4 block size, as in cpu_gemv_int4.
GROUP = 32
#: Output rows per thread-pool task (share each activation load; independent FMA chains).
ROWS = 4
#: Rows ahead whose weights the x86 decode GEMVs prefetch, a line for each line they read: two
#: tasks of `ROWS` (a thread's tasks are consecutive, so these rows are its own next ones). The
#: hardware prefetcher alone left the GEMVs of a decode step at 15-27 GB/s with the weights out
#: of cache on a 2-core Zen 3; with this SmolLM2 decodes 1.17-1.27x faster (docs/benchmarks.md).
PREFETCH_ROWS = 8
_SCHEDULED = "tirx.is_scheduled"

#: int8 GEMM kernel (cpu_int8.kernel_for) -> this module's instruction-set family.
_FAMILY = {
    "amx-int8": "avx2",
    "avx512-vnni": "avx2",
    "avx-vnni": "avx2",
    "avx512bw": "avx2",
    "avx2": "avx2",
    "arm-sdot": "sdot",
    "arm-neon": "neon",
}
FAMILIES = ("avx2", "sdot", "neon")


def dot_isa(int8_kernel) -> str | None:
    """The W4A8 family for a profile's int8 kernel (cpu_int8.kernel_for), None: none (CUDA, or a
    CPU without one), the weight-only GEMV stays."""
    return None if int8_kernel is None else _FAMILY.get(int8_kernel.name)


def check_shape(k: int) -> None:
    if k % GROUP:
        raise ValueError(f"W4A8: K = {k} is not a multiple of the group size {GROUP}")


def layout_for(isa: str, weight_bits: int) -> str:
    """The quantized row's layout a GEMV reads: "paired" (AVX2 int4, see the module docstring),
    else "plain" (the elements in order)."""
    return "paired" if isa == "avx2" and weight_bits == 4 else "plain"


def _position(layout: str, groups: int, g, chunk):
    """Where 8 consecutive elements (chunk 0..3 of group g) go in the quantized row."""
    if layout == "plain":
        return g * GROUP + chunk * 8
    half = chunk // 2 * 32
    within = chunk % 2 * 8
    paired = (g // 2) * 64 + (g % 2) * 16 + half + within
    if groups % 2 == 0:
        return paired
    # The last group of an odd count stands alone, its 32 x's in order.
    return tirx.if_then_else(g == groups - 1, g * GROUP + chunk * 8, paired)


@cache
def quantize_activations(k: int, layout: str) -> tirx.PrimFunc:
    """``x[b, k] -> (xq[b, k] int8 in `layout` (layout_for), sx4[b, k/8], xs[b, k/32])`` (see
    the module docstring), for a symbolic b; serial (a row is K floats: waking the pool costs
    more than the work)."""
    check_shape(k)
    if layout not in ("paired", "plain"):
        raise ValueError(f"W4A8: unknown activation layout {layout!r}")
    groups = k // GROUP
    batch = tirx.Var("batch", "int64")

    @T.prim_func(s_tir=True)
    def quantize(
        x: T.Buffer((batch, k), "float32"),
        xq: T.Buffer((batch, k), "int8"),
        sx4: T.Buffer((batch, groups * 4), "float32"),
        xs: T.Buffer((batch, groups), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for i in range(batch):
                for g in range(groups):
                    peak = T.alloc_buffer((8,), "float32")
                    for v in T.vectorized(8):
                        peak[v] = T.abs(x[i, g * GROUP + v])
                    for c in T.unroll(1, 4):
                        for v in T.vectorized(8):
                            peak[v] = T.max(peak[v], T.abs(x[i, g * GROUP + c * 8 + v]))
                    group = T.alloc_buffer((2,), "float32")
                    group[0] = peak[0]
                    for v in T.unroll(1, 8):
                        group[0] = T.max(group[0], peak[v])
                    scale: T.let[T.float32] = group[0] / T.float32(127)
                    inverse: T.let[T.float32] = T.if_then_else(
                        group[0] > T.float32(0), T.float32(127) / group[0], T.float32(0)
                    )
                    for v in T.vectorized(4):
                        sx4[i, g * 4 + v] = scale
                    total = T.alloc_buffer((8,), "float32")
                    for v in T.vectorized(8):
                        total[v] = T.float32(0)
                    for c in T.unroll(4):
                        for v in T.vectorized(8):
                            xq[i, _position(layout, groups, g, c) + v] = T.Cast(
                                "int8", T.round(x[i, g * GROUP + c * 8 + v] * inverse)
                            )
                            total[v] = total[v] + T.round(x[i, g * GROUP + c * 8 + v] * inverse)
                    group[1] = total[0]
                    for v in T.unroll(1, 8):
                        group[1] = group[1] + total[v]
                    # sx * sum(xq), not sum(x): m enters as m * sum of the x the dot products
                    # saw, so the product is exactly dequant(W) . dequant(xq) (llama.cpp's Q8_1
                    # sum); with sum(x) the rounding errors of d * q (q all >= 0) stop cancelling.
                    xs[i, g] = group[1] * scale

    return _finish(quantize, f"a8_quantize_{layout}_k{k}")


def _finish(func: tirx.PrimFunc, symbol: str) -> tirx.PrimFunc:
    return (
        func.with_attr(_SCHEDULED, True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr("global_symbol", symbol)
    )


def _zero(lanes: int):
    return T.Broadcast(T.float32(0), lanes)


def prefetch(buffer, *index):
    """Prefetch the cache line of `buffer[index]` for reading, into every cache level (also
    kernels/cpu_paged_attention.py's)."""
    address = T.address_of(buffer[index])
    return T.call_llvm_intrin(
        "void", "llvm.prefetch.p0", address, T.int32(0), T.int32(3), T.int32(1)
    )


def _low_nibbles(w):
    """AVX2: the low nibbles of 32 packed bytes, as int8x32 (0..15)."""
    return T.reinterpret(w & T.Broadcast(T.uint8(15), 32), dtype="int8x32")


def _high_nibbles(w):
    """AVX2: the high nibbles of 32 packed bytes, as int8x32 (0..15)."""
    return T.reinterpret(T.shift_right(w, T.Broadcast(T.uint8(4), 32)), dtype="int8x32")


def _pair_scales(d, row, pair):
    """AVX2: 8 lanes of group scales (fp16 in the planes, widened) for a pair of groups, the
    first 4 lanes group 2 * pair (the int32 sums of `_maddubs_pair` hold group 2 * pair in lanes
    0..3)."""
    both = T.Cast("float32x2", d.vload([row, 2 * pair], "float16x2"))  # one 4-byte load
    return T.Shuffle([both, both, both, both], [0, 2, 4, 6, 1, 3, 5, 7])


def _mins(m, row, chunk, lanes: int):
    """`lanes` group mins from the fp16 plane, widened (vcvtph2ps on x86, fcvtl on ARM)."""
    return T.Cast(f"float32x{lanes}", m.vload([row, chunk * lanes], f"float16x{lanes}"))


def _maddubs_pair(lo, hi, x_lo, x_hi):
    """AVX2: 8 int32 sums of q * xq over 64 bytes (lo, hi: nibbles as int8x32)."""
    pairs = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), lo, x_lo, dtype="int16x16"
    ) + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), hi, x_hi, dtype="int16x16"
    )
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
        pairs,
        T.Broadcast(T.int16(1), 16),
        dtype="int32x8",
    )


def _sdot_group(lo, hi, x_lo, x_hi):
    """ARM dotprod: 4 int32 sums of q * xq over one group (lo, hi: nibbles as int8x16)."""
    sdot = T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8")
    first = T.call_llvm_pure_intrin(sdot, T.Broadcast(T.int32(0), 4), lo, x_lo, dtype="int32x4")
    return T.call_llvm_pure_intrin(sdot, first, hi, x_hi, dtype="int32x4")


def _widened(nibbles):
    """NEON: 8 nibbles (uint8, 0..15) as int16, sign-extended from int8 (smull/smlal)."""
    return T.Cast("int16x8", T.reinterpret(nibbles, dtype="int8x8"))


@cache
def w4a8_gemv(k: int, n: int, isa: str, rows: int = ROWS) -> tirx.PrimFunc:
    """``(xq, sx4, xs) of quantize_activations, packed[n, k/2], d, m[n, k/32] -> out[b, n]``,
    `out[b, j] = sum_g (d[j, g] * sx[b, g]) * isum[b, j, g] + m[j, g] * xs[b, g]`, for a symbolic
    b, on `isa`'s integer dot product (see the module docstring). Parallel over blocks of `rows`
    output rows, which share each activation load; the last block recomputes row n - 1 where n
    is not a multiple of `rows` and stores only the rows it owns."""
    check_shape(k)
    if isa not in FAMILIES:
        raise ValueError(f"W4A8: no kernel for {isa!r}; choose from {', '.join(FAMILIES)}")
    groups = k // GROUP
    tasks = -(-n // rows)
    batch = tirx.Var("batch", "int64")
    lanes = 8 if isa == "avx2" else 4
    pairs = groups // 2 if isa == "avx2" else 0
    singles = groups % 2 if isa == "avx2" else 0  # an odd last group on x86, in scalar code
    first_single = 2 * pairs
    m_chunks = groups // lanes

    @T.prim_func(s_tir=True)
    def gemv(
        xq: T.Buffer((batch, k), "int8"),
        sx4: T.Buffer((batch, groups * 4), "float32"),
        xs: T.Buffer((batch, groups), "float32"),
        packed: T.Buffer((n, k // 2), "uint8"),
        d: T.Buffer((n, groups), "float16"),
        m: T.Buffer((n, groups), "float16"),
        out: T.Buffer((batch, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for t in T.parallel(tasks):
                for i in range(batch):
                    acc = T.alloc_buffer((rows, lanes), "float32")
                    tail = T.alloc_buffer((rows,), "float32")
                    for r in T.unroll(rows):
                        acc[r, T.ramp(0, 1, lanes)] = _zero(lanes)
                        tail[r] = T.float32(0)
                    if isa == "avx2":
                        for p in range(pairs):
                            x_lo: T.let[T.int8x32] = xq.vload([i, p * 64], "int8x32")
                            x_hi: T.let[T.int8x32] = xq.vload([i, p * 64 + 32], "int8x32")
                            sx: T.let[T.float32x8] = sx4.vload([i, p * 8], "float32x8")
                            for r in T.unroll(rows):
                                row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                                ahead: T.let[T.int32] = T.min(row + PREFETCH_ROWS, n - 1)
                                T.evaluate(prefetch(packed, ahead, p * 32))
                                w: T.let[T.uint8x32] = packed.vload([row, p * 32], "uint8x32")
                                lo: T.let[T.int8x32] = _low_nibbles(w)
                                hi: T.let[T.int8x32] = _high_nibbles(w)
                                scales: T.let[T.float32x8] = _pair_scales(d, row, p)
                                acc[r, T.ramp(0, 1, 8)] = acc[r, T.ramp(0, 1, 8)] + T.Cast(
                                    "float32x8", _maddubs_pair(lo, hi, x_lo, x_hi)
                                ) * (scales * sx)
                    if isa == "sdot":
                        for g in range(groups):
                            x_lo: T.let[T.int8x16] = xq.vload([i, g * GROUP], "int8x16")
                            x_hi: T.let[T.int8x16] = xq.vload([i, g * GROUP + 16], "int8x16")
                            sx: T.let[T.float32x4] = sx4.vload([i, g * 4], "float32x4")
                            for r in T.unroll(rows):
                                row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                                w: T.let[T.uint8x16] = packed.vload([row, g * 16], "uint8x16")
                                lo: T.let[T.int8x16] = T.reinterpret(
                                    w & T.Broadcast(T.uint8(15), 16), dtype="int8x16"
                                )
                                hi: T.let[T.int8x16] = T.reinterpret(
                                    T.shift_right(w, T.Broadcast(T.uint8(4), 16)), dtype="int8x16"
                                )
                                acc[r, T.ramp(0, 1, 4)] = acc[r, T.ramp(0, 1, 4)] + T.Cast(
                                    "float32x4", _sdot_group(lo, hi, x_lo, x_hi)
                                ) * (T.Broadcast(T.Cast("float32", d[row, g]), 4) * sx)
                    if isa == "neon":
                        for g in range(groups):
                            x0: T.let[T.int16x8] = T.Cast(
                                "int16x8", xq.vload([i, g * 32], "int8x8")
                            )
                            x1: T.let[T.int16x8] = T.Cast(
                                "int16x8", xq.vload([i, g * 32 + 8], "int8x8")
                            )
                            x2: T.let[T.int16x8] = T.Cast(
                                "int16x8", xq.vload([i, g * 32 + 16], "int8x8")
                            )
                            x3: T.let[T.int16x8] = T.Cast(
                                "int16x8", xq.vload([i, g * 32 + 24], "int8x8")
                            )
                            sx: T.let[T.float32x4] = sx4.vload([i, g * 4], "float32x4")
                            for r in T.unroll(rows):
                                row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                                w0: T.let[T.uint8x8] = packed.vload([row, g * 16], "uint8x8")
                                w1: T.let[T.uint8x8] = packed.vload([row, g * 16 + 8], "uint8x8")
                                products: T.let[T.int16x8] = (
                                    _widened(w0 & T.Broadcast(T.uint8(15), 8)) * x0
                                    + _widened(w1 & T.Broadcast(T.uint8(15), 8)) * x1
                                    + _widened(T.shift_right(w0, T.Broadcast(T.uint8(4), 8))) * x2
                                    + _widened(T.shift_right(w1, T.Broadcast(T.uint8(4), 8))) * x3
                                )
                                acc[r, T.ramp(0, 1, 4)] = acc[r, T.ramp(0, 1, 4)] + T.Cast(
                                    "float32x4",
                                    T.call_llvm_pure_intrin(
                                        T.llvm_lookup_intrinsic_id(
                                            "llvm.aarch64.neon.saddlp.v4i32.v8i16"
                                        ),
                                        products,
                                        dtype="int32x4",
                                    ),
                                ) * (T.Broadcast(T.Cast("float32", d[row, g]), 4) * sx)
                    for s in range(singles):
                        g: T.let[T.int32] = first_single + s
                        for r in T.unroll(rows):
                            row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                            isum = T.alloc_buffer((1,), "int32")
                            isum[0] = 0
                            for e in range(GROUP // 2):
                                byte: T.let[T.uint8] = packed[row, g * 16 + e]
                                isum[0] = (
                                    isum[0]
                                    + T.Cast("int32", byte & T.uint8(15))
                                    * T.Cast("int32", xq[i, g * GROUP + e])
                                    + T.Cast("int32", T.shift_right(byte, T.uint8(4)))
                                    * T.Cast("int32", xq[i, g * GROUP + 16 + e])
                                )
                            tail[r] = tail[r] + T.Cast("float32", isum[0]) * (
                                T.Cast("float32", d[row, g]) * sx4[i, g * 4]
                            )
                    for r in T.unroll(rows):
                        row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                        for c in range(m_chunks):
                            acc[r, T.ramp(0, 1, lanes)] = acc[r, T.ramp(0, 1, lanes)] + _mins(
                                m, row, c, lanes
                            ) * xs.vload([i, c * lanes], f"float32x{lanes}")
                        for g in range(m_chunks * lanes, groups):
                            tail[r] = tail[r] + T.Cast("float32", m[row, g]) * xs[i, g]
                        if t * rows + r < n:
                            half = T.alloc_buffer((4,), "float32")
                            if lanes == 8:
                                half[T.ramp(0, 1, 4)] = (
                                    acc[r, T.ramp(0, 1, 4)] + acc[r, T.ramp(4, 1, 4)]
                                )
                            else:
                                half[T.ramp(0, 1, 4)] = acc[r, T.ramp(0, 1, 4)]
                            out[i, row] = (half[0] + half[2]) + (half[1] + half[3]) + tail[r]

    return _finish(gemv, f"w4a8_gemv_{isa}_k{k}_n{n}")


#: Prompt rows per weight load in the W4A8 prefill GEMM (`w4a8_gemm`).
PROMPT_ROWS = 2


def prefill_gemm_supports(isa: str, k: int) -> bool:
    """Whether `w4a8_gemm` takes K on `isa` (AVX2, whole pairs of groups); else a prompt runs
    through `w4a8_gemv`, one row after another."""
    return isa == "avx2" and (k // GROUP) % 2 == 0 and k % GROUP == 0


@cache
def w4a8_gemm(k: int, n: int, isa: str, rows: int = ROWS, cols: int = PROMPT_ROWS):
    """`w4a8_gemv` for a prompt (many rows, AVX2): each 32-byte load of packed weights, its
    nibbles and its group scales serve `cols` prompt rows, a `rows` x `cols` register tile of
    accumulators. SmolLM2's shapes on a 2-core Zen 3: 89 GMAC/s, where the GEMV over the same
    rows does 72 (it unpacks every weight again for every row), and dequantize-then-fp32-GEMM
    reads and writes 4 bytes a weight per call (docs/benchmarks.md)."""
    if not prefill_gemm_supports(isa, k):
        raise ValueError(f"W4A8 prefill GEMM: no {isa!r} kernel for K = {k}")
    groups = k // GROUP
    pairs = groups // 2
    m_chunks = groups // 8
    tasks = -(-n // rows)
    batch = tirx.Var("batch", "int64")

    @T.prim_func(s_tir=True)
    def gemm(
        xq: T.Buffer((batch, k), "int8"),
        sx4: T.Buffer((batch, groups * 4), "float32"),
        xs: T.Buffer((batch, groups), "float32"),
        packed: T.Buffer((n, k // 2), "uint8"),
        d: T.Buffer((n, groups), "float16"),
        m: T.Buffer((n, groups), "float16"),
        out: T.Buffer((batch, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for t in T.parallel(tasks):
                for block in range((batch + cols - 1) // cols):
                    acc = T.alloc_buffer((rows, cols, 8), "float32")
                    for r in T.unroll(rows):
                        for c in T.unroll(cols):
                            acc[r, c, T.ramp(0, 1, 8)] = _zero(8)
                    for p in range(pairs):
                        for r in T.unroll(rows):
                            row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                            w: T.let[T.uint8x32] = packed.vload([row, p * 32], "uint8x32")
                            lo: T.let[T.int8x32] = _low_nibbles(w)
                            hi: T.let[T.int8x32] = _high_nibbles(w)
                            scales: T.let[T.float32x8] = _pair_scales(d, row, p)
                            for c in T.unroll(cols):
                                # a last block past the prompt repeats its last row
                                i: T.let[T.int64] = T.min(block * cols + c, batch - 1)
                                acc[r, c, T.ramp(0, 1, 8)] = acc[r, c, T.ramp(0, 1, 8)] + T.Cast(
                                    "float32x8",
                                    _maddubs_pair(
                                        lo,
                                        hi,
                                        xq.vload([i, p * 64], "int8x32"),
                                        xq.vload([i, p * 64 + 32], "int8x32"),
                                    ),
                                ) * (scales * sx4.vload([i, p * 8], "float32x8"))
                    for r in T.unroll(rows):
                        row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                        for c in T.unroll(cols):
                            i: T.let[T.int64] = T.min(block * cols + c, batch - 1)
                            for ch in range(m_chunks):
                                acc[r, c, T.ramp(0, 1, 8)] = acc[r, c, T.ramp(0, 1, 8)] + _mins(
                                    m, row, ch, 8
                                ) * xs.vload([i, ch * 8], "float32x8")
                            tail = T.alloc_buffer((1,), "float32")
                            tail[0] = T.float32(0)
                            for g in range(m_chunks * 8, groups):
                                tail[0] = tail[0] + T.Cast("float32", m[row, g]) * xs[i, g]
                            if t * rows + r < n:
                                half = T.alloc_buffer((4,), "float32")
                                half[T.ramp(0, 1, 4)] = (
                                    acc[r, c, T.ramp(0, 1, 4)] + acc[r, c, T.ramp(4, 1, 4)]
                                )
                                out[i, row] = (half[0] + half[2]) + (half[1] + half[3]) + tail[0]

    return _finish(gemm, f"w4a8_gemm_{isa}_k{k}_n{n}")


def _avx2_dot_int8(w, x):
    """AVX2: 8 int32 sums of w * xq over 32 bytes, both signed: vpmaddubsw(|w|, sign(xq, w))
    (llama.cpp's Q8_0 dot; |w| <= 127, so 2 x 127 x 127 cannot saturate)."""
    magnitude = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), w, w, dtype="int8x32"
    )
    signed_x = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), x, w, dtype="int8x32"
    )
    pairs = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
        magnitude,
        signed_x,
        dtype="int16x16",
    )
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
        pairs,
        T.Broadcast(T.int16(1), 16),
        dtype="int32x8",
    )


@cache
def w8a8_gemv(k: int, n: int, isa: str, rows: int = ROWS) -> tirx.PrimFunc:
    """``(xq, sx4) of quantize_activations ("plain"), w[n, k] int8, scale[n] -> out[b, n]``,
    `out[b, j] = scale[j] * sum_g sx[b, g] * sum_{k in g} w[j, k] * xq[b, k]`, for a symbolic
    b: decoder/quantized.py's symmetric int8 rows times the int8 activation groups, on `isa`'s
    dot product (AVX2: vpsignb + vpmaddubsw + vpmaddwd; ARM: sdot, or smull/smlal + saddlp).
    Parallel over blocks of `rows` output rows; within a block each row is read whole before the
    next (one contiguous stream the prefetcher follows, as int8_gemv: 4 rows interleaved ran
    0.7x the weight-only GEMV end to end), with two accumulators (even and odd groups) against
    the FMA latency."""
    check_shape(k)
    if isa not in FAMILIES:
        raise ValueError(f"W8A8: no kernel for {isa!r}; choose from {', '.join(FAMILIES)}")
    groups = k // GROUP
    tasks = -(-n // rows)
    batch = tirx.Var("batch", "int64")
    lanes = 8 if isa == "avx2" else 4
    steps = groups // 2
    odd = groups % 2

    @T.macro
    def group_dot(acc, slot, i, row, g, w, xq, sx4):
        if isa == "avx2":
            acc[slot, T.ramp(0, 1, 8)] = acc[slot, T.ramp(0, 1, 8)] + T.Cast(
                "float32x8",
                _avx2_dot_int8(
                    w.vload([row, g * GROUP], "int8x32"), xq.vload([i, g * GROUP], "int8x32")
                ),
            ) * T.Broadcast(sx4[i, g * 4], 8)
        if isa == "sdot":
            acc[slot, T.ramp(0, 1, 4)] = acc[slot, T.ramp(0, 1, 4)] + T.Cast(
                "float32x4",
                _sdot_group(
                    w.vload([row, g * GROUP], "int8x16"),
                    w.vload([row, g * GROUP + 16], "int8x16"),
                    xq.vload([i, g * GROUP], "int8x16"),
                    xq.vload([i, g * GROUP + 16], "int8x16"),
                ),
            ) * sx4.vload([i, g * 4], "float32x4")
        if isa == "neon":
            acc[slot, T.ramp(0, 1, 4)] = acc[slot, T.ramp(0, 1, 4)] + T.Cast(
                "float32x4",
                _saddlp(
                    _int16(w, row, g * GROUP) * _int16(xq, i, g * GROUP)
                    + _int16(w, row, g * GROUP + 8) * _int16(xq, i, g * GROUP + 8)
                )
                + _saddlp(
                    _int16(w, row, g * GROUP + 16) * _int16(xq, i, g * GROUP + 16)
                    + _int16(w, row, g * GROUP + 24) * _int16(xq, i, g * GROUP + 24)
                ),
            ) * sx4.vload([i, g * 4], "float32x4")

    @T.prim_func(s_tir=True)
    def gemv(
        xq: T.Buffer((batch, k), "int8"),
        sx4: T.Buffer((batch, groups * 4), "float32"),
        w: T.Buffer((n, k), "int8"),
        scale: T.Buffer((n,), "float32"),
        out: T.Buffer((batch, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for t in T.parallel(tasks):
                for r in range(rows):
                    for i in range(batch):
                        row: T.let[T.int32] = T.min(t * rows + r, n - 1)
                        acc = T.alloc_buffer((2, lanes), "float32")
                        acc[0, T.ramp(0, 1, lanes)] = _zero(lanes)
                        acc[1, T.ramp(0, 1, lanes)] = _zero(lanes)
                        for step in range(steps):
                            if isa == "avx2":  # a line (two groups) of the row 8 rows ahead
                                ahead: T.let[T.int32] = T.min(row + PREFETCH_ROWS, n - 1)
                                T.evaluate(prefetch(w, ahead, step * 2 * GROUP))
                            group_dot(acc, 0, i, row, 2 * step, w, xq, sx4)
                            group_dot(acc, 1, i, row, 2 * step + 1, w, xq, sx4)
                        for _ in range(odd):
                            group_dot(acc, 0, i, row, groups - 1, w, xq, sx4)
                        half = T.alloc_buffer((4,), "float32")
                        if lanes == 8:
                            half[T.ramp(0, 1, 4)] = (
                                acc[0, T.ramp(0, 1, 4)]
                                + acc[0, T.ramp(4, 1, 4)]
                                + (acc[1, T.ramp(0, 1, 4)] + acc[1, T.ramp(4, 1, 4)])
                            )
                        else:
                            half[T.ramp(0, 1, 4)] = (
                                acc[0, T.ramp(0, 1, 4)] + acc[1, T.ramp(0, 1, 4)]
                            )
                        if t * rows + r < n:
                            out[i, row] = ((half[0] + half[2]) + (half[1] + half[3])) * scale[row]

    return _finish(gemv, f"w8a8_gemv_{isa}_k{k}_n{n}")


def _saddlp(products):
    """NEON: int16x8 -> int32x4, adjacent pairs added (saddlp)."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
        products,
        dtype="int32x4",
    )


def _int16(buffer, row, start):
    """NEON: 8 int8 of `buffer[row, start:start + 8]` sign-extended to int16 (smull/smlal)."""
    return T.Cast("int16x8", buffer.vload([row, start], "int8x8"))
