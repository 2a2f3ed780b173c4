"""bf16 GEMM for x86 CPUs with AVX512-BF16: ``vdpbf16ps``, 32 bf16 products into 16 fp32 sums.

Why bf16 beside int8: it needs no activation scales (bf16 keeps fp32's exponent), so its error
is a fixed relative 2^-9 per operand whatever the activations' range, and on a CPU that has it
the instruction does twice the multiply-adds of an fp32 FMA per cycle (measured on Zen 5,
2 threads: ~950 GFLOP/s against ~440 for the fp32 kernels).

The kernel is a TE GEMM ``out[m, n] = sum_k bf16(a[m, k]) * bf16(b[n, k])`` with float32
accumulation, operands held as raw bf16 bits (uint16): activations rounded once per call
(`to_bf16_bits`, round to nearest even), weights rounded and packed as ``[N / 16, K / 2, 16, 2]``
by the lifted `transform_params` when the artifact is loaded. Its 1 x 16 x 2 inner block is
tensorized with the instruction; the register tile is `MR` rows by `NV` vectors, parallel over
tiles.

Two TVM 0.27 limits shape it:
- TIR cannot call the intrinsic: its bf16 vectors are legalized to fp32 before codegen, and
  LLVM refuses integer vectors in their place. The call lives in a small LLVM IR function,
  linked into the module through TIR's ``pragma_import_llvm`` and inlined by LLVM.
- The tile's accumulators must be a stack buffer (TVM puts "global" buffers under 1 KiB on the
  stack and every other one in a workspace from the allocator, whose pointer LLVM cannot prove
  distinct from the operands: it then stores every accumulator on every k step, halving the
  speed). Hence at most 15 accumulators (4 x 3 = 12 here, 768 bytes).
"""

from __future__ import annotations

from functools import cache

import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .cpu_int8 import KERNEL_ATTR, MIN_PARALLEL_MACS, OPAQUE_PATTERN
from .cpu_target import largest_divisor

LANES = 16  # fp32 sums per zmm register
MR, NV = 4, 3  # register tile: rows x vectors (see the module docstring for the limit)
_INTRIN = "tvmdeploy_dpbf16ps_16x2"
_HELPER = "tvmdeploy_dpbf16ps_16"

#: c + a . b for one 2-element row of A (broadcast) and 16 x 2 of B, in LLVM IR: the one way to
#: reach the instruction from TVM 0.27 (module docstring). linkonce_odr: every GEMM function of a
#: module imports it, and the linker keeps one copy.
_LLVM_IR = f"""
define linkonce_odr <16 x float> @{_HELPER}(<16 x float> %c, ptr %a, ptr %b) alwaysinline {{
  %word = load i32, ptr %a, align 2
  %one = insertelement <16 x i32> poison, i32 %word, i32 0
  %all = shufflevector <16 x i32> %one, <16 x i32> poison, <16 x i32> zeroinitializer
  %av = bitcast <16 x i32> %all to <32 x bfloat>
  %bv = load <32 x bfloat>, ptr %b, align 2
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c,
                                                           <32 x bfloat> %av, <32 x bfloat> %bv)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


def _widen(bits):
    """bf16 bits (uint16) -> float32: the top half of its bit pattern."""
    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def to_bf16_bits(x: te.Tensor) -> te.Tensor:
    """float32 -> bf16 bits, rounded to nearest even (what `vcvtneps2bf16` does; NaN payloads
    are not preserved, no model here produces one)."""

    def body(*idx):
        bits = tirx.reinterpret("uint32", x(*idx))
        odd = (bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32")
        rounded = bits + tirx.const(0x7FFF, "uint32") + odd
        return (rounded >> tirx.const(16, "uint32")).astype("uint16")

    return te.compute(x.shape, body, name="bf16_bits")


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((2,), "uint16", offset_factor=1),
    B: T.Buffer((LANES, 2), "uint16", offset_factor=1),
    C: T.Buffer((LANES,), "float32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2], B[0:LANES, 0:2])
        T.writes(C[0:LANES])
        for i in T.serial(0, LANES):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.reinterpret(
                        "float32", T.shift_left(T.Cast("uint32", A[vk]), T.uint32(16))
                    ) * T.reinterpret(
                        "float32", T.shift_left(T.Cast("uint32", B[vi, vk]), T.uint32(16))
                    )


@T.prim_func(s_tir=True)
def _impl(
    A: T.Buffer((2,), "uint16", offset_factor=1),
    B: T.Buffer((LANES, 2), "uint16", offset_factor=1),
    C: T.Buffer((LANES,), "float32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2], B[0:LANES, 0:2])
        T.writes(C[0:LANES])
        C[T.ramp(T.int32(0), 1, LANES)] = T.call_extern(
            "float32x16",
            _HELPER,
            C.vload([0], dtype="float32x16"),
            A.access_ptr("r"),
            B.access_ptr("r"),
        )


@cache
def register_intrinsic() -> None:
    TensorIntrin.register(_INTRIN, _desc, _impl, override=True)


def bf16_gemm(m: int, n: int, k: int) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(a_bits[m, k], b_packed[n / 16, k / 2, 16, 2]) -> out[m, n]``;
    `n` a multiple of 16 and `k` of 2 (quantize.to_bfloat16 only rewrites such matmuls)."""
    register_intrinsic()
    a = te.placeholder((m, k), "uint16", name="a_bits")
    b = te.placeholder((n // LANES, k // 2, LANES, 2), "uint16", name="b_packed")
    ko = te.reduce_axis((0, k // 2), "ko")
    ki = te.reduce_axis((0, 2), "ki")
    acc = te.compute(
        (m, n // LANES, LANES),
        lambda i, jb, jl: te.sum(
            _widen(a[i, ko * 2 + ki]) * _widen(b[jb, ko, jl, ki]), axis=[ko, ki]
        ),
        name="acc",
    )
    out = te.compute((m, n), lambda i, j: acc[i, j // LANES, j % LANES], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, b, out]))
    block = sch.get_sblock("acc")
    # A per-tile copy of the accumulators, which the output reads directly: small enough for the
    # stack (module docstring).
    sch.compute_inline(sch.cache_write(block, 0, "global"))
    i, jb, jl, ko_loop, ki_loop = sch.get_loops(block)
    mr = largest_divisor(m, MR)
    nv = largest_divisor(n // LANES, NV)
    io, ii = sch.split(i, [None, mr])
    jo, jv = sch.split(jb, [None, nv])
    sch.reorder(jo, io, ko_loop, ii, jv, jl, ki_loop)
    tile = sch.fuse(jo, io)
    if m * n * k >= MIN_PARALLEL_MACS:  # below, waking the thread pool costs more than the work
        sch.parallel(tile)
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile)
    rows, cols = sch.get_loops(epilogue)[-2:]
    sch.vectorize(cols)
    sch.unroll(rows)
    init = sch.decompose_reduction(block, ko_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(jl, _INTRIN)
    sch.unroll(ii)
    sch.unroll(jv)
    sch.annotate(tile, "pragma_import_llvm", _LLVM_IR)
    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, "avx512-bf16")
    )
