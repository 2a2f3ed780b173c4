"""Weight-only int4 kernels for decoding: the GEMV that unpacks nibbles in registers, and the
dequantization that prefill's fp32 GEMM and the embedding gather read.

The layout (decoder/quantized_int4.py) is GGUF's Q4_0/Q4_1 block split into planes: groups of
`GROUP` = 32 weights along K, `w = d * q + m` with q in 0..15; `packed[n, K/2]` uint8 holds, in
each group's 16 bytes, element j in the low nibble of byte j and element j + 16 in its high
nibble; `d[n, K/32]` and `m[n, K/32]` fp32.

`int4_gemv` is int8_gemv's schedule (kernels/cpu_gemv.py: `ROWS` output rows per thread-pool
task, each row read as one contiguous stream, `accumulators` SIMD vectors per row, partial sums
added pairwise) over nibbles: a chunk of K is a whole number of groups, so within the unrolled
accumulators each vector reads 8 (AVX2) / 16 (AVX-512) / 4 (NEON) consecutive bytes of one
group half at a constant shift (0 for the low nibbles, 4 for the high): load, shift, AND 0xF,
widen, convert, then `q * d + m` and the FMA with x, d and m broadcast per group. The group's
sum of x (to apply m once per group, `m * sum(x)`) would not save a vector operation here: with
fp32 activations the group scale d must still meet every product, so per weight it is two
vector FMAs either way, and the in-register `q * d + m` needs no second pass over x.

Both functions come out scheduled and under a per-shape symbol, as cpu_gemv's do.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .cpu_gemv import ACCUMULATORS, ROWS, _halved, _named

#: Weights per group (one d and one m each): GGUF's Q4_0/Q4_1 block size.
GROUP = 32


def _nibble(packed: te.Tensor, row, kk) -> tirx.PrimExpr:
    """q[row, kk] (0..15) of the GGUF in-block order, as fp32."""
    group, j = kk // GROUP, kk % GROUP
    byte = packed[row, group * (GROUP // 2) + j % (GROUP // 2)]
    shifted = tirx.shift_right(byte, (j // (GROUP // 2) * 4).astype("uint8"))
    return (shifted & tirx.const(15, "uint8")).astype("float32")


def accumulators_for(lanes: int) -> int:
    """Accumulator vectors per row: at least `ACCUMULATORS`, and a chunk of whole groups."""
    acc = ACCUMULATORS
    while (acc * lanes) % GROUP:
        acc *= 2
    return acc


def check_shape(k: int, what: str = "the weight") -> None:
    if k % GROUP:
        raise ValueError(
            f"int4: {what} has K = {k}, not a multiple of the group size {GROUP}; "
            "build this model with --precision int8 or fp32"
        )


def int4_gemv(k: int, n: int, lanes: int, rows: int = ROWS) -> tirx.PrimFunc:
    """`out[b, n] = sum_k x[b, k] * (d[n, k/32] * q[n, k] + m[n, k/32])` for a symbolic batch,
    scheduled for `lanes`-wide fp32 SIMD (see the module docstring); K a multiple of 32, not
    necessarily of the chunk, N not necessarily of `rows` (the tails run predicated)."""
    check_shape(k)
    accumulators = accumulators_for(lanes)
    width = accumulators * lanes
    groups = k // GROUP
    batch = tirx.Var("batch", "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    packed = te.placeholder((n, k // 2), "uint8", name="packed")
    d = te.placeholder((n, groups), "float32", name="d")
    m = te.placeholder((n, groups), "float32", name="m")
    chunk = te.reduce_axis((0, -(-k // width)), name="chunk")

    def product(i, j, v):
        kk = chunk * width + v
        if k % width:  # the tail: keep every index in bounds, zero the term
            kk = tirx.min(kk, k - 1)
        g = kk // GROUP
        term = x[i, kk] * (_nibble(packed, j, kk) * d[j, g] + m[j, g])
        if k % width == 0:
            return term
        return tirx.if_then_else(chunk * width + v < k, term, tirx.const(0.0, "float32"))

    partial = te.compute(
        (batch, n, width),
        lambda i, j, v: te.sum(product(i, j, v), axis=chunk),
        name="partial",
    )
    halves, total = [], partial
    while total.shape[-1] > 1:
        total = _halved(total)
        halves.append(total.op.name)
    out = te.compute((batch, n), lambda i, j: total[i, j, 0], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, packed, d, m, out]))
    block = sch.get_sblock("partial")
    i, j, v, c = sch.get_loops(block)
    j_outer, j_inner = sch.split(j, [None, rows])
    v_acc, v_lane = sch.split(v, [accumulators, lanes])
    sch.reorder(j_outer, j_inner, i, c, v_acc, v_lane)
    sch.parallel(j_outer)
    sch.unroll(v_acc)
    sch.vectorize(v_lane)
    init = sch.decompose_reduction(block, c)
    sch.vectorize(sch.get_loops(init)[-1])
    for name in halves:
        sch.reverse_compute_at(sch.get_sblock(name), i)
    sch.reverse_compute_at(sch.get_sblock("out"), i)
    for name in halves:
        for loop in sch.get_loops(sch.get_sblock(name))[3:]:
            sch.unroll(loop)
    return _named(sch, f"int4_gemv_k{k}_n{n}")


def int4_dequantize(k: int, n, lanes: int) -> tirx.PrimFunc:
    """`out[n, k] = d[n, k/32] * q[n, k] + m[n, k/32]` (n an int, or None for a symbolic row
    count: the embedding's gathered rows): parallel over rows, vectorized along K."""
    check_shape(k)
    rows = tirx.Var("rows", "int64") if n is None else n
    packed = te.placeholder((rows, k // 2), "uint8", name="packed")
    d = te.placeholder((rows, k // GROUP), "float32", name="d")
    m = te.placeholder((rows, k // GROUP), "float32", name="m")
    out = te.compute(
        (rows, k),
        lambda r, c: _nibble(packed, r, c) * d[r, c // GROUP] + m[r, c // GROUP],
        name="out",
    )
    sch = s_tir.Schedule(te.create_prim_func([packed, d, m, out]))
    r, c = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(r)
    _, c_half, c_lane = sch.split(c, [None, 2, GROUP // 2])
    sch.unroll(c_half)
    if (GROUP // 2) % lanes == 0:
        _, lane = sch.split(c_lane, [None, lanes])
        sch.vectorize(lane)
    suffix = "" if n is None else f"_n{n}"
    return _named(sch, f"int4_dequantize_k{k}{suffix}")
