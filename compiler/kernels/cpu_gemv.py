"""Weight-only int8 kernels for decoding: the GEMV that dequantizes in registers, and the
dequantization prefill's fp32 GEMM reads.

A decode step multiplies a few activation rows (`[b, K]`, b = sequences decoding together) by
every weight once, so its speed is set by the bytes each weight costs. `int8_gemv` reads the
weights as stored (int8 `W[N, K]`, one fp32 scale per output row): each task of the thread pool
takes `ROWS` output rows; per row it keeps one accumulator vector of the target's SIMD width
(8 lanes for AVX2, 16 for AVX-512, 4 for NEON), converts each loaded int8 vector to fp32 in
registers (vpmovsxbd + vcvtdq2ps on x86) and accumulates with FMAs; `ROWS` independent
accumulators hide the FMA latency and share each loaded activation vector. The scale is applied
once per output, after the reduction. K need not be a multiple of the lanes, nor N of `ROWS` (the
tail runs predicated).

`dequantize` is the prefill path: over 128-512 prompt tokens the fp32 register-blocked GEMM
(cpu_matmul.py) reuses every weight across the rows, so the int8 weights are widened once per
call into an fp32 buffer that GEMM reads (measured against W8A8 in docs/benchmarks.md).

Both functions come out scheduled (marked `tirx.is_scheduled`), so the rule-based pass leaves
them alone, and carry no fusion pattern, so FuseOps keeps them out of other kernels.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

#: Output rows per thread-pool task (independent accumulators per activation vector).
ROWS = 4
_SCHEDULED = "tirx.is_scheduled"


def int8_gemv(k: int, n: int, lanes: int, rows: int = ROWS) -> tirx.PrimFunc:
    """`out[b, n] = scale[n] * sum_k x[b, k] * float(w[n, k])` for a symbolic batch b, scheduled
    for `lanes`-wide fp32 SIMD: parallel over blocks of `rows` outputs, vectorized over K."""
    batch = tirx.Var("batch", "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, k), "int8", name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (batch, n),
        lambda i, j: te.sum(x[i, r] * w[j, r].astype("float32"), axis=r),
        name="acc",
    )
    out = te.compute((batch, n), lambda i, j: acc[i, j] * scale[j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, scale, out]))
    total = sch.get_sblock("acc")
    _, _, kk = sch.get_loops(total)
    _, k_lane = sch.split(kk, [None, lanes])
    partial = sch.rfactor(k_lane, factor_axis=2)  # partial[i, j, lane]: one vector a row
    i, j, k_outer, k_lane = sch.get_loops(partial)
    j_outer, j_inner = sch.split(j, [None, rows])
    sch.reorder(j_outer, i, k_outer, j_inner, k_lane)
    sch.parallel(j_outer)
    sch.unroll(j_inner)
    sch.vectorize(k_lane)
    # Left in "global" scope, the partial sums compact to a constant [rows, lanes] buffer that
    # becomes a stack slot (registers, after LLVM); "local" scope made it a workspace allocation
    # per task.
    init = sch.decompose_reduction(partial, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(total, i)
    sch.reverse_compute_at(sch.get_sblock("out"), i)
    return _named(sch, f"int8_gemv_k{k}_n{n}")


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


def _named(sch: s_tir.Schedule, name: str) -> tirx.PrimFunc:
    """The scheduled function, marked scheduled, under a symbol unique per shape (the layers that
    share a shape share one function)."""
    return sch.mod["main"].with_attr({_SCHEDULED: True, "global_symbol": name})
