"""Stage 2, import: ONNX to one Relax module with a function per shape bucket.

MetaSchedule tunes static shapes only, so each (batch, seq) bucket becomes its own Relax
function (`b{batch}_s{seq}`), imported from the graph normalized for that bucket (normalize.py:
contrib ops rewritten, shapes pinned, shape chains folded). Weights are kept as function
inputs (`keep_params_in_input`) and detached, so every bucket shares one weight set that is
stored once beside the code. Gathers are made bounds-safe (safe_take.py) so no index can make a
kernel read out of bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelLoadError, OptionError, StageError, UnsupportedOperatorError
from ..kernels.safe_take import SafeTake
from ..options import FALLBACK_FUNCTION, BucketSpec
from . import normalize
from .clip_bounds import resolve_clip_bounds

logger = logging.getLogger(__name__)

_ONNX_DTYPES = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass
class ImportedModel:
    mod: Any  # tvm.IRModule, one Relax function per bucket
    params: list[Any]  # tvm.runtime.Tensor, in function-parameter order
    param_names: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    buckets: list[BucketSpec]
    source_precision: str = "float32"  # what the user's graph computes in (normalize.py)
    # The symbolic-length function for sequences beyond the largest bucket (batch 1, up to
    # `fallback.seq` tokens), or None where the graph does not import with a symbolic length.
    fallback: BucketSpec | None = None


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Ops in the graph (subgraphs included) that TVM's Relax importer lacks, as `Op` for the
    standard domain and `domain.Op` for others (a contrib op left after onnx_contrib.py's
    rewrites is refused even where TVM knows an op of that name: its meaning differs)."""
    return sorted(_unsupported_nodes(model))


def _unsupported_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """{op: the first node using it} for the ops `unsupported_ops` names."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If"}  # the importer converts If itself
    found: dict[str, str] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            if domain or node.op_type not in known:
                found.setdefault(
                    f"{domain}.{node.op_type}" if domain else node.op_type,
                    node.name or node.output[0],
                )
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def _dim_names(value_info: onnx.ValueInfoProto) -> list[str | None]:
    return [d.dim_param or None for d in value_info.type.tensor_type.shape.dim]


def io_spec(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs (name, dtype) and outputs (name, dtype, which axes are batch / seq)."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if "input_ids" not in names:
        raise ModelLoadError(
            f"the ONNX graph has no 'input_ids' input (inputs: {names}); only token models are "
            f"supported"
        )
    ids = next(i for i in inputs if i.name == "input_ids")
    batch_dim, seq_dim = (_dim_names(ids) + [None, None])[:2]
    input_spec = [
        {"name": i.name, "dtype": _ONNX_DTYPES.get(i.type.tensor_type.elem_type, "int64")}
        for i in inputs
    ]
    output_spec = []
    for out in model.graph.output:
        axes = [
            "batch" if d and d == batch_dim else "seq" if d and d == seq_dim else None
            for d in _dim_names(out)
        ]
        output_spec.append(
            {
                "name": out.name,
                "dtype": _ONNX_DTYPES.get(out.type.tensor_type.elem_type, "float32"),
                "axes": axes,
            }
        )
    return input_spec, output_spec


def import_onnx(
    onnx_path: str | Path,
    buckets: list[BucketSpec],
    max_positions: int | None = None,
    source: str | None = None,
    fallback: bool = False,
) -> ImportedModel:
    """Normalize the ONNX model for each bucket (normalize.py) and import each into one Relax
    function of one module; every function takes the same weights. Errors name `source` (the
    user's model) rather than the working copy at `onnx_path`. With `fallback` and a model
    limit longer than the largest bucket, also a symbolic-length function (FALLBACK_FUNCTION)
    for the sequences in between, where the graph imports that way."""
    import tvm

    model = onnx.load(str(onnx_path))
    source = source or str(onnx_path)
    if max_positions:
        too_long = [b for b in buckets if b.seq > max_positions]
        if too_long:
            raise OptionError(
                f"bucket seq {too_long[0].seq} exceeds the model's max_position_embeddings "
                f"({max_positions}); use --buckets with sequences up to {max_positions}"
            )
    inputs, outputs = io_spec(model)
    prepared = normalize.prepare(model, source)
    dtypes = {i["name"]: "int64" for i in inputs}  # int32 ids are cast inside (normalize.py)
    inputs = [dict(i, dtype="int64") for i in inputs]
    if prepared.source_precision == "float16":  # computed in fp32, so returned in fp32
        outputs = [dict(o, dtype="float32") if o["dtype"] == "float16" else o for o in outputs]

    merged = tvm.IRModule()
    params: list[Any] = []
    param_names: list[str] = []
    for bucket in buckets:
        static = normalize.for_bucket(prepared, bucket.batch, bucket.seq)
        missing = _unsupported_nodes(static)  # after folding: a shape-only op may be gone
        if missing:
            nodes = "; ".join(f"{op} at node {node!r}" for op, node in sorted(missing.items()))
            raise UnsupportedOperatorError(sorted(missing), source, detail=nodes)
        shapes = {i["name"]: [bucket.batch, bucket.seq] for i in inputs}
        mod, detached = _relax_function(static, shapes, dtypes, source)
        func = mod["main"]
        names = [p.name for p in func.params[len(inputs) :]]
        if not param_names:
            params, param_names = list(detached.get("main", [])), names
        elif names != param_names:
            raise ModelLoadError(
                f"bucket {bucket.function}: weights differ from the first bucket's"
            )
        _add_bucket(merged, mod, bucket.function)
    longest = max(b.seq for b in buckets)
    spec = None
    if fallback and max_positions and max_positions > longest:
        spec = _add_fallback(merged, prepared, inputs, param_names, max_positions, source)
    merged = resolve_clip_bounds(SafeTake()(merged))
    return ImportedModel(
        merged, params, param_names, inputs, outputs, buckets, prepared.source_precision, spec
    )


def _add_fallback(merged, prepared, inputs, param_names, max_seq: int, source: str):
    """Import the graph once more with a symbolic sequence length (batch 1): longer inputs than
    the largest bucket run through it, untuned. A graph that does not import that way (its shape
    chains need static shapes) gets none, with a warning: long inputs are then refused."""
    import tvm

    seq = tvm.tirx.Var("seq", "int64")
    shapes = {i["name"]: [1, seq] for i in inputs}
    try:
        mod, _ = _relax_function(
            normalize.symbolic(prepared), shapes, {i["name"]: "int64" for i in inputs}, source
        )
        names = [p.name for p in mod["main"].params[len(inputs) :]]
        if names != param_names:
            raise ModelLoadError("its weights differ from the buckets'")
    except Exception as err:  # noqa: BLE001 - any failure only means no fallback
        lines = [x for x in str(err).splitlines() if x.strip()]
        logger.warning(
            "  no symbolic-length fallback (%s): sequences beyond the largest bucket will be "
            "refused; compile a larger --buckets seq to run them",
            (lines[0] if lines else type(err).__name__)[:200],
        )
        return None
    _add_bucket(merged, mod, FALLBACK_FUNCTION)
    logger.info(
        "  symbolic-length fallback %s: batch 1, up to %d tokens", FALLBACK_FUNCTION, max_seq
    )
    return BucketSpec(1, max_seq, FALLBACK_FUNCTION)


def without_fallback(mod):
    """The module without the fallback function and the TIR functions imported for it: what
    tuning sees (MetaSchedule tunes static shapes; the fallback runs untuned)."""
    import tvm

    keep = {
        gv: func
        for gv, func in mod.functions_items()
        if not gv.name_hint.startswith(FALLBACK_FUNCTION)
    }
    return tvm.IRModule(keep, attrs=mod.attrs)


def _add_bucket(merged, mod, name: str) -> None:
    """Add a bucket's `main` to `merged` as `name`, with the TIR functions the importer made for
    it (its `emit_te` ops, e.g. Clip) renamed `name_...`: every bucket has its own shapes."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rename(PyExprMutator):
        def __init__(self, mod):
            super().__init__()  # an empty module: add_func would reuse the existing names
            self.renamed = {
                gv: self.builder_.add_func(func, f"{name}_{gv.name_hint}")
                for gv, func in mod.functions_items()
                if gv.name_hint != "main"
            }

        def visit_global_var_(self, gv):
            return self.renamed.get(gv, gv)

    rename = Rename(mod)
    main = rename.visit_expr(mod["main"]) if rename.renamed else mod["main"]
    built = rename.builder_.get()
    for new in rename.renamed.values():
        merged[new] = built[new]
    merged[name] = main.with_attr("global_symbol", name)


def _relax_function(model: onnx.ModelProto, shapes, dtypes, onnx_path: str):
    """TVM's ONNX importer on one static graph, weights kept as parameters and detached. A
    failure inside it names the ONNX node and op it was converting (TVM only prints those)."""
    import contextlib
    import io

    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class NamedImporter(ONNXGraphImporter):
        def _convert_operator(self, op_name, inputs, attrs, opset):
            try:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            except Exception as err:
                raise NodeImportError(op_name, attrs["tvm_custom"]["name"], err) from err

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = NamedImporter(shapes, dtypes, keep_params_in_input=True, sanitize=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TVM prints the failing op's inputs
            mod = importer.from_onnx(model.graph, opset)
    except NodeImportError as failed:
        cause = failed.__cause__
        lines = [x.strip() for x in str(cause).splitlines() if x.strip() and x[:1] != "#"]
        first = " ".join(lines)[:300] or type(cause).__name__
        raise StageError(
            f"import failed at ONNX node {failed.node!r} (op {failed.op}) of {onnx_path}: "
            f"{type(cause).__name__}: {first}. Try another --opset, or compile the graph after "
            "`onnxslim` / without ONNX Runtime's fusions; -v shows the traceback. Nothing was "
            "written."
        ) from cause
    return detach_params(mod)


class NodeImportError(Exception):
    """TVM's importer failed on one ONNX node (internal: becomes a StageError naming it)."""

    def __init__(self, op: str, node: str, cause: Exception):
        super().__init__(f"{op} at {node}: {cause}")
        self.op, self.node = op, node
