"""Rule-based CPU schedules for the kernels around the matmuls: softmax / layer norm rows, and
element-wise (injective) kernels.

`CPURowReduction` vectorizes row reductions with rfactor; `CPUInjective` parallelizes the outer
loops and vectorizes the inner one to the target's SIMD width.
"""

from __future__ import annotations

import contextlib
import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .cpu_target import loop_extent, vector_lanes


class CPURowReduction(ScheduleRule):
    """Softmax / layer-norm style kernels: reductions over the innermost axis of rows.

    All blocks share leading spatial (row) axes. Rows are fused and parallelized, every
    block is computed per row, elementwise blocks are vectorized, and each inner
    reduction whose extent is a multiple of the SIMD width is rfactor-ed into ``lanes``
    partial accumulators so that the reduction itself is vectorized (a plain scalar
    reduction is latency bound: one dependent add per element).
    """

    #: Below this many output elements a kernel runs on the calling thread.
    min_parallel_elems = 8192

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
            ext = loop_extent(sch, loops[-1])
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
        exts = [loop_extent(sch, lp) for lp in loops]
        if _single_row(infos, num_rows):
            # One row (a static batch-1 decode step): its unit loops are gone, and the first
            # loop left is the row's own axis. Computing every block per iteration of that
            # would redo the whole reduction per element (576x for SmolLM2's RMSNorm, 73 us a
            # call); the row is a unit loop of its own instead.
            row = sch.add_unit_loop(loops[0])
        else:
            row = sch.fuse(*loops[:num_rows]) if num_rows > 1 else loops[0]
        if any(e is None for e in exts) or math.prod(exts) >= self.min_parallel_elems:
            sch.parallel(row)  # waking the thread pool costs more than a small kernel's work
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
                ext = loop_extent(sch, b_loops[-1])
                if ext is None or ext < 2:
                    continue
                if ext % lanes == 0 and ext > lanes:
                    _, vec = sch.split(b_loops[-1], factors=[None, lanes])
                    sch.vectorize(vec)
                elif ext <= lanes:
                    sch.vectorize(b_loops[-1])
        return sch


def _single_row(infos, num_rows: int) -> bool:
    """Whether a row-reduction kernel has one row: a reduction whose leading `num_rows` axes
    are all of extent 1 (normalization strips those from the element-wise blocks, not from
    the reductions)."""
    for info in infos:
        if not info.is_injective():
            dom = info.dom()[:num_rows]
            if all(isinstance(d, int) for d in dom) and math.prod(dom) == 1:
                return True
    return False


class CPUInjective(ScheduleRule):
    """Inline chains of spatial blocks, then parallelize + vectorize what remains."""

    min_parallel_elems = 4096
    #: Outer iterations needed to parallelize over rows rather than over the flattened loop.
    min_rows = 16

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
        exts = [loop_extent(sch, lp) for lp in loops]
        inner_ext = exts[-1]
        if inner_ext is None:
            return False
        if any(e is None for e in exts):
            # A symbolic row count (a prompt's length): rows in parallel, each row vectorized
            # when it is whole vectors. Unscheduled, a prefill's fused SiLU-multiply wrote five
            # intermediates serially (69 ms of SmolLM2's 512-token prefill).
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]  # >= 2 loops here
            sch.parallel(outer)
            if inner_ext % lanes == 0:
                _, vec = sch.split(loops[-1], factors=[None, lanes])
                sch.vectorize(vec)
            return True
        total = 1
        for e in exts:
            total *= e
        if len(loops) > 1 and inner_ext % lanes == 0 and total // inner_ext >= self.min_rows:
            # Rows in parallel, each row's vectors in a serial loop: the index arithmetic of a
            # reshape/transpose is done once a row, not once a vector (the head-split transposes
            # of BERT attention ran 2-4x faster this way inside the model).
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            _, vec = sch.split(loops[-1], factors=[None, lanes])
        else:
            outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            vec = None
            if inner_ext % lanes == 0:
                outer, vec = sch.split(outer, factors=[None, lanes])
        if total >= self.min_parallel_elems:
            sch.parallel(outer)
        if vec is not None:
            sch.vectorize(vec)
        return True
