"""Rule-based default CPU schedules for Relax builds without tuning records.

Why this exists: TVM's default CPU pipeline lowers every legalized op to naive scalar
loop nests. For transformer models the matmuls (often fused with bias/GELU/residual
epilogues by FuseOps+FuseTIR) dominate, and untuned they are ~100x slower than ONNX
Runtime. DLight has no CPU GEMM rule, so this module provides one (`CPUMatmul`: a
register-blocked micro-kernel, vectorized over N with the target's SIMD width, parallel
over the outer tiles, epilogue fused into the tile), a row-reduction rule for softmax /
layer norm with rfactor-vectorized reductions (`CPURowReduction`), and a parallel +
vectorize rule for injective kernels (`CPUInjective`), run together with the stock
`dlight.cpu` rules. `cpu_pipeline` also swaps exp/erf/tanh/softmax for TVM's polynomial
fast-math versions, which vectorize (the libm calls they replace do not).

Works for x86 (SSE/AVX2/AVX-512) and AArch64 (NEON; SVE treated as 128-bit fixed width)
LLVM targets. Every rule is best effort: a function a rule cannot handle (or whose
schedule fails to lower) is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
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

from .pack_weights import PACKED_B_ATTR, packing_passes

logger = logging.getLogger(__name__)

__all__ = [
    "CPUInjective",
    "CPUMatmul",
    "CPURowReduction",
    "cpu_pipeline",
    "default_schedule_pass",
    "fusion_passes",
    "is_matmul_like",
    "vector_lanes",
]

_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


# --------------------------------------------------------------------------------------
# Target helpers
# --------------------------------------------------------------------------------------
def _cpu_features(target: Target) -> set[str]:
    try:
        from tvm.target.codegen import llvm_get_cpu_features

        return {str(f) for f in llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - best effort, never fail the build
        return set()


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's widest vector unit (16 for avx512, 8 for avx2, 4 for
    neon/sve/generic)."""
    if target.kind.name != "llvm":
        return 4
    feats = _cpu_features(target)
    if "avx512f" in feats:
        return 16
    if "avx2" in feats or "avx" in feats:
        return 8
    # NEON, SVE (scalable; scheduled as 128-bit fixed), SSE, RVV, unknown.
    return 4


def _num_vector_registers(target: Target) -> int:
    feats = _cpu_features(target)
    mtriple = str(target.attrs.get("mtriple", "") or "")
    if "avx512f" in feats or "neon" in feats or "sve" in feats or mtriple.startswith("aarch64"):
        return 32
    return 16


def _const(x) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, tirx.IntImm):
        return int(x.value)
    return None


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    return _const(sch.get(loop).extent)


# --------------------------------------------------------------------------------------
# Matmul rule
# --------------------------------------------------------------------------------------
def _matmul_index_maps(block: s_tir.SBlock, b_kj: bool = False) -> tuple | None:
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
            if _const(rng.extent) != 1:
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
        if _const(iv.dom.extent) == 1:
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


def _b_unit_stride_along_j(block: s_tir.SBlock) -> bool:
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
    Shapes that do not divide the tile get guarded (predicated) tail tiles; nr is chosen
    to divide N where possible because a predicated vector loop is scalarized.
    Producers are inlined into the micro-kernel, so only matmuls whose only producers
    are the operands' layout copies should reach it (as FuseOps produces).
    """

    #: Pack B panels when B is larger than this many bytes (and M >= 32).
    pack_b_bytes = 4 << 20

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
        if _matmul_index_maps(stmt) is None:
            return None
        dtype = stmt.writes[0].source.dtype
        if not str(dtype).startswith("float"):
            return None

        # Pack a contiguous [K, nr] panel of B per column tile when B is not unit-stride
        # along J (A @ W^T with W[N, K]) or when B is much larger than L2 (every k row of
        # a strided panel then sits on its own page: TLB/prefetch bound, ~2x slower).
        # B pre-packed at load time (pack_weights.py) is already a contiguous [K, nr] panel
        # per column tile: read it as is, with the tile width it was packed for.
        packed_nr = _const(stmt.annotations.get(PACKED_B_ATTR)) if stmt.annotations else None
        pack_b = packed_nr is None and not _b_unit_stride_along_j(stmt)
        if not pack_b and packed_nr is None:
            b_buf, c_buf = stmt.reads[1].source, stmt.writes[0].source
            b_shape = [_const(d) for d in b_buf.shape]
            rows = _const(c_buf.shape[-2]) if len(c_buf.shape) >= 2 else 1
            if all(d is not None for d in b_shape) and rows is not None:
                b_bytes = tvm.DataType(b_buf.dtype).bits // 8
                for d in b_shape:
                    b_bytes *= d
                pack_b = b_bytes > self.pack_b_bytes and rows >= 32

        # Step 0. Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (B[S, K, J] if packed).
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        index_maps = _matmul_index_maps(sch.get(main), b_kj=pack_b)
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
        ext_i, ext_j = _extent(sch, i), _extent(sch, j)

        # Step 1. Pick the micro-kernel shape and tile.
        lanes = vector_lanes(target)
        mr, nr = self._micro_tile(target, lanes, ext_i, ext_j, packed_nr)

        io, ii = sch.split(i, factors=[None, mr])
        jo, ji = sch.split(j, factors=[None, nr])
        sch.reorder(s, jo, io, k, ii, ji)
        if pack_b:
            outer = sch.fuse(s, jo)
            sch.parallel(outer)
            sch.compute_at(reindex_b, outer, preserve_unit_loops=True)
            self._vectorize_tile(sch, reindex_b, nr)
            tile = io
        else:
            outer = sch.fuse(s, jo, io)
            sch.parallel(outer)
            tile = outer
        if mr > 1:
            sch.unroll(ii)
        sch.vectorize(ji)

        # Step 2. Register accumulator + fused epilogue.
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
        auto_inline_consumer_chain(sch, acc)
        self._vectorize_tile(sch, acc, nr)

        # Step 3. Separate the zero-initialisation.
        init = sch.decompose_reduction(main, k)
        self._vectorize_tile(sch, init, nr)
        return sch

    @staticmethod
    def _micro_tile(
        target: Target, lanes: int, ext_i: int | None, ext_j: int | None, packed_nr: int | None = None
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
        # Rows: as many accumulators as the register file holds (keep ~4 free).
        vecs_per_row = max(1, -(-nr // lanes))
        budget = max(1, (_num_vector_registers(target) - 4) // vecs_per_row)
        max_mr = min(8, budget)
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
        ext = _extent(sch, inner)
        if ext is None or ext < 2 or ext > 4 * nr:
            return
        sch.vectorize(inner)


# --------------------------------------------------------------------------------------
# Row reductions (softmax, layer norm, mean, ...)
# --------------------------------------------------------------------------------------
class CPURowReduction(ScheduleRule):
    """Softmax / layer-norm style kernels: reductions over the innermost axis of rows.

    All blocks share leading spatial (row) axes. Rows are fused and parallelized, every
    block is computed per row, elementwise blocks are vectorized, and each inner
    reduction whose extent is a multiple of the SIMD width is rfactor-ed into ``lanes``
    partial accumulators so that the reduction itself is vectorized (a plain scalar
    reduction is latency bound: one dependent add per element).
    """

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(  # pylint: disable=too-many-locals,too-many-branches,too-many-return-statements
        self,
        func: tirx.PrimFunc,
        target: Target,
        _: bool,
    ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        if all(bi.is_injective() for bi in infos) or not infos[-1].is_injective():
            return None
        num_rows = None
        for bi in infos:
            kinds = bi.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            if lead == 0 or "S" in kinds[lead:]:
                return None
            num_rows = lead if num_rows is None else min(num_rows, lead)
        lanes = vector_lanes(target)

        # Inline cheap single-consumer elementwise producers (e.g. x - max into exp).
        for bi in infos[:-1]:
            if bi.is_injective() and len(sch.get_consumers(bi.block_rv)) == 1:
                with contextlib.suppress(Exception):
                    sch.compute_inline(bi.block_rv)

        # Vectorize inner reductions via rfactor (before anything is moved).
        rf_blocks = []
        root = get_root_block(sch)
        for blk in sch.get_child_blocks(root):
            st = sch.get(blk)
            kinds = "".join(
                "R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in st.iter_vars
            )
            if not kinds.endswith("R") or kinds.count("R") != 1:
                continue
            loops = sch.get_loops(blk)
            ext = _extent(sch, loops[-1])
            if ext is None or ext % lanes != 0 or ext < 2 * lanes:
                continue
            try:
                _, ri = sch.split(loops[-1], factors=[None, lanes])
                rf_blocks.append(sch.rfactor(ri, factor_axis=len(loops) - 1))
            except Exception:  # noqa: BLE001 - best effort, never fail the build
                return None

        blocks = sch.get_child_blocks(root)
        last = blocks[-1]
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:num_rows]) if num_rows > 1 else loops[0]
        sch.parallel(row)
        for blk in reversed(blocks[:-1]):
            sch.compute_at(blk, row, preserve_unit_loops=True)

        rf_stmts = {sch.get(b).name_hint for b in rf_blocks}
        for blk in blocks:
            st = sch.get(blk)
            name = st.name_hint
            if name in rf_stmts:
                # compute_at regenerates loops in block-iter order: [row, ri, ..., ro].
                b_loops = sch.get_loops(blk)
                ri, ro = b_loops[1], b_loops[-1]
                sch.reorder(ro, ri)
                sch.vectorize(ri)
                init = sch.decompose_reduction(blk, ro)
                sch.vectorize(sch.get_loops(init)[-1])
            elif all(iv.iter_type == tirx.IterVar.DataPar for iv in st.iter_vars):
                b_loops = sch.get_loops(blk)
                if len(b_loops) <= 1:
                    continue
                ext = _extent(sch, b_loops[-1])
                if ext is None or ext < 2:
                    continue
                if ext % lanes == 0 and ext > lanes:
                    _, vec = sch.split(b_loops[-1], factors=[None, lanes])
                    sch.vectorize(vec)
                elif ext <= lanes:
                    sch.vectorize(b_loops[-1])
        return sch


# --------------------------------------------------------------------------------------
# Injective (elementwise / transpose / gather) rule
# --------------------------------------------------------------------------------------
class CPUInjective(ScheduleRule):
    """Inline chains of spatial blocks, then parallelize + vectorize what remains."""

    min_parallel_elems = 4096

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(  # pylint: disable=too-many-locals
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
        if not blocks:
            return None
        for blk in blocks:
            st = sch.get(blk)
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in st.iter_vars):
                return None
            if len(sch.get_loops(blk)) != len(st.iter_vars):
                return None
        # Inline everything that can be inlined.
        for blk in blocks[:-1]:
            with contextlib.suppress(Exception):
                sch.compute_inline(blk)
        lanes = vector_lanes(target)
        changed = False
        for blk in sch.get_child_blocks(root):
            changed |= self._schedule_block(sch, blk, lanes)
        return sch if changed else None

    def _schedule_block(
        self, sch: s_tir.Schedule, blk: s_tir.schedule.SBlockRV, lanes: int
    ) -> bool:
        loops = sch.get_loops(blk)
        if not loops:
            return False
        exts = [_extent(sch, lp) for lp in loops]
        if any(e is None for e in exts):
            return False
        total = 1
        for e in exts:
            total *= e
        inner_ext = exts[-1]
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        vec = None
        if inner_ext % lanes == 0:
            fused, vec = sch.split(fused, factors=[None, lanes])
        if total >= self.min_parallel_elems:
            sch.parallel(fused)
        if vec is not None:
            sch.vectorize(vec)
        return True


# --------------------------------------------------------------------------------------
# Pass + pipeline
# --------------------------------------------------------------------------------------
def _is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    for key in _SCHEDULED_ATTRS:
        if key in attrs and bool(attrs[key]):
            return True
    return False


def _lowers(func: tirx.PrimFunc, target: Target) -> bool:
    """Check that a scheduled function survives TIR lowering (cheap; no LLVM codegen)."""
    try:
        func = func.with_attr("target", target).with_attr("global_symbol", "main")
        mod = IRModule({"main": func})
        passes = tvm.transform.Sequential(
            [
                s_tir.transform.LowerInitBlock(),
                s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                s_tir.transform.ConvertBlocksToOpaque(),
                s_tir.transform.CompactBufferAllocation(),
                s_tir.transform.LowerMatchBuffer(),
                s_tir.transform.LowerOpaqueBlock(),
                tirx.transform.FlattenBuffer(),
                tirx.transform.VectorizeLoop(True),
                tirx.transform.StorageRewrite(),
                tirx.transform.UnrollLoop(),
                tirx.transform.StmtSimplify(),
                tirx.transform.VerifyMemory(),
            ]
        )
        with target:
            passes(mod)
        return True
    except Exception:  # noqa: BLE001 - best effort, never fail the build
        return False


def _default_rules() -> list[ScheduleRule]:
    return [
        CPUMatmul(),
        dlight.cpu.GEMV(),
        CPURowReduction(),
        dlight.cpu.Reduction(),
        CPUInjective(),
    ]


def default_schedule_pass(target: Target) -> tvm.transform.Pass:
    """A module pass that schedules every PrimFunc that has no schedule yet.

    Functions marked ``tirx.is_scheduled`` (or ``tir.is_scheduled``) are skipped. Rules are
    tried in order (CPUMatmul, dlight.cpu.GEMV, CPURowReduction, dlight.cpu.Reduction,
    CPUInjective); the first one that produces a schedule which also passes the TIR
    lowering passes wins. A rule that raises or yields an unlowerable schedule is skipped,
    and a function no rule handles is left untouched.
    """
    rules = _default_rules()

    @tvm.transform.module_pass(opt_level=0, name="CPUDefaultSchedule")
    def _pass(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            ftarget = func.attrs.get("target", None) if func.attrs is not None else None
            ftarget = ftarget if ftarget is not None else target
            for rule in rules:
                try:
                    with ftarget:
                        sch = rule.apply(func, ftarget, False)
                except Exception as err:  # noqa: BLE001 - a failing rule must not fail the build
                    logger.debug("%s failed on %s: %s", type(rule).__name__, gvar.name_hint, err)
                    continue
                if sch is None:
                    continue
                if isinstance(sch, list):
                    if len(sch) != 1:
                        continue
                    sch = sch[0]
                new_func = sch.mod["main"]
                if not _lowers(new_func, ftarget):
                    logger.debug(
                        "%s: schedule of %s does not lower", type(rule).__name__, gvar.name_hint
                    )
                    continue
                updates[gvar] = new_func.with_attr("tirx.is_scheduled", True)
                logger.debug("%s scheduled %s", type(rule).__name__, gvar.name_hint)
                break
            else:
                logger.debug("no rule applies to %s; left unscheduled", gvar.name_hint)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


def fusion_passes(target: Target, fast_math: bool = True, pack: bool = True) -> list[tvm.transform.Pass]:
    """Weight packing, library dispatch, fast math, legalization and fusion: the part of
    :func:`cpu_pipeline` that decides which PrimFuncs exist. Tuning (compiler/tune.py) extracts
    its tasks after exactly these passes, so the workloads it records are the ones the build
    later looks up. With ``pack``, weight matmuls read B pre-packed in panels of two SIMD
    vectors (pack_weights.py), packed once by the lifted `transform_params` function."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return (
        (packing_passes(2 * vector_lanes(target)) if pack else [])
        + cpu_generic.library_dispatch_passes(target)
        + ([relax.transform.FastMathTransform()] if fast_math else [])
        + cpu_generic.legalize_passes(target)
    )


def is_matmul_like(func: tirx.PrimFunc) -> bool:
    """Whether ``func``'s main reduction is a (batched) matmul with a floating-point result:
    the kernels that dominate transformer inference and that tuning spends its trials on."""
    try:
        sch = s_tir.Schedule(func)
        reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not reductions:
            return False
        stmt = sch.get(reductions[0])
        return (
            str(stmt.writes[0].source.dtype).startswith("float")
            and _matmul_index_maps(stmt) is not None
        )
    except Exception:  # noqa: BLE001 - classification is a hint, never an error
        return False


def cpu_pipeline(
    target: Target,
    fast_math: bool = True,
    database: s_tir.meta_schedule.Database | None = None,
    pack: bool = True,
) -> tvm.transform.Pass:
    """The relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)`` on CPU.

    Same phases as ``tvm.relax.backend.cpu_generic.get_default_pipeline`` with
    :func:`default_schedule_pass` inserted after legalization + fusion (FuseTIR) and before
    the dataflow lowering passes. With ``fast_math`` (default), ``relax.FastMathTransform``
    runs just before legalization so exp/erf/tanh/softmax become vectorizable polynomial
    approximations (|err| ~1e-7) instead of scalar libm calls.

    With a MetaSchedule ``database`` (compiler/tune.py), its records are applied right after
    fusion (``relax.transform.MetaScheduleApplyDatabase``): a fused function whose workload
    has a record gets the tuned schedule and is marked scheduled, so the rule-based pass that
    follows leaves it alone and schedules only the rest.
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0, name="CPUDefaultPipeline")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            mod = tvm.transform.Sequential(fusion_passes(target, fast_math, pack))(mod)
            if database is not None:
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            seq = tvm.transform.Sequential(
                [default_schedule_pass(target)]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            mod = seq(mod)
        return mod

    return _pipeline
