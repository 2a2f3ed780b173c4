"""Fused attention for CPUs: `softmax(Q·Kᵀ + mask)·V` as one kernel that never writes the scores.

Why: exported transformers compute attention as four graph ops (matmul, add of the mask, softmax,
matmul). Run one by one, the [batch, heads, seq, seq] scores go to memory and back three times;
at batch 8 x seq 128 that is 6 MB per layer, more than the kernels' arithmetic costs (the
scores matmul of the demo MiniLM ran at a third of its in-cache speed inside the model). Here
each parallel task takes a few query rows of one head, computes their scores, the softmax and
the product with V while the rows sit in L1, and writes only the output.

`FuseAttention` rewrites the pattern in every static-shape bucket function; `attention_kernel`
builds the scheduled PrimFunc (FuseOps leaves it alone, tuning skips it). The softmax is the
same fast-math exp the unfused graph uses; the division by the row sum comes after the product
with V (the same value up to rounding).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.ir import IRModule
from tvm.s_tir.dlight.analysis import get_root_block

from .cpu_int8 import KERNEL_ATTR, OPAQUE_PATTERN
from .cpu_target import largest_divisor
from .pack_weights import BindingRewriter, static_shape

__all__ = ["FuseAttention", "attention_kernel", "count_fused"]

#: Query rows per parallel task: their scores (rows x keys floats) stay in L1.
ROWS = 8
#: Below this many multiply-adds the kernel runs on the calling thread (as the GEMMs do).
MIN_PARALLEL_MACS = 1 << 19


def _attention_te(q: te.Tensor, kt: te.Tensor, mask: te.Tensor | None, v: te.Tensor) -> te.Tensor:
    """out[b, h, i, :] = softmax_j(q[b, h, i, :]·kt[b, h, :, j] + mask[..]) · v[b, h, j, :]."""
    batch, heads, rows, depth = q.shape
    keys, width = kt.shape[3], v.shape[3]
    d = te.reduce_axis((0, depth), "d")
    scores = te.compute(
        (batch, heads, rows, keys),
        lambda b, h, i, j: te.sum(q[b, h, i, d] * kt[b, h, d, j], axis=d),
        name="scores",
    )

    def masked(b, h, i, j):
        if mask is None:
            return scores[b, h, i, j]
        index = [0 if int(ext) == 1 else x for ext, x in zip(mask.shape, (b, h, i, j))]
        return scores[b, h, i, j] + mask[tuple(index)]

    j1 = te.reduce_axis((0, keys), "j1")
    row_max = te.compute(
        (batch, heads, rows), lambda b, h, i: te.max(masked(b, h, i, j1), axis=j1), name="row_max"
    )
    shifted = te.compute(
        (batch, heads, rows, keys),
        lambda b, h, i, j: masked(b, h, i, j) - row_max[b, h, i],
        name="shifted",
    )
    probs = topi.fast_exp(shifted)
    j2 = te.reduce_axis((0, keys), "j2")
    row_sum = te.compute(
        (batch, heads, rows), lambda b, h, i: te.sum(probs[b, h, i, j2], axis=j2), name="row_sum"
    )
    j3 = te.reduce_axis((0, keys), "j3")
    pv = te.compute(
        (batch, heads, rows, width),
        lambda b, h, i, e: te.sum(probs[b, h, i, j3] * v[b, h, j3, e], axis=j3),
        name="pv",
    )
    return te.compute(
        (batch, heads, rows, width),
        lambda b, h, i, e: pv[b, h, i, e] / row_sum[b, h, i],
        name="attention",
    )


def attention_kernel(
    q_shape: list[int],
    kt_shape: list[int],
    mask_shape: list[int] | None,
    v_shape: list[int],
    lanes: int,
    registers: int = 32,
) -> tirx.PrimFunc:
    """The scheduled fused-attention PrimFunc for these static shapes and SIMD width.

    Per task (one head, `ROWS` query rows): scores as a register-blocked GEMM over the head
    dimension, row max and row sum as `lanes`-wide partial reductions (rfactor), exp vectorized
    over the keys, the product with V with its accumulators in registers, then the division.
    Both products keep as many accumulator vectors as `registers` holds beside the operands:
    spilled accumulators made the AVX2 kernel 1.3x slower (docs/benchmarks.md)."""
    q = te.placeholder(q_shape, "float32", name="q")
    kt = te.placeholder(kt_shape, "float32", name="kt")
    mask = te.placeholder(mask_shape, "float32", name="mask") if mask_shape else None
    v = te.placeholder(v_shape, "float32", name="v")
    out = _attention_te(q, kt, mask, v)
    args = [q, kt] + ([mask] if mask is not None else []) + [v, out]
    sch = s_tir.Schedule(te.create_prim_func(args))
    batch, heads, rows, depth = q_shape
    keys, width = kt_shape[3], v_shape[3]

    def block(name: str):
        return sch.get_sblock(name)

    sch.compute_inline(block("shifted"))
    exp_name = next(
        sch.get(b).name_hint
        for b in sch.get_child_blocks(get_root_block(sch))
        if "exp" in sch.get(b).name_hint
    )
    # Row reductions over the keys as `lanes` partial results (vectorized), before anything moves.
    reduce_vectorized = keys % lanes == 0 and keys >= 2 * lanes
    partial = {}
    if reduce_vectorized:
        for name in ("row_max", "row_sum"):
            _, inner = sch.split(sch.get_loops(block(name))[-1], [None, lanes])
            partial[name] = sch.rfactor(inner, factor_axis=3)

    b, h, i, e = sch.get_loops(block("attention"))
    tile_rows = largest_divisor(rows, ROWS)
    i_outer, _ = sch.split(i, [None, tile_rows])
    task = sch.fuse(b, h, i_outer)
    if batch * heads * rows * keys * (depth + width) >= MIN_PARALLEL_MACS:
        sch.parallel(task)
    sch.vectorize(e)
    for name in ("pv", "row_sum", "row_sum_rf", exp_name, "row_max", "row_max_rf", "scores"):
        if name.endswith("_rf"):
            if name[:-3] in partial:
                sch.compute_at(partial[name[:-3]], task, preserve_unit_loops=True)
        else:
            sch.compute_at(block(name), task, preserve_unit_loops=True)

    # Accumulator vectors per row that fit the register file beside the operands (~4 registers):
    # 16 ymm on AVX2 hold 8 rows x 1 vector, 32 zmm or NEON registers 8 rows x 3.
    vectors = max(1, (registers - 4) // tile_rows)

    # scores[i, j] over d: rows x (up to two vectors of keys) accumulators, d outside.
    si, sj, sd = sch.get_loops(block("scores"))[-3:]
    cols = largest_divisor(keys, min(2, vectors) * lanes)
    sj_outer, sj_inner = sch.split(sj, [None, cols])
    sch.reorder(sj_outer, sd, si, sj_inner)
    sch.unroll(si)
    sch.vectorize(sj_inner)
    sch.decompose_reduction(block("scores"), sd)

    sch.vectorize(sch.get_loops(block(exp_name))[-1])

    for rf_block in partial.values():
        loops = sch.get_loops(rf_block)
        lane_loop = next(lp for lp in loops[1:] if sch.get(lp).extent == lanes)
        sch.reorder(loops[-2], loops[-1], lane_loop)
        sch.vectorize(lane_loop)
        init = sch.decompose_reduction(rf_block, sch.get_loops(rf_block)[-2])
        sch.vectorize(sch.get_loops(init)[-1])

    # pv[i, e] over j: rows x (a slice of width) accumulators, keys outside.
    pi, pe, pj = sch.get_loops(block("pv"))[-3:]
    pe_outer, pe = sch.split(pe, [None, largest_divisor(width, vectors * lanes)])
    sch.reorder(pe_outer, pj, pi, pe)
    sch.unroll(pi)
    sch.vectorize(pe)
    sch.decompose_reduction(block("pv"), pj)

    return (
        sch.mod["main"]
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
        .with_attr(KERNEL_ATTR, "attention")
    )


def _float32_shape(expr) -> list[int] | None:
    if not isinstance(expr.ty, relax.TensorType) or str(expr.ty.dtype) != "float32":
        return None
    return static_shape(expr.ty)


def _call(expr, op_name: str):
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get(op_name):
        return expr
    return None


@relax.expr_functor.mutator
class _AttentionFuser(BindingRewriter):
    """Replaces `matmul(softmax(matmul(q, kt) [+ mask], axis=-1), v)` (4-D, static shapes,
    intermediates used nowhere else) by one call of the fused kernel."""

    def __init__(self, mod: IRModule, lanes: int, registers: int):
        super().__init__(mod)
        self.lanes, self.registers = lanes, registers
        self.bound: dict = {}  # var -> its bound value (the function being visited)
        self.uses: dict = {}  # var -> number of uses

    def visit_function_(self, func):
        self.bound, self.uses = {}, {}
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.bound[binding.var] = binding.value
                    for var in relax.analysis.free_vars(binding.value):
                        self.uses[var] = self.uses.get(var, 0) + 1
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var] = self.uses.get(var, 0) + 1
        return super().visit_function_(func)

    def _producer(self, expr, op_name: str):
        """The call of `op_name` that `expr` (a var used only here) is bound to."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        return _call(self.bound.get(expr), op_name)

    def rewrite(self, value):
        outer = _call(value, "relax.matmul")
        if outer is None:
            return None
        probs, v = outer.args
        softmax = self._producer(probs, "relax.nn.softmax")
        if softmax is None or int(softmax.attrs.axis) not in (-1, 3):
            return None
        logits, mask = softmax.args[0], None
        scores = self._producer(logits, "relax.matmul")
        if scores is None:
            added = self._producer(logits, "relax.add")
            if added is None:
                return None
            logits, mask = added.args
            scores = self._producer(logits, "relax.matmul")
            if scores is None:
                logits, mask = mask, logits
                scores = self._producer(logits, "relax.matmul")
            if scores is None:
                return None
        q, kt = scores.args
        shapes = [_float32_shape(x) for x in (q, kt, v)]
        if any(s is None or len(s) != 4 for s in shapes):
            return None
        q_shape, kt_shape, v_shape = shapes
        batch, heads, rows, depth = q_shape
        keys = kt_shape[3]
        if kt_shape[:2] != [batch, heads] or kt_shape[2] != depth:
            return None
        if v_shape[:3] != [batch, heads, keys]:
            return None
        mask_shape = None
        if mask is not None:
            mask_shape = _float32_shape(mask)
            full = [batch, heads, rows, keys]
            if mask_shape is None or len(mask_shape) != 4:
                return None
            if any(m not in (1, f) for m, f in zip(mask_shape, full)):
                return None
        name = "attention_" + "x".join(map(str, [batch, heads, rows, keys, depth, v_shape[3]]))
        if mask_shape is not None:
            name += "_mask" + "x".join(map(str, mask_shape))
        kernel = self.kernel_func(
            name,
            lambda: attention_kernel(
                q_shape, kt_shape, mask_shape, v_shape, self.lanes, self.registers
            ),
        )
        args = [self.visit_expr(x) for x in (q, kt, *([mask] if mask is not None else []), v)]
        return relax.call_tir(
            kernel,
            relax.Tuple(args),
            relax.TensorType([batch, heads, rows, v_shape[3]], "float32"),
        )


def FuseAttention(lanes: int, registers: int = 32) -> tvm.transform.Pass:
    """Fuse every static-shape attention (matmul, optional mask add, softmax, matmul) into one
    kernel vectorized to `lanes` float32 lanes, its accumulators sized to `registers` vector
    registers."""

    @tvm.transform.module_pass(opt_level=0, name="FuseAttention")
    def _pass(mod: IRModule, _ctx) -> IRModule:
        return _AttentionFuser(mod, lanes, registers).rewrite_module(mod)

    return _pass


def count_fused(mod: IRModule) -> int:
    """How many fused-attention calls the functions of `mod` make."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    return sum(
        1
        for func in mod.functions.values()
        if isinstance(func, relax.Function)
        for block in func.body.blocks
        for binding in block.bindings
        if isinstance(binding.value, relax.Call)
        and binding.value.op == call_tir
        and binding.value.args[0].name_hint.startswith("attention_")
    )
