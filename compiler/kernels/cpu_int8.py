"""int8 GEMM kernels for CPUs: one hand-scheduled micro-kernel per instruction set.

Why hand-scheduled: the int8 product only pays when the inner loop is the CPU's dot-product
instruction, and LLVM does not find those from a plain loop nest. Each kernel is a TE GEMM
``C[m, n] = sum_k A[m, k] * B[n, k]`` (A 8-bit activations, B int8 weights packed as
``[N / lanes, K / 4, lanes, 4]``) whose 1 x lanes x 4 inner block is tensorized with the
instruction below, register-blocked ``mr`` rows by ``nv`` vectors, parallel over tiles, and
followed by the dequantizing epilogue inside the tile:

    out[m, n] = (C[m, n] - a_zero[m] * colsum[n]) * a_scale[m] * w_scale[n]

| kernel        | instruction                  | lanes | A      | activation levels |
|---------------|------------------------------|-------|--------|-------------------|
| amx-int8      | tdpbusd (cpu_amx.py)         | 16    | uint8  | 255               |
| avx512-vnni   | vpdpbusd zmm                 | 16    | uint8  | 255               |
| avx-vnni      | vpdpbusd ymm (VEX)           | 8     | uint8  | 255               |
| avx512bw      | vpmaddubsw + vpmaddwd zmm    | 16    | uint8  | 127 (see below)   |
| avx2          | vpmaddubsw + vpmaddwd ymm    | 8     | uint8  | 127               |
| arm-sdot      | sdot                         | 4     | int8   | 255 (u - 128)     |
| arm-neon      | smull + saddlp + addp        | 4     | int8   | 255 (u - 128)     |

vpmaddubsw adds two u8 x s8 products into a saturating int16: with 8-bit activations and
weights (2 x 255 x 127) it can overflow, so those kernels quantize activations to 7 bits
(2 x 127 x 127 < 32767). Weights are 8-bit symmetric everywhere, so every int8 artifact reads the
same quantized weights. TVM 0.27's own `dot_16x4_vnni` no longer matches the signature of its
LLVM's vpdpbusd (which now takes byte vectors), hence our own implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import tvm
from tvm import s_tir, te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvmdeploy.targets import Profile

from .cpu_target import largest_divisor
from .tensor_intrin import import_tensor_intrinsics

#: Marks a hand-scheduled kernel (int8 here, bf16 in cpu_bf16.py): never fused, never tuned.
KERNEL_ATTR = "tvmdeploy.kernel"
OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the function alone
MIN_PARALLEL_MACS = 1 << 19
ROW_BLOCK = 256


@dataclass(frozen=True)
class Int8Kernel:
    """How one instruction set computes the int8 GEMM, and what the quantizer must produce."""

    name: str
    intrin: str  # the TensorIntrin that computes a 1 x lanes x 4 block
    lanes: int  # int32 accumulators per vector register
    a_dtype: str  # "uint8" or "int8" (stored as u - 128)
    a_levels: int  # quantization levels of activations (255, or 127 where vpmaddubsw saturates)
    mr: int  # rows per register tile
    nv: int  # vectors per register tile row

    @property
    def a_offset(self) -> int:
        """What is subtracted from the unsigned quantized activation before it is stored."""
        return 128 if self.a_dtype == "int8" else 0


KERNELS = {
    # AMX tiles (cpu_amx.py): its own GEMM; the quantizer's facts are VNNI's.
    "amx-int8": Int8Kernel("amx-int8", "", 16, "uint8", 255, 16, 2),
    "avx512-vnni": Int8Kernel("avx512-vnni", "tvmdeploy_vnni_16x4", 16, "uint8", 255, 4, 6),
    "avx-vnni": Int8Kernel("avx-vnni", "tvmdeploy_avxvnni_8x4", 8, "uint8", 255, 4, 3),
    "avx512bw": Int8Kernel("avx512bw", "tvmdeploy_avx512_16x4", 16, "uint8", 127, 8, 3),
    "avx2": Int8Kernel("avx2", "tvmdeploy_avx2_8x4", 8, "uint8", 127, 8, 2),
    "arm-sdot": Int8Kernel("arm-sdot", "tvmdeploy_sdot_4x4", 4, "int8", 255, 8, 2),
    "arm-neon": Int8Kernel("arm-neon", "tvmdeploy_neon_4x4", 4, "int8", 255, 4, 2),
}

# CPU features (the probe's names, as in a profile's `requires.cpu_features`) -> kernel, best first.
_BY_FEATURE = [
    ("amx_int8", "amx-int8"),
    ("avx512_vnni", "avx512-vnni"),
    ("avx_vnni", "avx-vnni"),
    ("avx512bw", "avx512bw"),
    ("avx2", "avx2"),
    ("asimddp", "arm-sdot"),
    ("asimd", "arm-neon"),
]


def kernel_for(profile: Profile) -> Int8Kernel | None:
    """The int8 kernel a profile's required CPU features allow (None: no int8 for it).

    Chosen from `requires`, never from the build machine, so an artifact only uses instructions
    that the runtime checks the device has."""
    if profile.is_gpu:
        return None
    features = set(profile.requires.get("cpu_features", []))
    for feature, name in _BY_FEATURE:
        if feature in features:
            return KERNELS[name]
    return None


# ---- tensor intrinsics ---------------------------------------------------------------------


def _desc(lanes: int, a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _vpdpbusd(lanes: int, llvm_name: str):
    nbytes = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, lanes), dtype=f"int8x{nbytes}")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=f"int32x{lanes}"),
                a_bytes,
                B.vload([0, 0], dtype=f"int8x{nbytes}"),
                dtype=f"int32x{lanes}",
            )

    return impl


def _pmaddubsw(lanes: int, maddubs: str, maddwd: str):
    nbytes = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_word, lanes), dtype=f"int8x{nbytes}")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddubs),
                a_bytes,
                B.vload([0, 0], dtype=f"int8x{nbytes}"),
                dtype=f"int16x{2 * lanes}",
            )
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + (
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddwd),
                    pairs,
                    T.broadcast(T.int16(1), 2 * lanes),
                    dtype=f"int32x{lanes}",
                )
            )

    return impl


@T.prim_func(s_tir=True)
def _sdot(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a_word = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            T.reinterpret(T.broadcast(a_word, 4), dtype="int8x16"),
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


@cache
def register_intrinsics() -> None:
    """Register our tensor intrinsics once per process (TensorIntrin names are global)."""
    import_tensor_intrinsics("arm")  # TVM's arm_cpu module alone, not all of TVM's intrinsics
    from tvm.s_tir.tensor_intrin.arm_cpu import neon_4x4_i8i8i32_impl

    TensorIntrin.register(
        "tvmdeploy_vnni_16x4",
        _desc(16, "uint8"),
        _vpdpbusd(16, "llvm.x86.avx512.vpdpbusd.512"),
        override=True,
    )
    TensorIntrin.register(
        "tvmdeploy_avxvnni_8x4",
        _desc(8, "uint8"),
        _vpdpbusd(8, "llvm.x86.avx512.vpdpbusd.256"),
        override=True,
    )
    TensorIntrin.register(
        "tvmdeploy_avx512_16x4",
        _desc(16, "uint8"),
        _pmaddubsw(16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
        override=True,
    )
    TensorIntrin.register(
        "tvmdeploy_avx2_8x4",
        _desc(8, "uint8"),
        _pmaddubsw(8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
        override=True,
    )
    TensorIntrin.register("tvmdeploy_sdot_4x4", _desc(4, "int8"), _sdot, override=True)
    TensorIntrin.register(
        "tvmdeploy_neon_4x4", _desc(4, "int8"), neon_4x4_i8i8i32_impl, override=True
    )


# ---- the GEMM --------------------------------------------------------------------------------


def int8_gemm(kernel: Int8Kernel, m: int, n: int, k: int) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(a, b_packed, colsum, w_scale, a_scale, a_zero) -> out[m, n]``.

    `n` must be a multiple of `kernel.lanes` and `k` of 4 (quantize.py only rewrites such
    matmuls). `a_zero` is the activations' zero point minus `kernel.a_offset`, as float32."""
    register_intrinsics()
    lanes = kernel.lanes
    a = te.placeholder((m, k), kernel.a_dtype, name="a")
    b = te.placeholder((n // lanes, k // 4, lanes, 4), "int8", name="b_packed")
    colsum = te.placeholder((n,), "int32", name="colsum")
    w_scale = te.placeholder((n,), "float32", name="w_scale")
    a_scale = te.placeholder((m,), "float32", name="a_scale")
    a_zero = te.placeholder((m,), "float32", name="a_zero")
    ko = te.reduce_axis((0, k // 4), "ko")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute(
        (m, n // lanes, lanes),
        lambda i, jb, jl: te.sum(
            a[i, ko * 4 + ki].astype("int32") * b[jb, ko, jl, ki].astype("int32"), axis=[ko, ki]
        ),
        name="acc",
    )
    out = te.compute(
        (m, n),
        lambda i, j: (
            (
                acc[i, j // lanes, j % lanes].astype("float32")
                - a_zero[i] * colsum[j].astype("float32")
            )
            * (a_scale[i] * w_scale[j])
        ),
        name="out",
    )
    func = te.create_prim_func([a, b, colsum, w_scale, a_scale, a_zero, out])
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    i, jb, jl, ko_loop, ki_loop = sch.get_loops(block)
    mr = largest_divisor(m, kernel.mr)
    nv = largest_divisor(n // lanes, kernel.nv)
    io, ii = sch.split(i, [None, mr])
    jo, jv = sch.split(jb, [None, nv])
    # Column panels outside row tiles: a B panel (nv x lanes columns) stays in L1 while every row
    # tile uses it, so each weight is read from memory once per block of rows; rows in blocks of
    # ROW_BLOCK, so that block of A stays in L2 meanwhile.
    if m > ROW_BLOCK and m % ROW_BLOCK == 0 and ROW_BLOCK % mr == 0:
        ib, io = sch.split(io, [None, ROW_BLOCK // mr])
        sch.reorder(ib, jo, io, ko_loop, ii, jv, jl, ki_loop)
        tile = sch.fuse(ib, jo, io)
    else:
        sch.reorder(jo, io, ko_loop, ii, jv, jl, ki_loop)
        tile = sch.fuse(jo, io)
    if m * n * k >= MIN_PARALLEL_MACS:  # below, waking the thread pool costs more than the work
        sch.parallel(tile)
    # The epilogue runs per tile, while its int32 accumulators are still in L1.
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    init = sch.decompose_reduction(block, ko_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(jl, kernel.intrin)
    if mr > 1:
        sch.unroll(ii)
    if nv > 1:
        sch.unroll(jv)
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, kernel.name)
    )


def quantize_rows(kernel: Int8Kernel, m: int, k: int) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``x[m, k] -> (q[m, k], a_scale[m], a_zero[m])``: per-row
    asymmetric quantization to the kernel's levels, in one parallel pass over the rows (min and
    max in vector registers, then the quantized row). As separate Relax reductions and an
    elementwise kernel it took longer than the int8 GEMMs themselves."""
    lanes = next(v for v in (16, 8, 4, 2, 1) if k % v == 0)
    chunks = k // lanes
    levels = float(kernel.a_levels)
    offset = float(kernel.a_offset)
    a_dtype = kernel.a_dtype
    rows = T.parallel if m * k >= 8192 else T.serial  # small: no thread-pool wake-up

    @T.prim_func(s_tir=True)
    def quantize(
        x: T.Buffer((m, k), "float32"),
        q: T.Buffer((m, k), a_dtype),
        a_scale: T.Buffer((m,), "float32"),
        a_zero: T.Buffer((m,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for i in rows(m):
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
                a_scale[i] = scale
                a_zero[i] = zero - T.float32(offset)
                for c in range(chunks):
                    for v in T.vectorized(lanes):
                        q[i, c * lanes + v] = T.Cast(
                            a_dtype,
                            T.min(
                                T.max(T.round(x[i, c * lanes + v] * inv) + zero, T.float32(0)),
                                T.float32(levels),
                            )
                            - T.float32(offset),
                        )

    return (
        quantize.with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, f"{kernel.name}-quantize")
    )
