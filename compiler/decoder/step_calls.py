"""Fewer Relax VM calls per decode step: the CPU finalization passes, less what costs a step
time and buys it nothing.

A decode step of SmolLM2 (30 layers) ran 2,176 VM calls around its ~330 kernels: 798
`vm.builtin.null_value` (KillAfterLastUse's `kill_tensor`/`kill_storage`), 668
`alloc_tensor`, 123 `reshape` and 122 `make_tuple`. In the step functions:

- **no kills**: StaticPlanBlockMemory has already fixed which storage each tensor lives in, so
  releasing a view early frees no memory; the step's handful of storages are released when it
  returns. Prefill keeps its kills (its tensors grow with the prompt).
- **no tuples nobody reads**: CallTIRRewrite leaves each multi-output kernel's results bound as
  a tuple, and its elements taken out of it, though later code reads the results themselves;
  the VM still builds the tuple and takes the elements.
- **each tensor view made once**: every layer asks for the same views of the same planned
  storage (668 `alloc_tensor` calls for 26 distinct views); without kills, the first one can
  serve them all, and a `reshape` of the same view to the same shape likewise.

502 VM calls a step remain; the int4 step went 4.83 -> 4.66 ms with the first two and 4.03 ->
3.77 ms with the third on a 2-core Zen 3 (docs/benchmarks.md).
"""

from __future__ import annotations

import tvm
from tvm import relax

#: The functions run once per generated token (decoder/entry.py).
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


@relax.expr_functor.mutator
class _ShareViews(relax.PyExprMutator):
    """The function with each tensor view made once: a later `alloc_tensor` of the same storage,
    offset, shape and dtype (or `reshape` of the same tensor to the same shape) reads the first.
    Only where nothing is killed (a view shared by two values must outlive both), and for
    straight-line code as the step functions are (the first view must come before every use)."""

    VIEWS = ("relax.memory.alloc_tensor", "relax.reshape")

    def __init__(self):
        super().__init__()
        self.first: dict[tuple, relax.Var] = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") in self.VIEWS:
            args = [self.visit_expr(a) for a in value.args]
            key = (value.op.name, args[0], *(str(a) for a in args[1:]))
            if key in self.first:
                self.set_var_remap(binding.var, self.first[key])
                return
            super().visit_var_binding_(binding)
            self.first[key] = binding.var
            return
        super().visit_var_binding_(binding)


def share_views(func: relax.Function) -> relax.Function:
    """`func` with its repeated tensor views made once (a decode step: SmolLM2's 30 layers asked
    for the same 26 views 668 times; each `alloc_tensor` is a VM call that builds an object)."""
    return _ShareViews().visit_expr(func)


def finalize_passes(target, step_functions=STEP_FUNCTIONS) -> list:
    """TVM's CPU finalization passes, unread tuples dropped everywhere; `step_functions` without
    kills and with their tensor views shared."""
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
                killed[gv] = share_views(mod[gv])
        return killed

    stock = cpu_generic.finalize_passes(target)
    names = [p.info.name for p in stock]
    if "KillAfterLastUse" not in names:
        raise RuntimeError("TVM's CPU finalization passes no longer include KillAfterLastUse")
    at = names.index("KillAfterLastUse")
    tuples = [relax.transform.CanonicalizeBindings(), unread_tuples]
    return stock[:at] + tuples + [kills_but_steps] + stock[at + 1 :]
