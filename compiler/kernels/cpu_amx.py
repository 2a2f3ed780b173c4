"""int8 and bf16 GEMMs on AMX tiles (Sapphire Rapids and later): `tdpbusd` and `tdpbf16ps`.

Why: a tile instruction does 16 x 16 x 64 int8 (or 16 x 16 x 32 bf16) multiply-adds, 8x the
AVX-512 VNNI kernel's and far more than `vdpbf16ps`, which on Intel cores loses to the fp32 FMA.

TIR cannot emit tile instructions (TVM 0.27 has no AMX code), so, as for `vdpbf16ps`
(cpu_bf16.py), the tile work lives in a small LLVM IR function linked through
``pragma_import_llvm``. It uses LLVM's `x86_amx` type and the `.internal` intrinsics, whose tile
shapes are operands, so LLVM writes the tile configuration and inserts `ldtilecfg` and
`tilerelease` itself. One helper call computes a block of `mt` x `nt` tiles of 16 x 16 int32
(fp32) sums over the whole K, the accumulators held in tile registers (2 x 2 blocks: 4 C + 2 A +
2 B = the 8 tiles, as MLAS's AMX kernel), and stores them once to a per-block buffer. The TIR
around it is plain: blocks in parallel, then the epilogue from that buffer, vectorized: for int8
the zero-point correction, scales (as cpu_int8.int8_gemm: once per block, never per tile through
memory), for bf16 a copy. Bias, GELU and residual stay the fused kernels that follow, as for the
other int8/bf16 GEMMs.

Layouts: the weight packings of the other kernels are already B tiles. int8 `[N/16, K/4, 16, 4]`
(a tile: 16 rows of 4 k x 16 columns, 64 bytes a row); bf16 `[N/16, K/2, 16, 2]` (16 rows of 2 k
x 16 columns). Every tile here is 16 rows x 64 bytes, one shape, so the rewrite (quantize.py)
pads the activations to whole tiles (rows to 16, K to 64 int8 or 32 bf16) and the weights' K
with zeros: a zero weight adds nothing, whatever the activation's zero point.

Attention's products (scores, probabilities x V) stay fp32 in cpu_attention.py: at these head
sizes (K = 32 or 64) one score tile is a single tile product, so loading and storing the tiles
and the configuration cost as much as the product, and the scores must go through memory to the
softmax anyway.

`helper_ir` swaps the tile helper: tests link the same kernels against an emulation of the tile
instructions in plain IR (tests/compiler/kernels/amx_emulation.py), which runs on any x86-64 CPU;
profiles only ever build the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from .cpu_int8 import KERNEL_ATTR, KERNELS, MIN_PARALLEL_MACS, OPAQUE_PATTERN

TILE_ROWS = 16
TILE_BYTES = 64  # bytes per tile row
LANES = 16  # int32 / fp32 columns per C tile, and columns per weight panel
INT8_K = 64  # k per int8 tile (a row of A: 64 bytes)
BF16_K = 32  # k per bf16 tile

#: The int8 kernel's facts for the quantizer (cpu_int8.KERNELS): u8 activations at 255 levels,
#: weights in panels of 16 columns, as VNNI.
AMX_INT8 = KERNELS["amx-int8"]


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class AmxTiles:
    """The real tile instructions, as LLVM IR lines; `amx_emulation.py` has the same methods."""

    def declarations(self, dot: str) -> list[str]:
        return [
            "declare x86_amx @llvm.x86.tilezero.internal(i16, i16)",
            "declare x86_amx @llvm.x86.tileloadd64.internal(i16, i16, ptr, i64)",
            "declare void @llvm.x86.tilestored64.internal(i16, i16, ptr, i64, x86_amx)",
            f"declare x86_amx @llvm.x86.{dot}.internal(i16, i16, i16, x86_amx, x86_amx, x86_amx)",
        ]

    def slot(self, name: str) -> list[str]:
        return []  # tiles are registers

    def zero(self, name: str) -> tuple[list[str], str]:
        return [
            f"%{name}.0 = call x86_amx @llvm.x86.tilezero.internal(i16 16, i16 64)"
        ], f"%{name}.0"

    def phi(self, name: str, first: str, again: str) -> list[str]:
        return [f"%{name} = phi x86_amx [{first}, %entry], [{again}, %loop]"]

    def acc(self, name: str) -> str:
        return f"%{name}"

    def load(self, name: str, ptr: str, stride: str) -> tuple[list[str], str]:
        call = (
            f"call x86_amx @llvm.x86.tileloadd64.internal(i16 16, i16 64, ptr {ptr}, i64 {stride})"
        )
        return [f"%{name} = {call}"], f"%{name}"

    def dot(self, dot: str, name: str, c: str, a: str, b: str) -> tuple[list[str], str]:
        call = (
            f"call x86_amx @llvm.x86.{dot}.internal(i16 16, i16 64, i16 64, "
            f"x86_amx {c}, x86_amx {a}, x86_amx {b})"
        )
        return [f"%{name} = {call}"], f"%{name}"

    def store(self, ptr: str, stride: str, tile: str) -> list[str]:
        operands = f"i16 16, i16 64, ptr {ptr}, i64 {stride}, x86_amx {tile}"
        return [f"call void @llvm.x86.tilestored64.internal({operands})"]


SIGNATURE = "ptr %c, ptr %a, i64 %lda, ptr %b, i64 %ldb, i64 %kblocks"


def helper_ir(name: str, dot: str, mt: int, nt: int, tiles=AmxTiles()) -> str:
    """LLVM IR of ``void name(c, a, lda, b, ldb, kblocks)``: the `mt` x `nt` block of C tiles
    (`c`: row-major, `nt` x 64 bytes a row) as the sum over `kblocks` of A tiles (`a`, `lda`
    bytes a row, 64 bytes further per k block) times B tiles (`b`, `ldb` bytes from one
    16-column panel to the next, 1 KiB further per k block), with instruction `dot`."""
    ldc = nt * TILE_BYTES
    entry, loop, done = [], [], []
    cs = [(r, c) for r in range(mt) for c in range(nt)]
    for slot in (
        [f"c{r}{c}" for r, c in cs] + [f"a{r}" for r in range(mt)] + [f"b{c}" for c in range(nt)]
    ):
        entry += tiles.slot(slot)
    first = {}
    for r, c in cs:
        lines, first[r, c] = tiles.zero(f"c{r}{c}")
        entry += lines
    loop += ["%k = phi i64 [0, %entry], [%k.next, %loop]"]
    nexts = {(r, c): f"%c{r}{c}.next" for r, c in cs}
    for r, c in cs:
        loop += tiles.phi(f"c{r}{c}", first[r, c], nexts[r, c])
    loop += ["%kbytes = mul i64 %k, 64", "%kpanel = mul i64 %k, 1024"]
    a_tiles, b_tiles = {}, {}
    for r in range(mt):
        loop += [
            f"%aoff{r} = mul i64 %lda, {r * TILE_ROWS}",
            f"%aoffk{r} = add i64 %aoff{r}, %kbytes",
            f"%pa{r} = getelementptr i8, ptr %a, i64 %aoffk{r}",
        ]
        lines, a_tiles[r] = tiles.load(f"a{r}", f"%pa{r}", "%lda")
        loop += lines
    for c in range(nt):
        loop += [
            f"%boff{c} = mul i64 %ldb, {c}",
            f"%boffk{c} = add i64 %boff{c}, %kpanel",
            f"%pb{c} = getelementptr i8, ptr %b, i64 %boffk{c}",
        ]
        lines, b_tiles[c] = tiles.load(f"b{c}", f"%pb{c}", "64")
        loop += lines
    result = {}
    for r, c in cs:
        lines, result[r, c] = tiles.dot(
            dot, f"c{r}{c}.next", tiles.acc(f"c{r}{c}"), a_tiles[r], b_tiles[c]
        )
        loop += lines
    loop += [
        "%k.next = add i64 %k, 1",
        "%more = icmp ult i64 %k.next, %kblocks",
        "br i1 %more, label %loop, label %done",
    ]
    for r, c in cs:
        done += [
            f"%pc{r}{c} = getelementptr i8, ptr %c, i64 {r * TILE_ROWS * ldc + c * TILE_BYTES}"
        ]
        done += tiles.store(f"%pc{r}{c}", str(ldc), result[r, c])
    done += ["ret void"]
    body = "\n  ".join(entry + ["br label %loop"])
    return "\n".join(
        [
            *tiles.declarations(dot),
            f"define linkonce_odr void @{name}({SIGNATURE}) {{",
            "entry:",
            "  " + body,
            "loop:",
            "  " + "\n  ".join(loop),
            "done:",
            "  " + "\n  ".join(done),
            "}",
            "",
        ]
    )


def _blocking(m_padded: int, n: int) -> tuple[int, int]:
    """Tiles per block: 2 x 2 where the rows and panels allow it, else 1 on that side."""
    mt = 2 if m_padded % (2 * TILE_ROWS) == 0 else 1
    nt = 2 if (n // LANES) % 2 == 0 else 1
    return mt, nt


HelperFactory = Callable[[str, str, int, int], str]


def _helper(kind: str, mt: int, nt: int, make: HelperFactory | None) -> tuple[str, str]:
    dot = "tdpbusd" if kind == "int8" else "tdpbf16ps"
    name = f"tvmdeploy_amx_{kind}_{mt}x{nt}" + ("" if make is None else "_emulated")
    return name, (make or helper_ir)(name, dot, mt, nt)


def padded_shape(kind: str, m: int, k: int) -> tuple[int, int]:
    """The activation shape the AMX GEMM reads: rows to whole tiles, K to whole tile rows."""
    return round_up(m, TILE_ROWS), round_up(k, INT8_K if kind == "int8" else BF16_K)


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    return (
        func.with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, name)
    )


def amx_int8_gemm(m: int, n: int, k: int, make_helper: HelperFactory | None = None):
    """The PrimFunc ``(a[mp, kp] u8, b_packed[n/16, kp/4, 16, 4] s8, colsum, w_scale, a_scale,
    a_zero) -> out[m, n]`` (`padded_shape`; `n` a multiple of 16). The epilogue is
    cpu_int8.int8_gemm's: ``(C - a_zero[m] * colsum[n]) * a_scale[m] * w_scale[n]``."""
    mp, kp = padded_shape("int8", m, k)
    mt, nt = _blocking(mp, n)
    rb, cb = mt * TILE_ROWS, nt * LANES
    row_blocks, blocks = mp // rb, (mp // rb) * (n // cb)
    helper, ir = _helper("int8", mt, nt, make_helper)
    panel_bytes = kp // 4 * TILE_BYTES
    blocks_loop = T.parallel if m * n * k >= MIN_PARALLEL_MACS else T.serial

    @T.prim_func(s_tir=True)
    def gemm(
        a: T.Buffer((mp, kp), "uint8"),
        b: T.Buffer((n // LANES, kp // 4, LANES, 4), "int8"),
        colsum: T.Buffer((n,), "int32"),
        w_scale: T.Buffer((n,), "float32"),
        a_scale: T.Buffer((m,), "float32"),
        a_zero: T.Buffer((m,), "float32"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for block in blocks_loop(blocks, annotations={"pragma_import_llvm": ir}):
                acc = T.alloc_buffer((rb, cb), "int32")
                io = block % row_blocks  # column panels outside row blocks: a panel stays in L2
                jo = block // row_blocks
                T.evaluate(
                    T.call_extern(
                        "void",
                        helper,
                        acc.access_ptr("w"),
                        a.access_ptr("r", offset=io * rb * kp),
                        T.int64(kp),
                        b.access_ptr("r", offset=jo * nt * panel_bytes),
                        T.int64(panel_bytes),
                        T.int64(kp // INT8_K),
                    )
                )
                for ii in range(rb):
                    if io * rb + ii < m:
                        for jj in T.vectorized(cb):
                            out[io * rb + ii, jo * cb + jj] = (
                                T.Cast("float32", acc[ii, jj])
                                - a_zero[io * rb + ii] * T.Cast("float32", colsum[jo * cb + jj])
                            ) * (a_scale[io * rb + ii] * w_scale[jo * cb + jj])

    return _finish(gemm, "amx-int8")


def amx_bf16_gemm(m: int, n: int, k: int, make_helper: HelperFactory | None = None):
    """The PrimFunc ``(a_bits[mp, kp] u16, b_packed[n/16, kp/2, 16, 2] u16) -> out[m, n]``
    (`padded_shape`; `n` a multiple of 16): bf16 products, fp32 sums, as cpu_bf16.bf16_gemm."""
    mp, kp = padded_shape("bf16", m, k)
    mt, nt = _blocking(mp, n)
    rb, cb = mt * TILE_ROWS, nt * LANES
    row_blocks, blocks = mp // rb, (mp // rb) * (n // cb)
    helper, ir = _helper("bf16", mt, nt, make_helper)
    panel = kp // 2 * LANES * 2  # elements from one 16-column panel to the next
    blocks_loop = T.parallel if m * n * k >= MIN_PARALLEL_MACS else T.serial

    @T.prim_func(s_tir=True)
    def gemm(
        a: T.Buffer((mp, kp), "uint16"),
        b: T.Buffer((n // LANES, kp // 2, LANES, 2), "uint16"),
        out: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for block in blocks_loop(blocks, annotations={"pragma_import_llvm": ir}):
                acc = T.alloc_buffer((rb, cb), "float32")
                io = block % row_blocks
                jo = block // row_blocks
                T.evaluate(
                    T.call_extern(
                        "void",
                        helper,
                        acc.access_ptr("w"),
                        a.access_ptr("r", offset=io * rb * kp),
                        T.int64(kp * 2),
                        b.access_ptr("r", offset=jo * nt * panel),
                        T.int64(panel * 2),
                        T.int64(kp // BF16_K),
                    )
                )
                for ii in range(rb):
                    if io * rb + ii < m:
                        for jj in T.vectorized(cb):
                            out[io * rb + ii, jo * cb + jj] = acc[ii, jj]

    return _finish(gemm, "amx-bf16")
