"""Test-only: the AMX tile instructions emulated in plain LLVM IR, for a CPU without AMX.

`EmulatedTiles` has the methods of cpu_amx.AmxTiles, so `cpu_amx.helper_ir` writes the same
helper (same blocking, addresses, strides and k loop) with each tile a 1 KiB stack buffer and each
instruction a scalar loop with its semantics on 16 rows x 64 bytes:
- tileloadd / tilestored: 16 rows of 64 bytes, `stride` bytes apart;
- tdpbusd: ``C[m][n] += sum_{k<16, i<4} zext(A[m][4k+i]) * sext(B[k][4n+i])`` (int32 wraps);
- tdpbf16ps: ``C[m][n] += f32(A[m][2k]) * f32(B[k][2n]); C[m][n] += f32(A[m][2k+1]) *
  f32(B[k][2n+1])`` for k < 16, in that order (bf16 products are exact in fp32; only the sums
  round, as in the instruction; its DAZ/FTZ of denormals is not modelled: tests use normal values).
Never selected by a profile: only tests pass it as `make_helper`.
"""

from __future__ import annotations

from functools import partial

from tvmdeploy.compiler.kernels.cpu_amx import helper_ir

_COMMON = """
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)

define internal void @emu_tileload(ptr %t, ptr %src, i64 %stride) {
entry:
  br label %row
row:
  %r = phi i64 [0, %entry], [%r.next, %row]
  %off = mul i64 %r, %stride
  %from = getelementptr i8, ptr %src, i64 %off
  %toff = mul i64 %r, 64
  %to = getelementptr i8, ptr %t, i64 %toff
  call void @llvm.memcpy.p0.p0.i64(ptr %to, ptr %from, i64 64, i1 false)
  %r.next = add i64 %r, 1
  %more = icmp ult i64 %r.next, 16
  br i1 %more, label %row, label %done
done:
  ret void
}

define internal void @emu_tilestore(ptr %dst, i64 %stride, ptr %t) {
entry:
  br label %row
row:
  %r = phi i64 [0, %entry], [%r.next, %row]
  %off = mul i64 %r, %stride
  %to = getelementptr i8, ptr %dst, i64 %off
  %toff = mul i64 %r, 64
  %from = getelementptr i8, ptr %t, i64 %toff
  call void @llvm.memcpy.p0.p0.i64(ptr %to, ptr %from, i64 64, i1 false)
  %r.next = add i64 %r, 1
  %more = icmp ult i64 %r.next, 16
  br i1 %more, label %row, label %done
done:
  ret void
}
"""

#: One (m, n, k) step per iteration: m = i >> 8, n = (i >> 4) & 15, k = i & 15, so each
#: C[m][n] takes its k in order.
_LOOP_HEAD = """
define internal void @emu_{dot}(ptr %c, ptr %a, ptr %b) {{
entry:
  br label %step
step:
  %i = phi i64 [0, %entry], [%i.next, %step]
  %m = lshr i64 %i, 8
  %n4 = lshr i64 %i, 4
  %n = and i64 %n4, 15
  %k = and i64 %i, 15
  %mrow = mul i64 %m, 16
  %ci = add i64 %mrow, %n
  %cp = getelementptr {acc}, ptr %c, i64 %ci
  %c0 = load {acc}, ptr %cp
  %arow = mul i64 %m, 64
  %brow = mul i64 %k, 64
"""
_LOOP_TAIL = """
  store {acc} %sum, ptr %cp
  %i.next = add i64 %i, 1
  %more = icmp ult i64 %i.next, 4096
  br i1 %more, label %step, label %done
done:
  ret void
}}
"""


def _dpbusd_body() -> str:
    lines, acc = [], "%c0"
    for e in range(4):
        lines += [
            f"%ak{e}a = mul i64 %k, 4",
            f"%ak{e} = add i64 %ak{e}a, {e}",
            f"%ai{e} = add i64 %arow, %ak{e}",
            f"%ap{e} = getelementptr i8, ptr %a, i64 %ai{e}",
            f"%av{e} = load i8, ptr %ap{e}",
            f"%aw{e} = zext i8 %av{e} to i32",
            f"%bn{e}a = mul i64 %n, 4",
            f"%bn{e} = add i64 %bn{e}a, {e}",
            f"%bi{e} = add i64 %brow, %bn{e}",
            f"%bp{e} = getelementptr i8, ptr %b, i64 %bi{e}",
            f"%bv{e} = load i8, ptr %bp{e}",
            f"%bw{e} = sext i8 %bv{e} to i32",
            f"%p{e} = mul i32 %aw{e}, %bw{e}",
            f"%s{e} = add i32 {acc}, %p{e}",
        ]
        acc = f"%s{e}"
    lines += [f"%sum = add i32 {acc}, 0"]
    return "\n  ".join(lines)


def _dpbf16ps_body() -> str:
    lines, acc = [], "%c0"
    for e in range(2):
        lines += [
            f"%ak{e}a = mul i64 %k, 2",
            f"%ak{e} = add i64 %ak{e}a, {e}",
            f"%ab{e} = mul i64 %ak{e}, 2",
            f"%ai{e} = add i64 %arow, %ab{e}",
            f"%ap{e} = getelementptr i8, ptr %a, i64 %ai{e}",
            f"%av{e} = load i16, ptr %ap{e}",
            f"%aw{e} = zext i16 %av{e} to i32",
            f"%ash{e} = shl i32 %aw{e}, 16",
            f"%af{e} = bitcast i32 %ash{e} to float",
            f"%bn{e}a = mul i64 %n, 2",
            f"%bn{e} = add i64 %bn{e}a, {e}",
            f"%bb{e} = mul i64 %bn{e}, 2",
            f"%bi{e} = add i64 %brow, %bb{e}",
            f"%bp{e} = getelementptr i8, ptr %b, i64 %bi{e}",
            f"%bv{e} = load i16, ptr %bp{e}",
            f"%bw{e} = zext i16 %bv{e} to i32",
            f"%bsh{e} = shl i32 %bw{e}, 16",
            f"%bf{e} = bitcast i32 %bsh{e} to float",
            f"%p{e} = fmul float %af{e}, %bf{e}",
            f"%s{e} = fadd float {acc}, %p{e}",
        ]
        acc = f"%s{e}"
    lines += [f"%sum = fadd float {acc}, 0.0"]
    return "\n  ".join(lines)


def _dot_ir(dot: str) -> str:
    acc = "i32" if dot == "tdpbusd" else "float"
    body = _dpbusd_body() if dot == "tdpbusd" else _dpbf16ps_body()
    return _LOOP_HEAD.format(dot=dot, acc=acc) + "  " + body + _LOOP_TAIL.format(acc=acc)


class EmulatedTiles:
    """cpu_amx.AmxTiles' methods, each tile a stack buffer (accumulators updated in place)."""

    def declarations(self, dot: str) -> list[str]:
        return [_COMMON, _dot_ir(dot)]

    def slot(self, name: str) -> list[str]:
        return [f"%{name}.buf = alloca [1024 x i8], align 64"]

    def zero(self, name: str) -> tuple[list[str], str]:
        buf = f"%{name}.buf"
        return [f"call void @llvm.memset.p0.i64(ptr {buf}, i8 0, i64 1024, i1 false)"], buf

    def phi(self, name: str, first: str, again: str) -> list[str]:
        return []  # the buffer is the accumulator on every iteration

    def acc(self, name: str) -> str:
        return f"%{name}.buf"

    def load(self, name: str, ptr: str, stride: str) -> tuple[list[str], str]:
        buf = f"%{name}.buf"
        return [f"call void @emu_tileload(ptr {buf}, ptr {ptr}, i64 {stride})"], buf

    def dot(self, dot: str, name: str, c: str, a: str, b: str) -> tuple[list[str], str]:
        return [f"call void @emu_{dot}(ptr {c}, ptr {a}, ptr {b})"], c

    def store(self, ptr: str, stride: str, tile: str) -> list[str]:
        return [f"call void @emu_tilestore(ptr {ptr}, i64 {stride}, ptr {tile})"]


#: `make_helper` for cpu_amx.amx_int8_gemm / amx_bf16_gemm: the emulated helper.
emulated_helper = partial(helper_ir, tiles=EmulatedTiles())
