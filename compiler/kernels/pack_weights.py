"""Weight pre-packing for CPU matmuls: lay each weight out the way the GEMM kernel reads it, once.

Why: a Linear layer's weight arrives as W[K, N]. The CPU GEMM (cpu_matmul.CPUMatmul) walks
N in register tiles of `nr` columns, so reading W directly touches one 128-byte piece of a
different row (and page) per k step: TLB- and prefetch-bound, and for big weights the kernel
re-packed a [K, nr] panel on every call. ONNX Runtime avoids both by packing constant weights
once at session start. We do the same, in TVM's own terms:

1. `PackMatmulWeights(nr)` rewrites `matmul(x, W)` for every weight-derived W[K, N] (a weight
   parameter, or a transpose of one as ONNX Gemm produces) into
   `call_tir(matmul_packed, x, permute_dims(reshape(W, [K, N/nr, nr]), [1, 0, 2]))`: a matmul that
   reads a contiguous [N/nr, K, nr] panel layout. The block carries the annotation
   ``tvmdeploy.packed_b = nr`` so the schedule knows B is already packed. Where the GEMM's
   register tile does not divide the rows (6 rows on AVX2), the matmul computes rows padded to
   whole tiles and slices them back (`padded_rows`).
2. `relax.transform.LiftTransformParams(shared_transform=True)` then moves everything that
   depends only on weights (the packing, ONNX's weight transposes) into one `transform_params`
   function, `transform_params(*weights)`. The bundle keeps the
   original weights once; each artifact packs them for its own vector width when it is loaded
   (runtime/_tvm.py `prepare_params`).
"""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm.ir import IRModule
from tvmdeploy.runtime._tvm import TRANSFORM_PARAMS

from ..options import FALLBACK_FUNCTION

PACKED_B_ATTR = "tvmdeploy.packed_b"


def static_shape(ty) -> list[int] | None:
    """The dimensions of a tensor type when all are known integers, else None."""
    if not isinstance(ty, relax.type.TensorType) or ty.shape is None:
        return None
    shape = ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = []
    for dim in shape.values:
        if not isinstance(dim, tvm.tirx.IntImm):
            return None
        dims.append(int(dim.value))
    return dims


def padded_rows(rows: int, row_tile: int | None) -> int:
    """The row count a weight matmul computes: `rows` rounded up to the GEMM's register tile
    when that tile does not divide it (6 rows on AVX2 against 64, 128, 1024, ...), so every tile
    is whole and only the store is guarded. A guarded tile inside the k loop kept the tail rows'
    accumulators in memory (docs/benchmarks.md); below 8 tiles the padding would cost more than
    the smaller tile it replaces."""
    if not row_tile or rows % row_tile == 0 or rows < 8 * row_tile:
        return rows
    return -(-rows // row_tile) * row_tile


def packed_matmul(
    x: te.Tensor, wp: te.Tensor, nr: int, out_dtype: str, row_tile: int | None = None
) -> te.Tensor:
    """out[..., j] = sum_k x[..., k] * wp[j // nr, k, j % nr]; over `padded_rows` rows (the
    extra ones read the last real row again) and then sliced, where padding applies. A
    symbolic row count (a decoder's prompt) is always padded to whole tiles of `row_tile`: a
    guarded tile keeps its accumulators in memory (cpu_matmul.CPUMatmul._accumulator_scope)."""
    num_k = wp.shape[1]
    n = wp.shape[0] * nr
    k = te.reduce_axis((0, num_k), name="k")
    lead = list(x.shape[:-1]) if row_tile else []
    rows = 1
    for d in lead:
        rows *= d
    symbolic = not isinstance(rows, (int, tvm.tirx.IntImm))
    if symbolic:
        padded = (rows + row_tile - 1) // row_tile * row_tile
    else:
        lead = [int(d) for d in lead]
        rows = int(rows)
        padded = padded_rows(rows, row_tile) if lead else 0

    def product(a, b):
        if out_dtype != x.dtype:
            a, b = a.astype(out_dtype), b.astype(out_dtype)
        return a * b

    if not symbolic and (not padded or padded == rows):

        def body(*idx):
            j = idx[-1]
            return te.sum(product(x[tuple(idx[:-1]) + (k,)], wp[j // nr, k, j % nr]), axis=k)

        return te.compute(
            tuple(x.shape[:-1]) + (n,), body, name="matmul_packed", attrs={PACKED_B_ATTR: nr}
        )

    def row_index(i):  # row i of x as [rows, K], the last real row for the padding
        i = te.min(i, rows - 1)
        idx = []
        for d in reversed(lead):
            idx.append(i % d)
            i = i // d
        return tuple(reversed(idx))

    full = te.compute(
        (padded, n),
        lambda i, j: te.sum(product(x[row_index(i) + (k,)], wp[j // nr, k, j % nr]), axis=k),
        name="matmul_packed",
        attrs={PACKED_B_ATTR: nr},
    )

    def flat(idx):
        i = idx[0]
        for d, v in zip(lead[1:], idx[1:]):
            i = i * d + v
        return i

    return te.compute(
        tuple(lead) + (n,), lambda *idx: full[flat(idx[:-1]), idx[-1]], name="matmul_rows"
    )


class BindingRewriter(relax.PyExprMutator):
    """A `relax.PyExprMutator` base (subclasses add `@relax.expr_functor.mutator`) that replaces
    each binding's value by what `rewrite(value)` returns, emitted under the binding's name
    (None keeps the binding as it is)."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.funcs: dict = {}  # kernel PrimFunc name -> GlobalVar

    def rewrite(self, value):
        return None

    def visit_var_binding_(self, binding):
        new_value = self.rewrite(binding.value)
        if new_value is None:
            super().visit_var_binding_(binding)
            return
        self.set_var_remap(binding.var, self.builder_.emit(new_value, name_hint=binding.var.name))

    def kernel_func(self, name: str, make) -> tvm.ir.GlobalVar:
        """The module's PrimFunc `name`, added from `make()` the first time it is asked for."""
        if name not in self.funcs:
            self.funcs[name] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        return self.funcs[name]

    def rewrites(self, func: relax.Function) -> bool:
        """Whether `rewrite_module` visits this function (every Relax function by default)."""
        return True

    def rewrite_module(self, mod: IRModule) -> IRModule:
        """`mod` with every function `rewrites` accepts rewritten."""
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and self.rewrites(func):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()


class WeightMatmulRewriter(BindingRewriter):
    """A `relax.PyExprMutator` base (subclasses add `@relax.expr_functor.mutator`): tracks which
    bindings depend on weights only (the parameters after a function's `num_input`, and what is
    computed from them alone) and replaces every fp32 `matmul(x, W)` with a weight-derived, static
    2-D W by what `rewrite_matmul` returns (None keeps it). The packer here and the int8
    quantizer (quantize.py) are both one."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.weight_vars: set = set()

    def visit_function_(self, func):
        num_input = func.attrs.get("num_input") if func.attrs is not None else None
        if num_input is not None:
            self.weight_vars = set(func.params[int(num_input) :])
        self.start_function()
        return super().visit_function_(func)

    def start_function(self) -> None:
        """Reset per-function state (nothing by default)."""

    def _weight_only(self, expr) -> bool:
        free = relax.analysis.free_vars(expr)
        return bool(free) and all(v in self.weight_vars for v in free)

    def visit_var_binding_(self, binding):
        if self._weight_only(binding.value):
            self.weight_vars.add(binding.var)
        super().visit_var_binding_(binding)

    def rewrite(self, value):
        if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.matmul"):
            return None
        x, w = value.args
        if not (isinstance(w, relax.Var) and w in self.weight_vars):
            return None
        x_shape, w_shape = static_shape(x.ty), static_shape(w.ty)
        if x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 2:
            return None
        if str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32":
            return None
        return self.rewrite_matmul(value, x, w, x_shape, w_shape)

    def rewrite_matmul(self, value, x, w, x_shape: list[int], w_shape: list[int]):
        raise NotImplementedError

    def rewrites(self, func: relax.Function) -> bool:
        """The functions with a `num_input` attribute: those whose trailing params are weights."""
        return func.attrs is not None and "num_input" in func.attrs


@relax.expr_functor.mutator
class _Packer(WeightMatmulRewriter):
    """Rewrites weight matmuls to read B packed in panels of `nr` columns."""

    def __init__(self, mod: IRModule, nr: int, row_tile: int | None = None):
        super().__init__(mod)
        self.nr = nr
        self.row_tile = row_tile

    def rewrite_matmul(self, value, x, w, x_shape, w_shape):
        k, n = w_shape
        nr = self.nr
        while nr >= 4 and n % nr:
            nr //= 2
        if nr < 4 or n < nr:
            return None
        out_dtype = str(value.ty.dtype) if str(value.ty.dtype) != "void" else "float32"
        new_w = self.visit_expr(w)
        packed = self.builder_.emit(
            relax.op.permute_dims(relax.op.reshape(new_w, (k, n // nr, nr)), axes=[1, 0, 2]),
            name_hint=f"{getattr(w, 'name', 'w')}_packed",
        )
        self.weight_vars.add(packed)
        return self.builder_.call_te(
            packed_matmul,
            self.visit_expr(x),
            packed,
            nr,
            out_dtype,
            self.row_tile,
            primfunc_name_hint="matmul_packed",
        )


def PackMatmulWeights(nr: int, row_tile: int | None = None) -> tvm.transform.Pass:
    """Rewrite weight matmuls of every function with a `num_input` attribute to packed B, over
    rows padded to `row_tile` where that applies (`padded_rows`)."""

    @tvm.transform.module_pass(opt_level=0, name="PackMatmulWeights")
    def _pass(mod: IRModule, _ctx) -> IRModule:
        return _Packer(mod, nr, row_tile).rewrite_module(mod)

    return _pass


def FlattenTransformParams() -> tvm.transform.Pass:
    """Give the lifted `transform_params` a flat signature: `transform_params(*weights)`.

    LiftTransformParams makes it take one tuple, which cannot be passed to a remote device over
    RPC; flat, every caller (local, the emulated ARM worker, RPC) calls it like a bucket
    function."""

    @tvm.transform.module_pass(opt_level=0, name="FlattenTransformParams")
    def _pass(mod: IRModule, _ctx) -> IRModule:
        if TRANSFORM_PARAMS not in [g.name_hint for g in mod.get_global_vars()]:
            return mod
        gvar = mod.get_global_var(TRANSFORM_PARAMS)
        func = mod[gvar]
        (tuple_param,) = func.params
        weights = [relax.Var(f"w{k}", ty) for k, ty in enumerate(tuple_param.ty.fields)]
        packing = relax.BindingBlock([relax.VarBinding(tuple_param, relax.Tuple(weights))])
        body = relax.SeqExpr([packing, *func.body.blocks], func.body.body)
        builder = relax.BlockBuilder(mod)
        builder.update_func(
            gvar, relax.Function(weights, body, func.ret_ty, func.is_pure, func.attrs)
        )
        return relax.transform.Normalize()(builder.get())

    return _pass


def LiftBucketTransforms() -> tvm.transform.Pass:
    """LiftTransformParams over the functions that take weights (more parameters than their
    `num_input`), the symbolic-length fallback excepted. The fallback (FALLBACK_FUNCTION) reads
    the weights as stored: its matmuls are not packed (their row count is not static), and a
    transform shared with it would keep nothing but the raw weights, so every bucket would pack
    its weights on every call. A function without weights (a decoder's cache constructor) would
    empty the shared transform the same way."""

    @tvm.transform.module_pass(opt_level=0, name="LiftBucketTransforms")
    def _pass(mod: IRModule, _ctx) -> IRModule:
        buckets = [
            gv.name_hint
            for gv, func in mod.functions_items()
            if isinstance(func, relax.Function)
            and func.attrs is not None
            and "num_input" in func.attrs
            and len(func.params) > int(func.attrs["num_input"])
            and gv.name_hint != FALLBACK_FUNCTION
        ]
        return relax.transform.LiftTransformParams(shared_transform=buckets)(mod)

    return _pass


def packing_passes(nr: int, row_tile: int | None = None) -> list[tvm.transform.Pass]:
    """Pack weight matmuls, then lift all weight-only computation into a flat `transform_params`."""
    return [PackMatmulWeights(nr, row_tile), LiftBucketTransforms(), FlattenTransformParams()]
