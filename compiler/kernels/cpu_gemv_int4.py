"""Weight-only int4 kernels for decoding: the GEMV that unpacks nibbles in registers, and the
dequantization that prefill's fp32 GEMM and the embedding gather read.

The layout (decoder/quantized_int4.py) is GGUF's Q4_0/Q4_1 block split into planes: groups of
`GROUP` = 32 weights along K, `w = d * q + m` with q in 0..15; `packed[n, K/2]` uint8 holds, in
each group's 16 bytes, element j in the low nibble of byte j and element j + 16 in its high
nibble; `d[n, K/32]` and `m[n, K/32]` fp16 (as GGUF stores them), widened to fp32 per group.

`int4_gemv` is int8_gemv's schedule (kernels/cpu_gemv.py: `ROWS` output rows per thread-pool
task, each row read as one contiguous stream) over nibbles, with d and m applied per group: per
row and group, the `GROUP / lanes` vectors of x * q (8 lanes AVX2, 16 AVX-512, 4 NEON; each
reads consecutive bytes of one group half at a constant shift: load, shift, AND 0xF, widen,
convert, FMA; the low- and high-nibble halves share one load) are summed in registers, then
one FMA with the group's d joins the row's accumulator; m enters as `m * sum(x over the group)`,
the group sums of x computed once per call, not per row. Against the first schedule (`q * d + m`
dequantized per weight, then the FMA with x) that is one vector FMA less per `lanes` weights;
measured single-threaded on Zen 3, 1.05-1.8x faster per shape, equal on 1536 x 576
(docs/benchmarks.md).

Decoding on a CPU profile with an int8 kernel runs W4A8 instead (cpu_gemv_a8.py: integer dots,
about 7 vector instructions per 32 weights against ~17 here); `int4_gemv` stays for the others.

Both functions come out scheduled and under a per-shape symbol, as cpu_gemv's do.
"""

from __future__ import annotations

from functools import cache  # kernel builders: once per shape in a process, not once per layer

from tvm import s_tir, te, tirx

from .cpu_gemv import ROWS, _halved, _named

#: Weights per group (one d and one m each): GGUF's Q4_0/Q4_1 block size.
GROUP = 32


def _nibble(packed: te.Tensor, row, kk) -> tirx.PrimExpr:
    """q[row, kk] (0..15) of the GGUF in-block order, as fp32."""
    group, j = kk // GROUP, kk % GROUP
    byte = packed[row, group * (GROUP // 2) + j % (GROUP // 2)]
    shifted = tirx.shift_right(byte, (j // (GROUP // 2) * 4).astype("uint8"))
    return (shifted & tirx.const(15, "uint8")).astype("float32")


def check_shape(k: int, what: str = "the weight") -> None:
    if k % GROUP:
        raise ValueError(
            f"int4: {what} has K = {k}, not a multiple of the group size {GROUP}; "
            "build this model with --precision int8 or fp32"
        )


@cache
def int4_gemv(k: int, n: int, lanes: int, rows: int = ROWS) -> tirx.PrimFunc:
    """`out[b, n] = sum_g d[n, g] * sum_{k in g} x[b, k] * q[n, k] + m[n, g] * xs[b, g]` for a
    symbolic batch, with `xs[b, g]` the sum of x over group g, computed once per call; scheduled
    for `lanes`-wide fp32 SIMD (see the module docstring). K a multiple of 32; N not necessarily
    of `rows` (the tail runs predicated)."""
    check_shape(k)
    groups, per = k // GROUP, GROUP // lanes
    batch = tirx.Var("batch", "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    packed = te.placeholder((n, k // 2), "uint8", name="packed")
    d = te.placeholder((n, groups), "float16", name="d")
    m = te.placeholder((n, groups), "float16", name="m")
    within = te.reduce_axis((0, GROUP), name="within")
    xs = te.compute(
        (batch, groups), lambda i, g: te.sum(x[i, g * GROUP + within], axis=within), name="xs"
    )
    vec = te.reduce_axis((0, per), name="vec")
    group_dot = te.compute(  # x . q within one group, `lanes` partial sums
        (batch, n, groups, lanes),
        lambda i, j, g, v: te.sum(
            x[i, g * GROUP + vec * lanes + v] * _nibble(packed, j, g * GROUP + vec * lanes + v),
            axis=vec,
        ),
        name="group_dot",
    )
    g_axis = te.reduce_axis((0, groups), name="g")
    partial = te.compute(
        (batch, n, lanes),
        lambda i, j, v: te.sum(
            d[j, g_axis].astype("float32") * group_dot[i, j, g_axis, v], axis=g_axis
        ),
        name="partial",
    )
    g_min = te.reduce_axis((0, groups), name="g_min")
    mins = te.compute(
        (batch, n),
        lambda i, j: te.sum(m[j, g_min].astype("float32") * xs[i, g_min], axis=g_min),
        name="mins",
    )
    halves, total = [], partial
    while total.shape[-1] > 1:
        total = _halved(total)
        halves.append(total.op.name)
    out = te.compute((batch, n), lambda i, j: total[i, j, 0] + mins[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, packed, d, m, out]))
    block = sch.get_sblock("partial")
    i, j, v, g = sch.get_loops(block)
    j_outer, j_inner = sch.split(j, [None, rows])
    sch.reorder(j_outer, j_inner, i, g, v)
    sch.parallel(j_outer)
    sch.vectorize(v)
    dot = sch.get_sblock("group_dot")
    sch.compute_at(dot, g)
    dot_lane, dot_vec = sch.get_loops(dot)[-2:]
    sch.reorder(dot_vec, dot_lane)
    sch.unroll(dot_vec)
    sch.vectorize(dot_lane)
    # Left in "global" scope, the partial sums compact to a constant buffer per row that becomes
    # registers after LLVM (as in int8_gemv).
    init = sch.decompose_reduction(block, g)
    sch.vectorize(sch.get_loops(init)[-1])
    dot_init = sch.decompose_reduction(dot, dot_vec)
    sch.vectorize(sch.get_loops(dot_init)[-1])
    for name in halves:
        sch.reverse_compute_at(sch.get_sblock(name), i)
        for loop in sch.get_loops(sch.get_sblock(name))[3:]:
            sch.unroll(loop)
    sch.parallel(sch.get_loops(sch.get_sblock("mins"))[1])
    return _named(sch, f"int4_gemv_k{k}_n{n}")


@cache
def int4_dequantize(k: int, n, lanes: int) -> tirx.PrimFunc:
    """`out[n, k] = d[n, k/32] * q[n, k] + m[n, k/32]` (n an int, or None for a symbolic row
    count: the embedding's gathered rows): parallel over rows, vectorized along K."""
    check_shape(k)
    rows = tirx.Var("rows", "int64") if n is None else n
    packed = te.placeholder((rows, k // 2), "uint8", name="packed")
    d = te.placeholder((rows, k // GROUP), "float16", name="d")
    m = te.placeholder((rows, k // GROUP), "float16", name="m")
    out = te.compute(
        (rows, k),
        lambda r, c: (
            _nibble(packed, r, c) * d[r, c // GROUP].astype("float32")
            + m[r, c // GROUP].astype("float32")
        ),
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
