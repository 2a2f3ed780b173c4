"""SiLU on a vectorizable exp for the CPU decoders.

Why: `relax.nn.silu` legalizes to `x * sigmoid(x)`, and LLVM turns each `sigmoid`'s exp into a
scalar libm call, so the gated MLP's elementwise kernel ran at ~4 ns an element: 116 ms of
SmolLM2's 1.25 s prefill of 512 tokens on a 2-core Zen 3, as long as its down projection
(docs/benchmarks.md). `FastSiLU` rewrites each silu to `x / (1 + fast_exp(-x))` (TOPI's
polynomial exp, relative error ~1e-7 over the float range, clamped at +-88), which vectorizes.
"""

from __future__ import annotations

import tvm
from tvm import relax, topi
from tvm.relax import Call, Expr, PyExprMutator, expr_functor


def _fast_silu(x):
    return topi.divide(x, topi.add(topi.fast_exp(topi.negative(x)), tvm.tirx.const(1, x.dtype)))


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def visit_call_(self, call: Call) -> Expr:
        call = super().visit_call_(call)
        if isinstance(call, Call) and getattr(call.op, "name", None) == "relax.nn.silu":
            return self.builder_.call_te(_fast_silu, call.args[0], primfunc_name_hint="fast_silu")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastSiLU")
def fast_silu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`mod` with every `relax.nn.silu` computed on TOPI's fast exp."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
