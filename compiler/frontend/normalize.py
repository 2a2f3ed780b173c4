"""Normalize a user's ONNX graph before import: standard ops, fp32, and static shapes per bucket.

Exporters write dynamic graphs: `Shape -> Gather -> Concat -> Reshape` chains, `If` on a shape,
`Expand` to a computed shape. TVM's Relax importer takes many of those only with known shapes
(upstream frontend issues with dynamic Slice, Split, shape-subgraph Concat, runtime-shape
Reshape). Each bucket is a static shape anyway, so for each bucket the inputs are pinned to it and
onnxslim runs ONNX shape inference and constant folding: the shape chains fold to constants and
the importer sees a static graph.

onnxslim rather than onnx-simplifier: it is pure Python (one wheel for every platform, ARM hosts
included) and keeps up with onnx releases, while onnxsim is a C++ extension built per onnx
version. Its pattern fusions are turned off: they would rewrite MatMul+Add into Gemm and Reshape
pairs that only hide matmuls from TVM's fusion and the int8 quantizer.

The weights stay shared by every bucket's function: an initializer of the user's graph stays an
initializer (a function parameter, stored once in the bundle); whatever folding made, and small
shape tensors, become constants inside the bucket's function. The reference for parity stays
ONNX Runtime on the user's original file (verify.py), never this normalized graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelLoadError
from .onnx_contrib import rewrite_contrib_ops
from .onnx_quantized import dequantize_weights, lift_weight_only

logger = logging.getLogger(__name__)

#: Folded constants larger than this stay computed: a folded weight transform or position-table
#: slice would otherwise be copied into every bucket's code.
FOLD_LIMIT_BYTES = 1 << 16
#: Initializers up to this many elements become constants (shape tensors, scalars, small
#: biases): the importer must see a Reshape's shape as a constant, not a parameter.
SMALL_INITIALIZER = 64

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
}


@dataclass
class Prepared:
    """The user's graph with contrib ops rewritten and fp16 upcast; bucket-independent."""

    model: onnx.ModelProto
    weight_names: list[str]  # initializers that stay function parameters, in graph order
    source_precision: str  # what the user's graph computes in: float32 / float16 / int8


def source_precision(model: onnx.ModelProto) -> str:
    """`int8` for quantized graphs (QDQ, MatMulInteger, MatMulNBits), `float16` for fp16 ones,
    else `float32`: the parity tolerance follows what ONNX Runtime computes the reference in."""
    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    values = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims
    ]
    if any(t.data_type == half for t in values) or any(
        o.type.tensor_type.elem_type == half for o in model.graph.output
    ):
        return "float16"
    return "float32"


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def prepare(model: onnx.ModelProto, model_path: str) -> Prepared:
    """Rewrite contrib ops into standard ONNX and compute fp16 graphs in fp32 (CPUs have no fast
    fp16 arithmetic; `--precision fp16` lowers CUDA artifacts again)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as is
    precision = source_precision(model)
    rewritten = rewrite_contrib_ops(model, model_path)
    if rewritten:
        logger.info(
            "  rewrote %d ONNX Runtime contrib / quantized op(s) into standard ONNX", rewritten
        )
    if precision == "int8":
        lifted = dequantize_weights(model)
        logger.info(
            "  quantized graph: %d int8 weight(s) dequantized to fp32 at compile time, simulated "
            "activation quantization dropped (--precision int8 uses tvmdeploy's int8 kernels)",
            lifted,
        )
    weight_only = lift_weight_only(model)
    if weight_only:
        logger.info(
            "  %d weight(s) stored as integers (Cast → Mul by a scale) folded into fp32 tables "
            "at compile time (--precision int8 runs their matmuls on tvmdeploy's int8 kernels)",
            weight_only,
        )
    for index, node in enumerate(model.graph.node):  # errors name nodes; some exporters don't
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    _int64_inputs(model)
    if precision == "float16":
        upcast_float16(model)
        logger.info("  fp16 graph: computed in fp32 (weights upcast at compile time)")
    weights = [i.name for i in model.graph.initializer if int(np.prod(i.dims)) > SMALL_INITIALIZER]
    for value in graph_inputs(model):
        rank = len(value.type.tensor_type.shape.dim)
        if rank != 2:
            raise ModelLoadError(
                f"{model_path}: input {value.name!r} has rank {rank}; token models take "
                "[batch, sequence] inputs"
            )
    return Prepared(model, weights, precision)


def _int64_inputs(model: onnx.ModelProto) -> None:
    """int32 token inputs (ORT-optimized graphs) become int64, cast inside: the runtime passes
    int64 ids to every artifact."""
    int32 = onnx.TensorProto.INT32
    casts = []
    for value in graph_inputs(model):
        if value.type.tensor_type.elem_type == int32:
            inner = f"{value.name}/int32"
            casts.append(
                helper.make_node(
                    "Cast", [value.name], [inner], to=int32, name=f"{value.name}/tvmdeploy_cast"
                )
            )
            for node in model.graph.node:
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = inner
            value.type.tensor_type.elem_type = onnx.TensorProto.INT64
    if casts:
        nodes = casts + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def upcast_float16(model: onnx.ModelProto) -> None:
    """fp16 -> fp32 everywhere, in place: initializers, constant attributes, Cast targets and the
    declared types of inputs, outputs and intermediate values."""
    half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def widen(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == half:
            array = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    graph = model.graph
    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == half:
                attr.i = full
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == half:
            value.type.tensor_type.elem_type = full


def for_bucket(prepared: Prepared, batch: int, seq: int) -> onnx.ModelProto:
    """The graph with every input pinned to [batch, seq], shapes inferred and constants folded;
    its initializers are exactly `prepared.weight_names`, so all buckets share one weight set."""
    import onnxslim

    model = prepared.model
    originals = {i.name: i for i in graph_inputs(model)}
    shapes = [f"{name}:{batch},{seq}" for name in originals]
    try:
        slim = onnxslim.slim(
            _without_values(model, _unfoldable_weights(model)),
            input_shapes=shapes,
            skip_optimizations=["graph_fusion", "weight_tying"],
            size_threshold=FOLD_LIMIT_BYTES,
        )
    except Exception as err:  # noqa: BLE001 - folding is a help: TVM may take the graph as is
        lines = str(err).strip().splitlines() or [type(err).__name__]
        logger.warning("  onnxslim could not fold the graph (%s); importing it unfolded", lines[0])
        slim = None
    if slim is None:
        slim = onnx.ModelProto.FromString(model.SerializeToString())
    _restore_inputs(slim, originals, batch, seq)
    _constants_inline(slim, prepared)
    return slim


#: Ops whose output is known once input shapes are: constant after shape inference.
SHAPE_OPS = {"Shape", "Size"}


def _unfoldable_weights(model: onnx.ModelProto) -> set[str]:
    """Large initializers whose values no folded constant can depend on: every node that reads
    one also reads a tensor that stays computed (derived from the token inputs, not only from
    constants and shapes). onnxslim serializes the model at every shape-inference round, so
    leaving their values out makes folding several times cheaper, with the same graph out."""
    graph = model.graph
    constant = {i.name for i in graph.initializer} | {""}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    in_subgraphs: set[str] = set()
    for node in graph.node:
        if node.op_type in SHAPE_OPS or all(name in constant for name in node.input):
            constant.update(node.output)
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                in_subgraphs.update(n for inner in sub.node for n in inner.input)
    unfoldable = set()
    for tensor in graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if int(np.prod(tensor.dims)) * itemsize <= FOLD_LIMIT_BYTES or tensor.name in in_subgraphs:
            continue
        readers = consumers.get(tensor.name, [])
        if readers and all(any(n not in constant for n in node.input) for node in readers):
            unfoldable.add(tensor.name)
    return unfoldable


def _without_values(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of the model whose initializers `names` are typed graph inputs instead (their
    shapes stay known to shape inference); the caller puts the weights back."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, out = model.graph, light.graph
    out.name = graph.name
    out.node.extend(graph.node)
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    out.sparse_initializer.extend(graph.sparse_initializer)
    for tensor in graph.initializer:
        if tensor.name in names:
            out.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
        else:
            out.initializer.append(tensor)
    return light


def symbolic(prepared: Prepared) -> onnx.ModelProto:
    """The graph with its own (symbolic) input shapes and the same weights as every bucket's:
    what the symbolic-length fallback function is imported from."""
    model = onnx.ModelProto.FromString(prepared.model.SerializeToString())
    _constants_inline(model, prepared)
    return model


def _restore_inputs(model: onnx.ModelProto, originals: dict, batch: int, seq: int) -> None:
    """Every input of the user's graph, in its order (folding may drop one the outputs do not
    need; the runtime still passes it)."""
    present = {i.name: i for i in model.graph.input}
    inputs = []
    for name, value in originals.items():
        pinned = onnx.ValueInfoProto.FromString(present.get(name, value).SerializeToString())
        dims = pinned.type.tensor_type.shape.dim
        for dim, size in zip(dims, (batch, seq), strict=True):
            dim.Clear()
            dim.dim_value = size
        inputs.append(pinned)
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _constants_inline(model: onnx.ModelProto, prepared: Prepared) -> None:
    """Initializers not among the weights become Constant nodes (in the bucket's code); the
    weights are listed in one fixed order, the unused ones too."""
    weights = set(prepared.weight_names)
    constants = [i for i in model.graph.initializer if i.name not in weights]
    nodes = [
        helper.make_node("Constant", [], [t.name], name=f"{t.name}/const", value=t)
        for t in constants
    ]
    by_name = {i.name: i for i in prepared.model.graph.initializer}
    del model.graph.initializer[:]
    model.graph.initializer.extend(by_name[name] for name in prepared.weight_names)
    existing = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + existing)
