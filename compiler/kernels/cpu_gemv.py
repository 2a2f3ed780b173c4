"""Weight-only int8 kernels for decoding: the GEMV that dequantizes in registers, and the
dequantization prefill's fp32 GEMM reads.

A decode step multiplies a few activation rows (`[b, K]`, b = sequences decoding together) by
every weight once, so its speed is set by the bytes each weight costs. `int8_gemv` reads the
weights as stored (int8 `W[N, K]`, one fp32 scale per output row): each task of the thread pool
takes `ROWS` output rows and reads each row as one contiguous stream; per row it keeps
`ACCUMULATORS` vectors of the target's SIMD width (8 lanes for AVX2, 16 for AVX-512, 4 for
NEON), converts each loaded int8 vector to fp32 in registers (vpmovsxbd + vcvtdq2ps on x86) and
accumulates with FMAs. Rows read one after another (not 4 rows interleaved, 576 bytes each) let
the hardware prefetcher see one stream: on Zen 3 with the weights out of cache this doubled the
GEMV's bandwidth (docs/benchmarks.md). The partial sums are added pairwise, since a serial chain
of scalar adds per row cost as much as the row's FMAs. The scale is applied once per output.
K need not be a multiple of the chunk, nor N of `ROWS` (the tails run predicated).

Where the profile has an int8 kernel, decode runs W8A8 instead (cpu_gemv_a8.py: the activation
row quantized to int8, llama.cpp's Q8_0 dot); `int8_gemv` stays for the other profiles.

`dequantize` is the prefill path of a profile without an int8 GEMM kernel (or a shape its
panels do not divide): the int8 weights widened once per call into an fp32 buffer that the fp32
register-blocked GEMM (cpu_matmul.py) reads. Where the profile has one, prefill runs W8A8
instead (cpu_prefill_int8.py), measured faster (docs/benchmarks.md).

Both functions come out scheduled (marked `tirx.is_scheduled`), so the rule-based pass leaves
them alone, and carry no fusion pattern, so FuseOps keeps them out of other kernels.
"""

from __future__ import annotations

from functools import cache  # kernel builders: once per shape in a process, not once per layer

from tvm import s_tir, te, tirx

#: Output rows per thread-pool task.
ROWS = 4
#: Independent accumulator vectors per row (hide the FMA latency along K).
ACCUMULATORS = 4
_SCHEDULED = "tirx.is_scheduled"


@cache
def int8_gemv(
    k: int, n: int, lanes: int, rows: int = ROWS, accumulators: int = ACCUMULATORS
) -> tirx.PrimFunc:
    """`out[b, n] = scale[n] * sum_k x[b, k] * float(w[n, k])` for a symbolic batch b, scheduled
    for `lanes`-wide fp32 SIMD (`row_stream_gemv`)."""
    return row_stream_gemv(k, n, lanes, "int8", rows, accumulators)


@cache
def fp32_gemv(
    k: int, n: int, lanes: int, rows: int = ROWS, accumulators: int = ACCUMULATORS
) -> tirx.PrimFunc:
    """`out[b, n] = sum_k x[b, k] * w[n, k]` for a symbolic batch b, scheduled as
    `row_stream_gemv`: the fp32 decoder's tied LM head, which reads the embedding table as
    stored (decoder/dense.py)."""
    return row_stream_gemv(k, n, lanes, "float32", rows, accumulators)


@cache
def packed_gemv(k: int, n: int, panel: int, lanes: int, splits: int = ACCUMULATORS):
    """`out[b, j] = sum_k x[b, k] * w[j // panel, k, j % panel]` for a symbolic batch b, over
    weights packed in panels of `panel` columns (pack_weights.py's layout, the one the prompt's
    GEMM reads): the fp32 decoder's one-token products (decoder/dense.py).

    A task takes one panel, a contiguous [K, panel] stream; K is split `splits` ways
    (k = chunk * splits + u) so that `splits` x panel/lanes accumulator vectors hide the FMA
    latency, and the splits are added pairwise at the end, lane by lane: no horizontal sums.
    With SmolLM2's weights out of cache on a 2-core Zen 3 this read 32-37 GB/s, against 23-33
    for the row-stream GEMV over [N, K] and 10-20 for the rule-based GEMM, which re-packed a
    panel on every call (docs/benchmarks.md)."""
    batch = tirx.Var("batch", "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n // panel, k, panel), "float32", name="w")
    chunk = te.reduce_axis((0, -(-k // splits)), name="chunk")

    def product(i, p, u, lane):
        kk = chunk * splits + u
        term = x[i, kk] * w[p, kk, lane]
        if k % splits == 0:
            return term
        return tirx.if_then_else(kk < k, term, tirx.const(0.0, "float32"))

    partial = te.compute(
        (batch, n // panel, splits, panel),
        lambda i, p, u, lane: te.sum(product(i, p, u, lane), axis=chunk),
        name="partial",
    )
    halves, total = [], partial
    while total.shape[2] > 1:
        total = _halved_splits(total)
        halves.append(total.op.name)
    out = te.compute((batch, n), lambda i, j: total[i, j // panel, 0, j % panel], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, out]))
    block = sch.get_sblock("partial")
    i, p, u, lane, c = sch.get_loops(block)
    sch.reorder(p, i, c, u, lane)
    sch.parallel(p)
    sch.unroll(u)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, c)
    sch.vectorize(sch.get_loops(init)[-1])
    for name in halves:
        sum_block = sch.get_sblock(name)
        sch.reverse_compute_at(sum_block, i)
        *spatial, lane, pair = sch.get_loops(sum_block)[2:]
        sch.reorder(pair, lane)  # the pair outside, the panel's lanes a vector
        for loop in (*spatial, pair):
            sch.unroll(loop)
        sch.vectorize(lane)
    sch.reverse_compute_at(sch.get_sblock("out"), i)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    return _named(sch, f"fp32_packed_gemv_k{k}_n{n}_p{panel}")


def _halved_splits(partial: te.Tensor) -> te.Tensor:
    """`partial[i, p, u, lane] + partial[i, p, u + half, lane]`: one level of the pairwise sum
    over the K splits of `packed_gemv`."""
    batch, panels, splits, panel = partial.shape
    half = splits // 2
    pair = te.reduce_axis((0, 2), name=f"pair{half}")
    return te.compute(
        (batch, panels, half, panel),
        lambda i, p, u, lane: te.sum(partial[i, p, pair * half + u, lane], axis=pair),
        name=f"split_sum{half}",
    )


def row_stream_gemv(
    k: int, n: int, lanes: int, weight_dtype: str, rows: int, accumulators: int
) -> tirx.PrimFunc:
    """The GEMV over `w[n, k]` of `weight_dtype` (int8: times one scale per output row; float32:
    unscaled), scheduled for `lanes`-wide fp32 SIMD: parallel over blocks of `rows` outputs;
    each row is read as one contiguous stream in chunks of `accumulators * lanes` weights, and
    the partial sums are added pairwise (a tree, not a serial chain of scalar adds)."""
    scaled = weight_dtype != "float32"
    width = accumulators * lanes
    batch = tirx.Var("batch", "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, k), weight_dtype, name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    chunk = te.reduce_axis((0, -(-k // width)), name="chunk")

    def product(i, j, v):
        kk = chunk * width + v
        term = x[i, kk] * w[j, kk].astype("float32")
        if k % width == 0:
            return term
        return tirx.if_then_else(kk < k, term, tirx.const(0.0, "float32"))

    partial = te.compute(
        (batch, n, width),
        lambda i, j, v: te.sum(product(i, j, v), axis=chunk),
        name="partial",
    )
    halves, total = [], partial
    while total.shape[-1] > 1:
        total = _halved(total)
        halves.append(total.op.name)
    if scaled:
        out = te.compute((batch, n), lambda i, j: total[i, j, 0] * scale[j], name="out")
        args = [x, w, scale, out]
    else:
        out = te.compute((batch, n), lambda i, j: total[i, j, 0], name="out")
        args = [x, w, out]
    sch = s_tir.Schedule(te.create_prim_func(args))
    block = sch.get_sblock("partial")
    i, j, v, c = sch.get_loops(block)
    j_outer, j_inner = sch.split(j, [None, rows])
    v_acc, v_lane = sch.split(v, [accumulators, lanes])
    sch.reorder(j_outer, j_inner, i, c, v_acc, v_lane)
    sch.parallel(j_outer)
    sch.unroll(v_acc)
    sch.vectorize(v_lane)
    # Left in "global" scope, the partial sums compact to a constant buffer per row that becomes
    # registers after LLVM; "local" scope made it a workspace allocation per task.
    init = sch.decompose_reduction(block, c)
    sch.vectorize(sch.get_loops(init)[-1])
    for name in halves:
        sch.reverse_compute_at(sch.get_sblock(name), i)
    sch.reverse_compute_at(sch.get_sblock("out"), i)
    for name in halves:
        for loop in sch.get_loops(sch.get_sblock(name))[3:]:
            sch.unroll(loop)
    prefix = "int8" if scaled else "fp32"
    return _named(sch, f"{prefix}_gemv_k{k}_n{n}")


def _halved(partial: te.Tensor) -> te.Tensor:
    """`partial[..., v] + partial[..., v + half]`: one level of the pairwise sum."""
    batch, n, width = partial.shape
    half = width // 2
    pair = te.reduce_axis((0, 2), name=f"pair{half}")
    return te.compute(
        (batch, n, half),
        lambda i, j, v: te.sum(partial[i, j, pair * half + v], axis=pair),
        name=f"sum{half}",
    )


@cache
def dequantize(k: int, n: int, lanes: int) -> tirx.PrimFunc:
    """`out[n, k] = float(w[n, k]) * scale[n]`: parallel over rows, vectorized along K."""
    w = te.placeholder((n, k), "int8", name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    out = te.compute((n, k), lambda j, c: w[j, c].astype("float32") * scale[j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([w, scale, out]))
    j, c = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(j)
    if k % lanes == 0:
        _, c_lane = sch.split(c, [None, lanes])
        sch.vectorize(c_lane)
    return _named(sch, f"int8_dequantize_k{k}_n{n}")


def int8_rows(full: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """(int8 q [N, K], fp32 scale [N]) of fp32 rows `full` [N, K]: symmetric per row, scale
    max|row| / 127 (1 for an all-zero row), q = rint(w / scale) in -127..127, as
    decoder/quantized.quantize_rows does in NumPy. Unscheduled (the rule-based pass schedules
    it): an int4 artifact runs it once, in `transform_params` (decoder/quantized_int4.py)."""
    n, k = full.shape
    c = te.reduce_axis((0, k), name="c")
    peak = te.compute((n,), lambda j: te.max(tirx.abs(full[j, c]), axis=c), name="peak")
    scale = te.compute(
        (n,),
        lambda j: tirx.Select(peak[j] > 0, peak[j] / tirx.const(127.0, "float32"), 1.0),
        name="row_scale",
    )
    q = te.compute(
        (n, k),
        lambda j, i: tirx.max(
            tirx.min(tirx.nearbyint(full[j, i] / scale[j]), tirx.const(127.0, "float32")),
            tirx.const(-127.0, "float32"),
        ).astype("int8"),
        name="rows_int8",
    )
    return q, scale


def _named(sch: s_tir.Schedule, name: str) -> tirx.PrimFunc:
    """The scheduled function, marked scheduled, under a symbol unique per shape (the layers that
    share a shape share one function)."""
    return sch.mod["main"].with_attr({_SCHEDULED: True, "global_symbol": name})
