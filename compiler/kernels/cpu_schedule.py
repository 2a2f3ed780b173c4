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

import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.target import Target

from .cpu_attention import FuseAttention
from .cpu_matmul import CPUMatmul, matmul_index_maps
from .cpu_rules import CPUInjective, CPURowReduction
from .cpu_target import num_vector_registers, register_rows, vector_lanes
from .pack_weights import packing_passes

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


def fusion_passes(
    target: Target, fast_math: bool = True, pack: bool = True
) -> list[tvm.transform.Pass]:
    """Attention fusion, weight packing, library dispatch, fast math, legalization and fusion:
    the part of :func:`cpu_pipeline` that decides which PrimFuncs exist. Tuning
    (compiler/tuning/) extracts its tasks after exactly these passes, so the workloads it records
    are the ones the build later looks up. Attention becomes one kernel per layer that keeps its
    scores in cache (cpu_attention.py). With ``pack``, weight matmuls read B pre-packed in
    panels of two SIMD vectors (pack_weights.py), packed once by the lifted `transform_params`
    function."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return (
        [FuseAttention(vector_lanes(target), num_vector_registers(target))]
        + (packing_passes(2 * vector_lanes(target), register_rows(target, 2)) if pack else [])
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
            and matmul_index_maps(stmt) is not None
        )
    except Exception:  # noqa: BLE001 - classification is a hint, never an error
        return False


def cpu_pipeline(
    target: Target,
    fast_math: bool = True,
    database: s_tir.meta_schedule.Database | None = None,
    pack: bool = True,
    finalize=None,
) -> tvm.transform.Pass:
    """The relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)`` on CPU.

    Same phases as ``tvm.relax.backend.cpu_generic.get_default_pipeline`` with
    :func:`default_schedule_pass` inserted after legalization + fusion (FuseTIR) and before
    the dataflow lowering passes. With ``fast_math`` (default), ``relax.FastMathTransform``
    runs just before legalization so exp/erf/tanh/softmax become vectorizable polynomial
    approximations (|err| ~1e-7) instead of scalar libm calls.

    With a MetaSchedule ``database`` (compiler/tuning/), its records are applied right after
    fusion (``relax.transform.MetaScheduleApplyDatabase``): a fused function whose workload
    has a record gets the tuned schedule and is marked scheduled, so the rule-based pass that
    follows leaves it alone and schedules only the rest.

    `finalize(target)` gives the finalization passes in the place of TVM's CPU ones (a
    decoder's: compiler/decoder/step_calls.py).
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
                + (finalize or cpu_generic.finalize_passes)(target)
            )
            mod = seq(mod)
        return mod

    return _pipeline
