"""Tasks: the fused kernels of a module, with how much of each bucket's time they take.

Trials go where the time goes: only matmul-class kernels are tuned (injective, gather, softmax and
layer-norm kernels keep the rule-based schedules of cpu_schedule.py), weighted by their share of
each bucket's measured time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.dlight.analysis import get_root_block

from ..kernels.cpu_int8 import KERNEL_ATTR
from ..kernels.cpu_schedule import fusion_passes, is_matmul_like


@dataclass
class Task:
    """One distinct fused kernel (a MetaSchedule workload) and where it is called."""

    name: str
    mod: Any  # IRModule {"main": PrimFunc}, normalized as MetaSchedule keys it
    key: str
    flop: float
    kind: str  # "matmul", "reduction" or "injective"
    calls: dict[str, int]  # bucket function -> call count
    tuned: bool = False
    coefficient: float = 0.0  # Σ_b calls_b / T_b: weight of this kernel's time in the objective
    rule_based_secs: float | None = None
    best_secs: float | None = None  # best tuned record (any source) measured here
    trials: int = 0
    new_trials: int = 0
    stale: int = 0
    exhausted: bool = False
    context: Any = None  # ms.TuneContext, created when the task is first picked
    measured: set[int] = field(default_factory=set)  # structural hashes of measured schedules

    @property
    def weight(self) -> int:
        return sum(self.calls.values())

    @property
    def current_secs(self) -> float:
        """The time this kernel has now: the better of the rule-based and the tuned schedule."""
        options = [s for s in (self.rule_based_secs, self.best_secs) if s is not None]
        return min(options) if options else self.flop / 20e9

    def priority(self) -> float:
        return self.coefficient * self.current_secs * (0.75 ** max(0, self.stale - 1))


def workload_key(mod) -> str:
    """MetaSchedule's key for a workload: the structural hash, as JSONDatabase writes it."""
    return str(tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF)


def fused_module(mod, target):
    """`mod` after the CPU pipeline's fusion passes: the PrimFuncs that get scheduled."""
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fusion_passes(target))(mod)


def extract_tasks(mod, target) -> list[Task]:
    """Distinct fused kernels of `mod` (all bucket functions), with calls per bucket.

    Uses `ms.relax_integration.extract_tasks` per bucket function so the workloads are exactly
    MetaSchedule's (normalized and keyed by structural hash), then merges equal workloads.
    """
    fused = fused_module(mod, target)
    prim_funcs = {gv: f for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    tasks: dict[str, Task] = {}
    for gv, func in fused.functions_items():
        if not isinstance(func, relax.Function):
            continue
        one = tvm.IRModule({gv: func, **prim_funcs})
        for extracted in ms.relax_integration.extract_tasks(one, target):
            task_mod = extracted.dispatched[0]
            if _hand_scheduled(task_mod["main"]):
                continue  # the int8 kernels (cpu_int8.py): written per ISA, nothing to tune
            key = workload_key(task_mod)
            if key not in tasks:
                prim = task_mod["main"]
                has_reduction = any(
                    iv.iter_type == tirx.IterVar.CommReduce
                    for block in _blocks(prim)
                    for iv in block.iter_vars
                )
                kind = (
                    "matmul"
                    if is_matmul_like(prim)
                    else "reduction"
                    if has_reduction
                    else "injective"
                )
                tasks[key] = Task(
                    name=extracted.task_name,
                    mod=task_mod,
                    key=key,
                    flop=float(estimate_tir_flops(task_mod)),
                    kind=kind,
                    calls={},
                )
            calls = tasks[key].calls
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + int(extracted.weight)
    return sorted(tasks.values(), key=lambda t: -t.flop * t.weight)


def _hand_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and (KERNEL_ATTR in attrs or "tirx.is_scheduled" in attrs)


def _blocks(func) -> list:
    """The blocks under the root of a (legalized, unscheduled) PrimFunc."""
    try:
        sch = s_tir.Schedule(func)
        return [sch.get(b) for b in sch.get_child_blocks(get_root_block(sch))]
    except Exception:  # noqa: BLE001 - classification is a hint
        return []


def select_tasks(tasks: list[Task], min_share: float = 0.01) -> list[Task]:
    """Mark the tasks worth trials: matmul-class kernels taking at least `min_share` of some
    bucket's FLOPs. Everything else keeps its rule-based schedule."""
    bucket_flop: dict[str, float] = {}
    for task in tasks:
        for bucket, n in task.calls.items():
            bucket_flop[bucket] = bucket_flop.get(bucket, 0.0) + n * task.flop
    for task in tasks:
        shares = [
            n * task.flop / bucket_flop[b] for b, n in task.calls.items() if bucket_flop[b] > 0
        ]
        task.tuned = task.kind == "matmul" and bool(shares) and max(shares) >= min_share
    return [t for t in tasks if t.tuned]


def set_coefficients(tasks: list[Task]) -> None:
    """Objective: every bucket's latency counts relative to its rule-based latency, so a
    kernel's coefficient is Σ_b calls_b / T_b (T_b: the tuned kernels' rule-based time in b)."""
    bucket_secs: dict[str, float] = {}
    for task in tasks:
        for bucket, n in task.calls.items():
            bucket_secs[bucket] = bucket_secs.get(bucket, 0.0) + n * task.current_secs
    for task in tasks:
        task.coefficient = sum(
            n / bucket_secs[b] for b, n in task.calls.items() if bucket_secs[b] > 0
        )
