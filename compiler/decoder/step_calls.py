"""Fewer Relax VM calls per decode step: the CPU finalization passes, less what costs a step
time and buys it nothing.

A decode step of SmolLM2 (30 layers) ran ~2,200 VM calls around its ~330 kernels: 798
`vm.builtin.null_value` (KillAfterLastUse's `kill_tensor`/`kill_storage`), 668
`alloc_tensor`, 123 `reshape` and 122 `make_tuple`. Two of those kinds do nothing a step needs:

- **kills in the step functions**: StaticPlanBlockMemory has already fixed which storage each
  tensor lives in, so releasing a view early frees no memory; the step's handful of storages
  are released when it returns. Prefill keeps its kills (its tensors grow with the prompt).
- **tuples nobody reads**: CallTIRRewrite leaves each multi-output kernel's results bound as a
  tuple, and its elements taken out of it, though later code reads the results themselves;
  the VM still builds the tuple and takes the elements.

Dropping both took the int4 step from 4.83 to 4.66 ms on a 2-core Zen 3 (docs/benchmarks.md).
"""

from __future__ import annotations

import tvm
from tvm import relax

#: The functions run once per generated token (kernels/../decoder/entry.py).
STEP_FUNCTIONS = ("decode", "decode1")


@relax.expr_functor.visitor
class _Uses(relax.PyExprVisitor):
    """Every variable an expression reads (binding sites are not reads)."""

    def __init__(self):
        super().__init__()
        self.read: set = set()

    def visit_var_(self, op):
        self.read.add(op)

    def visit_dataflow_var_(self, op):
        self.read.add(op)


@relax.expr_functor.mutator
class _DropUnreadTuples(relax.PyExprMutator):
    """The function less its tuple and tuple-element bindings that nothing reads."""

    def __init__(self, read: set):
        super().__init__()
        self.read = read
        self.dropped = 0

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Tuple | relax.TupleGetItem) and binding.var not in self.read:
            self.dropped += 1
            return
        super().visit_var_binding_(binding)


def drop_unread_tuples(func: relax.Function) -> relax.Function:
    """`func` less the unread tuples, and the elements taken out of them that nothing reads
    (until none is left: dropping the elements leaves their tuple unread)."""
    while True:
        uses = _Uses()
        uses.visit_expr(func)
        drop = _DropUnreadTuples(uses.read)
        lean = drop.visit_expr(func)
        if not drop.dropped:
            return func
        func = lean


def finalize_passes(target, step_functions=STEP_FUNCTIONS) -> list:
    """TVM's CPU finalization passes, unread tuples dropped and no kills in `step_functions`."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0, name="DropUnreadTuples")
    def unread_tuples(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = drop_unread_tuples(func)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="KillAfterLastUseButSteps")
    def kills_but_steps(mod, _ctx):
        killed = relax.transform.KillAfterLastUse()(mod)
        for gv in mod.get_global_vars():
            if gv.name_hint in step_functions:
                killed[gv] = mod[gv]
        return killed

    stock = cpu_generic.finalize_passes(target)
    names = [p.info.name for p in stock]
    if "KillAfterLastUse" not in names:
        raise RuntimeError("TVM's CPU finalization passes no longer include KillAfterLastUse")
    at = names.index("KillAfterLastUse")
    tuples = [relax.transform.CanonicalizeBindings(), unread_tuples]
    return stock[:at] + tuples + [kills_but_steps] + stock[at + 1 :]
