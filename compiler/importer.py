"""Stage 2, import: ONNX to one Relax module with a function per shape bucket.

MetaSchedule tunes static shapes only, so each (batch, seq) bucket becomes its own Relax
function (`b{batch}_s{seq}`). Weights are kept as function inputs (`keep_params_in_input`) and
detached, so every bucket shares one weight set that is stored once beside the code. Gathers
are made bounds-safe (safe_take.py) so no index can make a kernel read out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .errors import ModelLoadError, UnsupportedOperatorError
from .options import DEFAULT_BUCKETS, BucketSpec, parse_buckets  # noqa: F401  (TEMP re-export during the move)
from .safe_take import SafeTake

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


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """ONNX op types in the graph (subgraphs included) that TVM's Relax importer lacks."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map())
    seen: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            seen.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return sorted(seen - known)


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
    onnx_path: str | Path, buckets: list[BucketSpec], max_positions: int | None = None
) -> ImportedModel:
    """Import the ONNX model once per bucket and merge the functions into one module."""
    import tvm
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(onnx_path))
    missing = unsupported_ops(model)
    if missing:
        raise UnsupportedOperatorError(missing, str(onnx_path))
    if max_positions:
        too_long = [b for b in buckets if b.seq > max_positions]
        if too_long:
            raise ValueError(
                f"bucket seq {too_long[0].seq} exceeds the model's max_position_embeddings "
                f"({max_positions})"
            )
    inputs, outputs = io_spec(model)

    merged = tvm.IRModule()
    params: list[Any] = []
    param_names: list[str] = []
    for bucket in buckets:
        shapes = {i["name"]: [bucket.batch, bucket.seq] for i in inputs}
        dtypes = {i["name"]: i["dtype"] for i in inputs}
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
        mod, detached = detach_params(mod)
        func = mod["main"]
        names = [p.name for p in func.params[len(inputs) :]]
        if not param_names:
            params, param_names = list(detached.get("main", [])), names
        elif names != param_names:
            raise ModelLoadError(
                f"bucket {bucket.function}: weights differ from the first bucket's"
            )
        merged[bucket.function] = func.with_attr("global_symbol", bucket.function)
    merged = SafeTake()(merged)
    return ImportedModel(merged, params, param_names, inputs, outputs, buckets)
