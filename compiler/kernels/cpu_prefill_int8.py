"""W8A8 int8 GEMMs for a decoder's prefill: a symbolic number of prompt rows, int8 weights as the
decode GEMV reads them.

Why not cpu_int8.int8_gemm as the encoders call it: that kernel is built for one static row
count, its weights are packed once at load by the lifted `transform_params`, and a prefill has a
symbolic length and keeps a single copy of its int8 weights in the decode GEMV's `[N, K]`
layout (kernels/cpu_gemv.py). So here, per prefill call:

1. `quantize_rows`: each activation row quantized (asymmetric, the kernel's levels, as
   cpu_int8.quantize_rows) into `[blocks, rows, K]`: the rows padded to whole register tiles
   (`row_tile`: the kernel's `mr`, or 32 for AMX's 2 x 2 tile blocks) by repeating the last row,
   so the GEMM's row loop has no tail and its tile split needs no predicate;
2. `pack_weight`: the int8 `[N, K]` weight re-laid out as the kernel's panels
   `[N / lanes, Kp / 4, lanes, 4]` (K zero-padded to whole AMX tile rows), with its column sums
   (the zero-point correction's): a transient int8 workspace the size of the weight, a quarter of
   the fp32 copy that dequantize-then-GEMM wrote per call, and no second stored copy;
3. `int8_gemm`: the GEMM on the micro-kernel `cpu_int8.kernel_for(profile)` picks (vpmaddubsw,
   VNNI, sdot, NEON tensor intrinsics; AMX `tdpbusd` tiles through cpu_amx's helper), with the
   same dequantizing epilogue; its output keeps the padded rows, sliced off by the caller.
"""

from __future__ import annotations

from functools import cache  # kernel builders: once per shape in a process, not once per layer

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from . import cpu_amx
from .cpu_int8 import KERNEL_ATTR, OPAQUE_PATTERN, Int8Kernel, register_intrinsics


def row_tile(kernel: Int8Kernel) -> int:
    """Rows per register tile, the multiple the prompt rows are padded to."""
    return 2 * cpu_amx.TILE_ROWS if kernel.name == "amx-int8" else kernel.mr


def padded_k(kernel: Int8Kernel, k: int) -> int:
    """K as the GEMM reads it: whole AMX tile rows (64 bytes), else K itself."""
    return cpu_amx.round_up(k, cpu_amx.INT8_K) if kernel.name == "amx-int8" else k


def _finish(func: tirx.PrimFunc, name: str, symbol: str) -> tirx.PrimFunc:
    return (
        func.with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, name)
        .with_attr("global_symbol", symbol)
    )


@cache
def quantize_rows(kernel: Int8Kernel, k: int) -> tirx.PrimFunc:
    """``x[m, k] -> (q[mb, r, kp], a_scale[mb, r], a_zero[mb, r])``, ``mb = ceil(m / r)``,
    ``r = row_tile(kernel)``: per-row asymmetric quantization to the kernel's levels (min and max
    in vector registers), rows past m repeating row m - 1, columns past k zero."""
    r, kp = row_tile(kernel), padded_k(kernel, k)
    lanes = next(v for v in (16, 8, 4, 2, 1) if k % v == 0)
    chunks = k // lanes
    levels = float(kernel.a_levels)
    offset = float(kernel.a_offset)
    a_dtype = kernel.a_dtype
    m = tirx.Var("m", "int64")
    mb = (m + r - 1) // r

    @T.prim_func(s_tir=True)
    def quantize(
        x: T.Buffer((m, k), "float32"),
        q: T.Buffer((mb, r, kp), a_dtype),
        a_scale: T.Buffer((mb, r), "float32"),
        a_zero: T.Buffer((mb, r), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for b in T.parallel(mb):
                for ii in range(r):
                    i = T.min(b * r + ii, m - 1)
                    hi = T.alloc_buffer((lanes,), "float32", scope="local")
                    lo = T.alloc_buffer((lanes,), "float32", scope="local")
                    for v in T.vectorized(lanes):
                        hi[v] = x[i, v]
                        lo[v] = x[i, v]
                    for c in range(1, chunks):
                        for v in T.vectorized(lanes):
                            hi[v] = T.max(hi[v], x[i, c * lanes + v])
                            lo[v] = T.min(lo[v], x[i, c * lanes + v])
                    row = T.alloc_buffer((2,), "float32", scope="local")
                    row[0] = T.float32(0)
                    row[1] = T.float32(0)
                    for v in range(lanes):
                        row[0] = T.max(row[0], hi[v])
                        row[1] = T.min(row[1], lo[v])
                    scale = T.max((row[0] - row[1]) / T.float32(levels), T.float32(1e-12))
                    zero = T.round(-row[1] / scale)
                    inv = T.float32(1) / scale
                    a_scale[b, ii] = scale
                    a_zero[b, ii] = zero - T.float32(offset)
                    for c in range(chunks):
                        for v in T.vectorized(lanes):
                            q[b, ii, c * lanes + v] = T.Cast(
                                a_dtype,
                                T.min(
                                    T.max(T.round(x[i, c * lanes + v] * inv) + zero, T.float32(0)),
                                    T.float32(levels),
                                )
                                - T.float32(offset),
                            )
                    for c in range(k, kp):
                        q[b, ii, c] = T.Cast(a_dtype, 0)

    return _finish(quantize, f"{kernel.name}-quantize", f"prefill_quantize_{kernel.name}_k{k}")


@cache
def pack_weight(kernel: Int8Kernel, n: int, k: int) -> tirx.PrimFunc:
    """``w[n, k] -> (packed[n / lanes, kp / 4, lanes, 4], colsum[n])``: the panels the GEMM reads
    (K zero-padded to `padded_k`) and each output row's sum of int8 weights, parallel over
    panels."""
    lanes, kp = kernel.lanes, padded_k(kernel, k)
    chunk = next(v for v in (32, 16, 8, 4, 2, 1) if k % v == 0)

    @T.prim_func(s_tir=True)
    def pack(
        w: T.Buffer((n, k), "int8"),
        packed: T.Buffer((n // lanes, kp // 4, lanes, 4), "int8"),
        colsum: T.Buffer((n,), "int32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for jb in T.parallel(n // lanes):
                for ko in range(kp // 4):
                    for jl in range(lanes):
                        for ki in T.vectorized(4):
                            packed[jb, ko, jl, ki] = T.if_then_else(
                                ko * 4 + ki < k, w[jb * lanes + jl, ko * 4 + ki], T.int8(0)
                            )
                for jl in range(lanes):
                    acc = T.alloc_buffer((chunk,), "int32", scope="local")
                    for v in T.vectorized(chunk):
                        acc[v] = 0
                    for c in range(k // chunk):
                        for v in T.vectorized(chunk):
                            acc[v] = acc[v] + T.Cast("int32", w[jb * lanes + jl, c * chunk + v])
                    total = T.alloc_buffer((1,), "int32", scope="local")
                    total[0] = 0
                    for v in range(chunk):
                        total[0] = total[0] + acc[v]
                    colsum[jb * lanes + jl] = total[0]

    return _finish(pack, f"{kernel.name}-pack", f"prefill_pack_{kernel.name}_n{n}_k{k}")


@cache
def int8_gemm(kernel: Int8Kernel, n: int, k: int) -> tirx.PrimFunc:
    """``(q[mb, r, kp], packed, colsum[n], w_scale[n], a_scale[mb, r], a_zero[mb, r]) ->
    out[mb, r, n]`` for a symbolic `mb`: cpu_int8.int8_gemm's schedule (column panels outside
    row tiles, an `r` x `nv` vector register tile, the epilogue per tile), or AMX tiles."""
    if kernel.name == "amx-int8":
        return _amx_gemm(n, k)
    register_intrinsics()
    lanes, r = kernel.lanes, row_tile(kernel)
    mb = tirx.Var("mb", "int64")
    a = te.placeholder((mb, r, k), kernel.a_dtype, name="a")
    b = te.placeholder((n // lanes, k // 4, lanes, 4), "int8", name="b_packed")
    colsum = te.placeholder((n,), "int32", name="colsum")
    w_scale = te.placeholder((n,), "float32", name="w_scale")
    a_scale = te.placeholder((mb, r), "float32", name="a_scale")
    a_zero = te.placeholder((mb, r), "float32", name="a_zero")
    ko = te.reduce_axis((0, k // 4), "ko")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute(
        (mb, r, n // lanes, lanes),
        lambda io, ii, jb, jl: te.sum(
            a[io, ii, ko * 4 + ki].astype("int32") * b[jb, ko, jl, ki].astype("int32"),
            axis=[ko, ki],
        ),
        name="acc",
    )
    out = te.compute(
        (mb, r, n),
        lambda io, ii, j: (
            (
                acc[io, ii, j // lanes, j % lanes].astype("float32")
                - a_zero[io, ii] * colsum[j].astype("float32")
            )
            * (a_scale[io, ii] * w_scale[j])
        ),
        name="out",
    )
    sch = s_tir.Schedule(te.create_prim_func([a, b, colsum, w_scale, a_scale, a_zero, out]))
    block = sch.get_sblock("acc")
    io, ii, jb, jl, ko_loop, ki_loop = sch.get_loops(block)
    nv = next(d for d in range(min(kernel.nv, n // lanes), 0, -1) if (n // lanes) % d == 0)
    jo, jv = sch.split(jb, [None, nv])
    # Column panels outside row tiles: a B panel (nv x lanes columns) stays in L1 while every
    # row tile of the prompt uses it.
    sch.reorder(jo, io, ko_loop, ii, jv, jl, ki_loop)
    tile = sch.fuse(jo, io)
    sch.parallel(tile)
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    init = sch.decompose_reduction(block, ko_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(jl, kernel.intrin)
    sch.unroll(ii)
    if nv > 1:
        sch.unroll(jv)
    return _finish(sch.mod["main"], kernel.name, f"prefill_int8_gemm_{kernel.name}_n{n}_k{k}")


def _amx_gemm(n: int, k: int, make_helper: cpu_amx.HelperFactory | None = None):
    """cpu_amx.amx_int8_gemm over a symbolic number of 32-row blocks: 2 x 2 (or 2 x 1) tiles of
    `tdpbusd` per block, the epilogue from the block's int32 buffer."""
    kp = padded_k(cpu_amx.AMX_INT8, k)
    rb = 2 * cpu_amx.TILE_ROWS
    nt = 2 if (n // cpu_amx.LANES) % 2 == 0 else 1
    cb = nt * cpu_amx.LANES
    col_blocks = n // cb
    helper, ir = cpu_amx._helper("int8", 2, nt, make_helper)
    panel_bytes = kp // 4 * cpu_amx.TILE_BYTES
    mb = tirx.Var("mb", "int64")

    @T.prim_func(s_tir=True)
    def gemm(
        a: T.Buffer((mb, rb, kp), "uint8"),
        b: T.Buffer((n // cpu_amx.LANES, kp // 4, cpu_amx.LANES, 4), "int8"),
        colsum: T.Buffer((n,), "int32"),
        w_scale: T.Buffer((n,), "float32"),
        a_scale: T.Buffer((mb, rb), "float32"),
        a_zero: T.Buffer((mb, rb), "float32"),
        out: T.Buffer((mb, rb, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for block in T.parallel(mb * col_blocks, annotations={"pragma_import_llvm": ir}):
                acc = T.alloc_buffer((rb, cb), "int32")
                io = block % mb  # column panels outside row blocks: a panel stays in L2
                jo = block // mb
                T.evaluate(
                    T.call_extern(
                        "void",
                        helper,
                        acc.access_ptr("w"),
                        a.access_ptr("r", offset=io * rb * kp),
                        T.int64(kp),
                        b.access_ptr("r", offset=jo * nt * panel_bytes),
                        T.int64(panel_bytes),
                        T.int64(kp // cpu_amx.INT8_K),
                    )
                )
                for ii in range(rb):
                    for jj in T.vectorized(cb):
                        out[io, ii, jo * cb + jj] = (
                            T.Cast("float32", acc[ii, jj])
                            - a_zero[io, ii] * T.Cast("float32", colsum[jo * cb + jj])
                        ) * (a_scale[io, ii] * w_scale[jo * cb + jj])

    symbol = f"prefill_int8_gemm_amx_n{n}_k{k}" + ("" if make_helper is None else "_emulated")
    return _finish(gemm, "amx-int8", symbol)


def amx_gemm(n: int, k: int, make_helper: cpu_amx.HelperFactory | None = None):
    """The AMX prefill GEMM; `make_helper` links an emulation of the tiles (tests only)."""
    return _amx_gemm(n, k, make_helper)


def supports(kernel: Int8Kernel | None, n: int, k: int) -> bool:
    """Whether a weight [n, k] can take this path (whole vector panels, whole k groups)."""
    return kernel is not None and n % kernel.lanes == 0 and k % 4 == 0


__all__ = ["amx_gemm", "int8_gemm", "pack_weight", "quantize_rows", "row_tile", "supports"]
