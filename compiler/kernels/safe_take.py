"""Relax pass: make every `take` (ONNX Gather, embedding lookups) bounds-safe.

TVM legalizes `take` in "fast" mode by default: an index outside the table reads out of bounds
and can segfault. The runtime already refuses bad token ids before calling TVM; this pass is the
second line, so a missed check (or MetaSchedule's runner feeding random indices to a gather
kernel) can never crash the process. "wrap" matches ONNX Gather's negative-index semantics and
costs one modulo per index.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_TAKE = tvm.ir.Op.get("relax.take")


@mutator
class _SafeTakeMutator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, mode: str):
        super().__init__(mod)
        self.mod_, self.mode = mod, mode

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_TAKE) and str(call.attrs.mode) == "fast":
            axis = call.attrs.axis
            return relax.op.take(
                call.args[0], call.args[1], None if axis is None else int(axis), self.mode
            )
        return call

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="SafeTake")
class SafeTake:
    """Rewrite `take(..., mode="fast")` to a bounds-safe mode (default "wrap")."""

    def __init__(self, mode: str = "wrap"):
        self.mode = mode

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _SafeTakeMutator(mod, self.mode).run()
