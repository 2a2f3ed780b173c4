"""`CPUMatmul`: the rule-based CPU GEMM schedule (DLight has none for CPUs).

A register-blocked micro-kernel, vectorized over N with the target's SIMD width, parallel over the
outer tiles, with the fused epilogue (bias, GELU, residual) computed inside the tile; weight
matmuls read B pre-packed in panels of two SIMD vectors (pack_weights.py).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    IterKind,
    IterTrait,
    auto_inline_consumer_chain,
    get_reduction_blocks,
    make_iter_fusion_index_map,
)
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars

from .cpu_target import (
    const_int,
    largest_divisor,
    loop_extent,
    num_vector_registers,
    register_rows,
    vector_lanes,
)
from .pack_weights import PACKED_B_ATTR


def matmul_index_maps(block: s_tir.SBlock, b_kj: bool = False) -> tuple | None:
    """Index maps normalizing a matmul-like block to C[S, I, J] += A[S, I, K] * B[S, J, K].

    Like ``dlight.gpu.matmul.get_index_map`` but the I axis may be absent (M == 1, i.e.
    vector-matrix products such as a pooler/classifier on one token), and with ``b_kj``
    B is laid out as B[S, K, J] instead. Returns None if the block is not of that form or
    has no J or K axis.
    """
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None

    def axes(region) -> set:
        out: set = set()
        for rng in region:
            if const_int(rng.extent) != 1:
                raise ValueError("non-elementwise access")
            out |= set(undefined_vars(rng.min))
        return out

    try:
        a_axes = axes(block.reads[0].region)
        b_axes = axes(block.reads[1].region)
        c_axes = axes(block.writes[0].region)
    except ValueError:
        return None
    traits = {}
    for iv in block.iter_vars:
        var = iv.var
        if const_int(iv.dom.extent) == 1:
            kind = IterKind.kIter_T
        elif iv.iter_type == tirx.IterVar.DataPar:
            if var in a_axes and var in b_axes and var in c_axes:
                kind = IterKind.kIter_S
            elif var in a_axes and var in c_axes:
                kind = IterKind.kIter_I
            elif var in b_axes and var in c_axes:
                kind = IterKind.kIter_J
            else:
                return None
        elif iv.iter_type == tirx.IterVar.CommReduce:
            if var in a_axes and var in b_axes and var not in c_axes:
                kind = IterKind.kIter_K
            else:
                return None
        else:
            return None
        traits[var] = IterTrait(kind, iv.dom.extent)
    kinds = {t.kind for t in traits.values()}
    if IterKind.kIter_J not in kinds or IterKind.kIter_K not in kinds:
        return None
    ivs = block.iter_vars

    def pick(ax):
        return [traits[iv.var] for iv in ivs if iv.var in ax]

    s_, i_, j_, k_ = IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K
    return (
        make_iter_fusion_index_map([traits[iv.var] for iv in ivs], [s_, i_, j_, k_]),
        make_iter_fusion_index_map(pick(a_axes), [s_, i_, k_]),
        make_iter_fusion_index_map(pick(b_axes), [s_, k_, j_] if b_kj else [s_, j_, k_]),
        make_iter_fusion_index_map(pick(c_axes), [s_, i_, j_]),
    )


def b_unit_stride_along_j(block: s_tir.SBlock) -> bool:
    """Whether B's innermost index moves with a J (output column) iterator."""
    region = block.reads[1].region
    if not region:
        return False
    used = set(undefined_vars(region[-1].min))
    c_axes = set()
    for rng in block.writes[0].region:
        c_axes |= set(undefined_vars(rng.min))
    return any(
        iv.var in used and iv.var in c_axes and iv.iter_type == tirx.IterVar.DataPar
        for iv in block.iter_vars
    )


def static_bytes(buf: tirx.Buffer) -> int | None:
    """The size of a buffer of static shape in bytes, else None."""
    size = tvm.DataType(buf.dtype).bits // 8
    for dim in buf.shape:
        if const_int(dim) is None:
            return None
        size *= const_int(dim)
    return size


def depth_block(depth: int | None, limit: int) -> int | None:
    """A k-block depth: the largest divisor of `depth` up to `limit`, if it is at least half of
    `limit` and splits K into more than one block; else None (no K-blocking)."""
    if depth is None:
        return None
    block = largest_divisor(depth, limit)
    return block if limit // 2 <= block < depth else None


class CPUMatmul(ScheduleRule):
    """Register-blocked GEMM schedule for matmul-like blocks (with fused epilogues).

    The main reduction block is normalized to ``C[S, I, J] += A[S, I, K] * B[S, J, K]``
    (batch, rows, cols, reduction), then tiled as::

        parallel for (s, jo, io):          # fused outer tiles; B panel reused across io
          C_local[mr, nr] = 0              # mr x nr accumulators live in registers
          for k:                           # full K
            unroll for ii in mr:           # micro-tile rows (broadcast A)
              vectorize for ji in nr:      # nr = up to 2 SIMD vectors of B
                C_local[ii, ji] += A[.., k] * B[k, ..]
          epilogue(C_local) -> output      # bias/GELU/residual inlined, vectorized

    When B is not unit-stride along J, or is much larger than L2, a [K, nr] panel of B is
    packed once per column tile instead (``parallel for (s, jo): pack; for io: ...``).
    GEMMs of few rows on AVX2 run K-blocked (``parallel for (s, jo): for ko: for io: for ki``),
    so a slice of the panel stays in L1 across the row tiles (`_k_block`). Weight GEMMs of few
    rows on x86 take tiles across two packed panels instead, two weight streams in flight,
    K-blocked where the weight is large (`_wide_tile`).
    Shapes that do not divide the tile get guarded (predicated) tail tiles; nr is chosen
    to divide N where possible because a predicated vector loop is scalarized.
    Producers are inlined into the micro-kernel, so only matmuls whose only producers
    are the operands' layout copies should reach it (as FuseOps produces).
    """

    #: Pack B panels when B is larger than this many bytes (and M >= 32).
    pack_b_bytes = 4 << 20
    #: Below this many multiply-adds the GEMM runs on the calling thread: waking the thread pool
    #: costs more than the work (the per-call floor of small models and short sequences).
    min_parallel_macs = 1 << 19
    #: GEMMs of at most this many rows run K-blocked on AVX2 (`_k_block`), at most this deep.
    k_block_max_rows = 64
    k_block = 256
    #: Weight GEMMs of at most this many rows on x86 take tiles across `wide_panels` packed
    #: panels of B (`_wide_tile`).
    wide_max_rows = 64
    wide_panels = 2
    #: ... and run K-blocked, this deep, when B is at least this large (`_streams_b`).
    stream_b_bytes = 2 << 20
    wide_k_block = 64

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(  # pylint: disable=too-many-locals,too-many-branches,too-many-statements
        self,
        func: tirx.PrimFunc,
        target: Target,
        _: bool,
    ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        root = get_root_block(sch)
        blocks = sch.get_child_blocks(root)
        reduction_blocks = get_reduction_blocks(sch, blocks)
        if reduction_blocks is None:
            return None
        main = reduction_blocks[0]
        stmt = sch.get(main)
        if matmul_index_maps(stmt) is None:
            return None
        dtype = stmt.writes[0].source.dtype
        if not str(dtype).startswith("float"):
            return None

        # Pack a contiguous [K, nr] panel of B per column tile when B is not unit-stride
        # along J (A @ W^T with W[N, K]) or when B is much larger than L2 (every k row of
        # a strided panel then sits on its own page: TLB/prefetch bound, ~2x slower).
        # B pre-packed at load time (pack_weights.py) is already a contiguous [K, nr] panel
        # per column tile: read it as is, with the tile width it was packed for.
        packed_nr = const_int(stmt.annotations.get(PACKED_B_ATTR)) if stmt.annotations else None
        pack_b = packed_nr is None and not b_unit_stride_along_j(stmt)
        if not pack_b and packed_nr is None:
            c_buf = stmt.writes[0].source
            b_bytes = static_bytes(stmt.reads[1].source)
            rows = const_int(c_buf.shape[-2]) if len(c_buf.shape) >= 2 else 1
            if b_bytes is not None and rows is not None:
                pack_b = b_bytes > self.pack_b_bytes and rows >= 32

        # Step 0. Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (B[S, K, J] if packed).
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        index_maps = matmul_index_maps(sch.get(main), b_kj=pack_b)
        if index_maps is None:
            return None
        matmul_map, a_map, b_map, c_map = index_maps
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        # The reindex copy of A (and of B unless packed) folds back into the main block.
        sch.compute_inline(reindex_a)
        if pack_b:
            sch.transform_block_layout(reindex_b, b_map)
        else:
            sch.compute_inline(reindex_b)

        s, i, j, k = sch.get_loops(main)
        ext_i, ext_j = loop_extent(sch, i), loop_extent(sch, j)
        i_extent = sch.get(i).extent
        sizes = [loop_extent(sch, lp) for lp in (s, i, j, k)]
        small = all(e is not None for e in sizes) and math.prod(sizes) < self.min_parallel_macs

        # Step 1. Pick the micro-kernel shape and tile.
        lanes = vector_lanes(target)
        mr, nr = self._micro_tile(target, lanes, ext_i, ext_j, packed_nr)

        wide = self._wide_tile(target, lanes, ext_i, ext_j, packed_nr)
        panels = None
        if wide:
            mr, panels = wide
        io, ii = sch.split(i, factors=[None, mr])
        depth = loop_extent(sch, k)
        if panels:  # a tile of `panels` packed panels side by side, one vector loop each
            jo, jp, ji = sch.split(j, factors=[None, panels, nr])
            tile_loops = [ii, jp, ji]
            streams = self._streams_b(sch.get(main))
            k_block = depth_block(depth, self.wide_k_block) if streams else None
        else:
            jo, ji = sch.split(j, factors=[None, nr])
            tile_loops = [ii, ji]
            k_block = None if pack_b else self._k_block(target, ext_i, depth)
        if k_block:
            k_outer, k = sch.split(k, factors=[None, k_block])
            sch.reorder(s, jo, k_outer, io, k, *tile_loops)
        else:
            sch.reorder(s, jo, io, k, *tile_loops)
        if panels:
            sch.unroll(jp)
        if pack_b:
            outer = sch.fuse(s, jo)
            if not small:
                sch.parallel(outer)
            sch.compute_at(reindex_b, outer, preserve_unit_loops=True)
            self._vectorize_tile(sch, reindex_b, nr)
            tile = io
        else:
            # K-blocked, a task is a whole column panel: its accumulators (rows x nr, a private
            # buffer LLVM keeps in registers tile by tile) live across the k blocks, and the
            # epilogue runs once, after the last.
            outer = sch.fuse(s, jo) if k_block else sch.fuse(s, jo, io)
            if not small:
                sch.parallel(outer)
            tile = outer
        if mr > 1:
            sch.unroll(ii)
        sch.vectorize(ji)

        # Step 2. Register accumulator + fused epilogue.
        acc = sch.cache_write(main, 0, self._accumulator_scope(sch, i_extent, ext_j, mr, nr))
        sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
        auto_inline_consumer_chain(sch, acc)
        self._vectorize_tile(sch, acc, nr)

        # Step 3. Separate the zero-initialisation.
        init = sch.decompose_reduction(main, k_outer if k_block else k)
        self._vectorize_tile(sch, init, nr)
        return sch

    @staticmethod
    def _accumulator_scope(sch: s_tir.Schedule, rows, cols: int | None, mr: int, nr: int) -> str:
        """ "global" where the row count is symbolic but whole tiles cover it (rows padded to
        `mr`, pack_weights.padded_rows: a decoder's prompt), else "local".

        A "local" tile becomes a workspace allocation when the rows are symbolic, and LLVM
        then stores every accumulator on every k step: 61 GFLOPS at a 512-row prompt on a 2-core
        Zen 3. In "global" scope, with no predicate left, it compacts to a constant stack array
        that LLVM keeps in registers: 180-195 GFLOPS, level with OpenBLAS (docs/benchmarks.md).
        With a predicate it would not compact, hence padded rows only; static shapes already
        compact in "local" scope."""
        if const_int(rows) is not None or cols is None or cols % nr:
            return "local"
        whole = tvm.sym.Analyzer().can_prove_equal(tirx.floormod(rows, mr), 0)
        return "global" if whole else "local"

    def _wide_tile(
        self,
        target: Target,
        lanes: int,
        rows: int | None,
        cols: int | None,
        packed_nr: int | None,
    ) -> tuple[int, int] | None:
        """(rows, panels) of the register tile of a weight GEMM of few rows on x86, else None:
        `wide_panels` packed panels of B side by side, and as many rows as keep half the
        register file for accumulators (AVX-512 4 rows, 16 of 32 zmm: as many as the 8 x 1
        tile; AVX2 2 rows, 8 of 16 ymm).

        With few rows a GEMM is bound by how fast its weights arrive, not by its FMAs. A tile
        of one panel reads one sequential stream per core, and the next column's weights only
        after every row tile of this one is done; two panels side by side keep two streams in
        flight, and with B at least `stream_b_bytes` the tile runs K-blocked (`_streams_b`).
        Measured interleaved against ONNX Runtime (docs/benchmarks.md), DistilBERT-base at
        1x32, on an Intel Xeon with AVX-512: 8 x 1 panel 1.08-1.14x, 4 x 2 panels 0.97-1.02x,
        K-blocked 32 deep 0.88-0.92x, 64 deep 0.91x (8 minutes of tuning: 0.88-0.91x); on an AMD
        Zen 4 (AVX-512 on 256-bit units): 4 x 2 0.72-0.88x, K-blocked 32 deep 0.94-1.00x, 64 deep
        0.87-0.89x. 64 deep is the depth good on both. Slower on the Intel: 4 x 3, 2 x 4 and 6 x 2
        tiles; K-blocks of 16 or 256; K-blocking at 128 rows (1.11x against 1.04x) or with weights
        that stay in cache (MiniLM's 384 x 384, 4-7%).
        x86-64-v3 code on the Intel: 2 x 2 K-blocked 32 deep 14-16% faster than 6 x 1 K-blocked 256
        deep (`_k_block`) at DistilBERT 1x32, 2% at MiniLM 1x32; 4 x 2 (all 16 ymm) 1.3x slower;
        on the Zen 4, 32 and 64 deep were level."""
        if packed_nr is None or rows is None or cols is None or rows > self.wide_max_rows:
            return None
        if lanes < 8 or packed_nr % lanes:  # x86 only: NEON was not measured on hardware
            return None
        vectors = self.wide_panels * packed_nr // lanes
        tile_rows = num_vector_registers(target) // 2 // vectors
        if tile_rows < 1 or rows % tile_rows or cols % (packed_nr * self.wide_panels):
            return None
        return tile_rows, self.wide_panels

    def _streams_b(self, block: tirx.SBlock) -> bool:
        """Whether B is large enough (`stream_b_bytes`) that a wide tile runs K-blocked: a
        task is then a column block of all the rows, and each `wide_k_block`-deep slice of
        its panels is read from memory once and used by every row tile while in L1."""
        size = static_bytes(block.reads[1].source)
        return size is not None and size >= self.stream_b_bytes

    def _k_block(self, target: Target, rows: int | None, depth: int | None) -> int | None:
        """The k-block depth for a GEMM of few rows on a 16-register ISA (AVX2), else None.

        With few rows, each [K, nr] panel of B is read once per row tile; K-blocked, a slice
        128-256 deep (a divisor of K) stays in L1 for all of them, as in MLAS. Measured on
        x86-64-v3 code (docs/benchmarks.md): at 32 rows 4-7% faster, level with ONNX Runtime's
        AVX2 sgemm; neutral at 128 rows, 4% slower at 1024, no gain with AVX-512's 8-row tiles."""
        if num_vector_registers(target) != 16 or rows is None or rows > self.k_block_max_rows:
            return None
        return depth_block(depth, self.k_block)

    @staticmethod
    def _micro_tile(
        target: Target,
        lanes: int,
        ext_i: int | None,
        ext_j: int | None,
        packed_nr: int | None = None,
    ) -> tuple[int, int]:
        # Columns: two SIMD vectors when N allows it, else the widest power-of-two width
        # dividing N (a guarded, non-dividing width makes the vectorizer fall back to
        # scalar code), else the whole of a narrow N as one short vector. A pre-packed B
        # fixes the width to its panel width.
        nr = packed_nr or 2 * lanes
        if ext_j is not None and packed_nr is None:
            if ext_j <= lanes:
                nr = ext_j
            else:
                cand = 2 * lanes
                while cand >= 4 and ext_j % cand != 0:
                    cand //= 2
                if cand >= 4:
                    nr = cand
        # Rows: as many accumulators as the register file holds (weight matmuls get their rows
        # padded to a multiple of this by pack_weights, so they take it whole).
        max_mr = register_rows(target, -(-nr // lanes))
        if ext_i is not None and ext_i <= max_mr:
            return ext_i, nr
        if ext_i is not None:
            for cand in range(max_mr, 1, -1):
                if ext_i % cand == 0 and cand >= max_mr // 2:
                    return cand, nr
        return max_mr, nr

    @staticmethod
    def _vectorize_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, nr: int) -> None:
        """Vectorize the innermost loop of an epilogue/init block placed inside a tile."""
        loops = sch.get_loops(block)
        if len(loops) < 2:
            return
        inner = loops[-1]
        ext = loop_extent(sch, inner)
        if ext is None or ext < 2 or ext > 4 * nr:
            return
        sch.vectorize(inner)
