"""ONNX Runtime's contrib and quantized operators, rewritten into standard ONNX before import.

Graphs that ONNX Runtime's transformer optimizer or its quantizers wrote use `com.microsoft` ops
(`Attention`, `SkipLayerNormalization`, `MatMulNBits`, ...) that TVM's Relax importer lacks or
takes only in some forms. Each is expanded here into the standard ops it is defined by (the
contrib op specs in ONNX Runtime's docs/ContribOperators.md), so the importer sees ops it knows
and TVM's fusion and our kernels see ordinary matmuls. `MatMulNBits` weights are dequantized at
compile time to the activation dtype: there is no int4 GEMM kernel here, and a dequantized
weight is what the fp32 kernels and the int8 quantizer (`--precision int8`) both take.

A form these rewrites do not cover (past key/value caches, packed QKV, rotary embeddings) is an
`UnsupportedOperatorError` naming the op, its domain and node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedOperatorError
from .onnx_quantized import (
    drop_unused_initializers,
    dynamic_quantize_matmul,
    matmul_integer_to_float,
    matmul_nbits,
    optional_input,
    qlinear_matmul,
)

MS = "com.microsoft"


class _Emitter:
    """Emits standard nodes for one contrib node: fresh names, constants, and the forms that
    changed between opsets (axes as attribute or input)."""

    def __init__(self, node: onnx.NodeProto, opset: int, model_path: str):
        self.node, self.opset, self.model_path = node, opset, model_path
        self.prefix = (node.name or node.output[0]) + "/tvmdeploy"
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def _name(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs):
        name = self._name()
        names = outputs if isinstance(outputs, list) else [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        name = self._name() + "_const"
        self.nodes.append(
            helper.make_node(
                "Constant", [], [name], name=name, value=numpy_helper.from_array(array, name)
            )
        )
        return name

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset < 13:
            return self.op("Unsqueeze", [x], axes=axes)
        return self.op("Unsqueeze", [x, self.const(axes, np.int64)])

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        as_input = self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13)
        if as_input:
            return self.op(op_type, [x, self.const(axes, np.int64)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        if self.opset < 13:
            return self.op("Split", [x], len(sizes), axis=axis, split=sizes)
        return self.op("Split", [x, self.const(sizes, np.int64)], len(sizes), axis=axis)

    def layer_norm(self, x: str, gamma: str, beta: str | None, epsilon: float, out: str) -> str:
        """LayerNormalization over the last axis (decomposed below opset 17, which lacks it)."""
        if self.opset >= 17:
            inputs = [x, gamma] + ([beta] if beta else [])
            return self.op("LayerNormalization", inputs, [out], axis=-1, epsilon=epsilon)
        mean = self.reduce("ReduceMean", x, [-1])
        centered = self.op("Sub", [x, mean])
        var = self.reduce("ReduceMean", self.op("Mul", [centered, centered]), [-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.like(epsilon, x)])])
        scaled = self.op("Mul", [self.op("Div", [centered, std]), gamma])
        return (
            self.op("Add", [scaled, beta], [out]) if beta else self.op("Identity", [scaled], [out])
        )

    def like(self, value: float, reference: str) -> str:
        """A scalar constant cast to `reference`'s dtype (fp16 graphs stay fp16)."""
        return (
            self.op("CastLike", [self.const(value), reference])
            if self.opset >= 15
            else (self.const(value))
        )

    def refuse(self, why: str) -> UnsupportedOperatorError:
        node = self.node
        return UnsupportedOperatorError(
            [f"{node.domain or 'ai.onnx'}.{node.op_type}"],
            self.model_path,
            detail=f"node {node.name!r}: {why}",
        )


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _gelu(e: _Emitter, x: str, out: str) -> str:
    """0.5 * x * (1 + erf(x / sqrt(2)))."""
    erf = e.op("Erf", [e.op("Div", [x, e.like(math.sqrt(2.0), x)])])
    half_x = e.op("Mul", [x, e.like(0.5, x)])
    return e.op("Mul", [half_x, e.op("Add", [erf, e.like(1.0, x)])], [out])


def _tanh_gelu(e: _Emitter, x: str, out: str) -> str:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    cube = e.op("Mul", [e.op("Mul", [x, x]), x])
    inner = e.op("Add", [x, e.op("Mul", [cube, e.like(0.044715, x)])])
    tanh = e.op("Tanh", [e.op("Mul", [inner, e.like(math.sqrt(2.0 / math.pi), x)])])
    half_x = e.op("Mul", [x, e.like(0.5, x)])
    return e.op("Mul", [half_x, e.op("Add", [tanh, e.like(1.0, x)])], [out])


def gelu(e: _Emitter, node, attrs, ranks) -> None:
    _gelu(e, node.input[0], node.output[0])


def bias_gelu(e: _Emitter, node, attrs, ranks) -> None:
    _gelu(e, e.op("Add", [node.input[0], node.input[1]]), node.output[0])


def fast_gelu(e: _Emitter, node, attrs, ranks) -> None:
    x = node.input[0]
    if optional_input(node, 1):
        x = e.op("Add", [x, node.input[1]])
    _tanh_gelu(e, x, node.output[0])


def quick_gelu(e: _Emitter, node, attrs, ranks) -> None:
    x = node.input[0]
    alpha = float(attrs.get("alpha", 1.702))
    sigmoid = e.op("Sigmoid", [e.op("Mul", [x, e.like(alpha, x)])])
    e.op("Mul", [x, sigmoid], [node.output[0]])


def _skip_sum(e: _Emitter, node, bias_index: int) -> str:
    total = e.op("Add", [node.input[0], node.input[1]])
    if optional_input(node, bias_index):
        total = e.op("Add", [total, node.input[bias_index]])
    return total


def _sum_output(e: _Emitter, node, total: str) -> None:
    """Output 3 (input + skip + bias) where the graph reads it; the mean and inverse deviation
    (outputs 1, 2) only training graphs read."""
    if any(node.output[1:3]):
        raise e.refuse("its mean / inv_std_var outputs are used (training graphs only)")
    if len(node.output) > 3 and node.output[3]:
        e.op("Identity", [total], [node.output[3]])


def skip_layer_norm(e: _Emitter, node, attrs, ranks) -> None:
    total = _skip_sum(e, node, 4)
    e.layer_norm(
        total,
        node.input[2],
        optional_input(node, 3),
        float(attrs.get("epsilon", 1e-12)),
        node.output[0],
    )
    _sum_output(e, node, total)


def _rms_norm(e: _Emitter, x: str, scale: str, epsilon: float, out: str) -> str:
    mean_square = e.reduce("ReduceMean", e.op("Mul", [x, x]), [-1])
    rms = e.op("Sqrt", [e.op("Add", [mean_square, e.like(epsilon, x)])])
    return e.op("Mul", [e.op("Div", [x, rms]), scale], [out])


def simplified_layer_norm(e: _Emitter, node, attrs, ranks) -> None:
    if int(attrs.get("axis", -1)) not in (-1, (ranks.get(node.input[0]) or 0) - 1):
        raise e.refuse("normalization over an axis other than the last")
    if any(node.output[1:]):
        raise e.refuse("its inv_std_var output is used (training graphs only)")
    _rms_norm(e, node.input[0], node.input[1], float(attrs.get("epsilon", 1e-5)), node.output[0])


def skip_simplified_layer_norm(e: _Emitter, node, attrs, ranks) -> None:
    total = _skip_sum(e, node, 3)
    _rms_norm(e, total, node.input[2], float(attrs.get("epsilon", 1e-12)), node.output[0])
    _sum_output(e, node, total)


def embed_layer_norm(e: _Emitter, node, attrs, ranks) -> None:
    """word[ids] + position[0..S) (or position_ids) + segment[segment_ids], layer-normalized;
    mask_index = the number of unmasked tokens per row (right padding)."""
    ids, segments = node.input[0], optional_input(node, 1)
    word, position, segment = node.input[2], node.input[3], optional_input(node, 4)
    gamma, beta, mask, position_ids = (
        node.input[5],
        node.input[6],
        optional_input(node, 7),
        optional_input(node, 8),
    )
    total = e.op("Gather", [word, ids])
    if position_ids is None:
        seq = e.op("Gather", [e.op("Shape", [ids]), e.const(1, np.int64)], axis=0)
        position_ids = e.op("Range", [e.const(0, np.int64), seq, e.const(1, np.int64)])
    total = e.op("Add", [total, e.op("Gather", [position, position_ids])])
    if segment and segments:
        total = e.op("Add", [total, e.op("Gather", [segment, segments])])
    e.layer_norm(total, gamma, beta, float(attrs.get("epsilon", 1e-12)), node.output[0])
    if len(node.output) > 1 and node.output[1]:
        if mask is None:
            raise e.refuse("mask_index is used but the node has no mask input")
        e.op(
            "ReduceSum",
            [e.op("Cast", [mask], to=TensorProto.INT32), e.const([1], np.int64)],
            [node.output[1]],
            keepdims=0,
        )
    if len(node.output) > 2 and node.output[2]:
        e.op("Identity", [total], [node.output[2]])


def _key_mask(e: _Emitter, mask: str, rank: int | None, k: str, reference: str, fill: float):
    """An additive mask broadcastable to scores [B, N, S, L]: 0 where a key is attended,
    `fill` where it is masked. `mask` is key lengths [B] (right padding), a raw 0/1 mask [B, L]
    or [B, S, L]."""
    if rank == 1:
        count = e.op("Gather", [e.op("Shape", [k]), e.const(2, np.int64)], axis=0)  # L
        positions = e.op("Range", [e.const(0, np.int64), count, e.const(1, np.int64)])
        lengths = e.unsqueeze(e.op("Cast", [mask], to=TensorProto.INT64), [1])
        keep = e.op("Less", [e.unsqueeze(positions, [0]), lengths])  # [B, L]
        keep = e.unsqueeze(keep, [1, 2])
    elif rank == 2:
        keep = e.unsqueeze(e.op("Cast", [mask], to=TensorProto.BOOL), [1, 2])
    elif rank == 3:
        keep = e.unsqueeze(e.op("Cast", [mask], to=TensorProto.BOOL), [1])
    else:
        raise e.refuse(f"a mask of rank {rank} (supported: lengths [B], raw [B, L], [B, S, L])")
    return e.op("Where", [keep, e.like(0.0, reference), e.like(fill, reference)])


def _causal(e: _Emitter, scores: str, fill: float) -> str:
    """Mask key positions after the query position (decoder self-attention)."""
    shape = e.op("Shape", [scores])
    rows = e.op("Gather", [shape, e.const(2, np.int64)], axis=0)
    cols = e.op("Gather", [shape, e.const(3, np.int64)], axis=0)
    ones = e.op(
        "ConstantOfShape",
        [e.op("Concat", [e.unsqueeze(rows, [0]), e.unsqueeze(cols, [0])], axis=0)],
        value=numpy_helper.from_array(np.array([1], np.int64)),
    )
    allowed = e.op("Cast", [e.op("Trilu", [ones], upper=0)], to=TensorProto.BOOL)
    return e.op("Where", [allowed, scores, e.like(fill, scores)])


def _heads(e: _Emitter, x: str, heads: int) -> str:
    """[B, S, N*H] -> [B, N, S, H]."""
    split = e.op("Reshape", [x, e.const([0, 0, heads, -1], np.int64)])
    return e.op("Transpose", [split], perm=[0, 2, 1, 3])


def _attend(e, qkv, attrs, mask, ranks, bias, out, head_size) -> None:
    """softmax(Q K^T * scale + masks) V, heads merged back: [B, S, N*Hv]. `qkv` is [B, N, S|L,
    H] each; `mask` is optional (its form is told by its rank, `ranks`)."""
    q, k, v = qkv
    mask_rank = ranks.get(mask) if mask else None
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(head_size)
    fill = float(attrs.get("mask_filter_value", -10000.0))
    kt = e.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = e.op("Mul", [e.op("MatMul", [q, kt]), e.like(scale, q)])
    if bias:
        scores = e.op("Add", [scores, bias])
    if mask:
        scores = e.op("Add", [scores, _key_mask(e, mask, mask_rank, k, q, fill)])
    if int(attrs.get("unidirectional", 0)):
        scores = _causal(e, scores, fill)
    probs = e.op("Softmax", [scores], axis=-1)
    context = e.op("Transpose", [e.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    e.op("Reshape", [context, e.const([0, 0, -1], np.int64)], [out])


def attention(e: _Emitter, node, attrs, ranks) -> None:
    """com.microsoft.Attention: packed QKV projection, then scaled dot-product attention."""
    if optional_input(node, 4) or optional_input(node, 6) or any(node.output[1:]):
        raise e.refuse("past/present key-value state (decoder caches)")
    if int(attrs.get("do_rotary", 0)):
        raise e.refuse("rotary embeddings (do_rotary=1)")
    x, weights, bias = node.input[0], node.input[1], optional_input(node, 2)
    heads = int(attrs["num_heads"])
    qkv = e.op("MatMul", [x, weights])
    if bias:
        qkv = e.op("Add", [qkv, bias])
    sizes = list(attrs.get("qkv_hidden_sizes") or [])
    if not sizes:
        width = e.weight_width(weights)
        sizes = [width // 3] * 3
    heads_qkv = [_heads(e, part, heads) for part in e.split(qkv, sizes, axis=-1)]
    mask, bias = optional_input(node, 3), optional_input(node, 5)
    _attend(e, heads_qkv, attrs, mask, ranks, bias, node.output[0], sizes[0] // heads)


def multi_head_attention(e: _Emitter, node, attrs, ranks) -> None:
    """com.microsoft.MultiHeadAttention with separate query, key, value [B, S|L, D] (or key
    and value already [B, N, L, H]); optional packed bias, key padding mask, attention bias."""
    query, key, value = node.input[0], optional_input(node, 1), optional_input(node, 2)
    if key is None or value is None or ranks.get(query) != 3:
        raise e.refuse("packed QKV/KV inputs (only separate query, key, value are supported)")
    if optional_input(node, 6) or optional_input(node, 7) or any(node.output[1:]):
        raise e.refuse("past/present key-value state (decoder caches)")
    heads = int(attrs["num_heads"])
    bias = optional_input(node, 3)
    width = ranks.get(f"{query}:width")
    if not width:
        raise e.refuse("cannot tell the hidden size of the query")
    separate = ranks.get(key) == 3 and ranks.get(value) == 3  # else already [B, N, L, H]
    if bias:
        v_width = ranks.get(f"{value}:width") or width
        q_bias, k_bias, v_bias = e.split(bias, [width, width, v_width], axis=0)
        query = e.op("Add", [query, q_bias])
        if separate:
            key, value = e.op("Add", [key, k_bias]), e.op("Add", [value, v_bias])
    q = _heads(e, query, heads)
    k = _heads(e, key, heads) if separate else key
    v = _heads(e, value, heads) if separate else value
    mask, attention_bias = optional_input(node, 4), optional_input(node, 5)
    _attend(e, (q, k, v), attrs, mask, ranks, attention_bias, node.output[0], width // heads)


Rewrite = Callable[[_Emitter, onnx.NodeProto, dict, dict], None]

#: (domain, op type) -> its rewrite into standard ONNX. The default domain's entries are ops
#: TVM 0.27's importer lacks (or ORT registers there though they are contrib ops).
REWRITES: dict[tuple[str, str], Rewrite] = {
    (MS, "Attention"): attention,
    (MS, "MultiHeadAttention"): multi_head_attention,
    (MS, "SkipLayerNormalization"): skip_layer_norm,
    (MS, "SkipSimplifiedLayerNormalization"): skip_simplified_layer_norm,
    (MS, "EmbedLayerNormalization"): embed_layer_norm,
    (MS, "BiasGelu"): bias_gelu,
    (MS, "FastGelu"): fast_gelu,
    (MS, "Gelu"): gelu,
    (MS, "QuickGelu"): quick_gelu,
    (MS, "MatMulNBits"): matmul_nbits,
    (MS, "MatMulIntegerToFloat"): matmul_integer_to_float,
    (MS, "DynamicQuantizeMatMul"): dynamic_quantize_matmul,
    ("", "SimplifiedLayerNormalization"): simplified_layer_norm,
    ("", "QLinearMatMul"): qlinear_matmul,
}


def _facts(model: onnx.ModelProto) -> dict:
    """Ranks of the tensors shape inference can tell, and the last-axis width where known
    (key `name:width`): what the attention rewrites need to pick a mask form or split a bias."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        inferred = model
    facts: dict = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        shape = info.type.tensor_type.shape
        if info.type.tensor_type.HasField("shape"):
            facts[info.name] = len(shape.dim)
            if shape.dim and shape.dim[-1].HasField("dim_value"):
                facts[f"{info.name}:width"] = shape.dim[-1].dim_value
    for init in graph.initializer:
        facts[init.name] = len(init.dims)
        if init.dims:
            facts[f"{init.name}:width"] = init.dims[-1]
    return facts


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def rewrite_contrib_ops(model: onnx.ModelProto, model_path: str = "model.onnx") -> int:
    """Expand every contrib / quantized op of REWRITES in place; returns how many were. The
    model's default-domain opset decides the form of the emitted ops."""
    graph = model.graph
    targets = [
        n for n in graph.node if ((n.domain or "").replace("ai.onnx", ""), n.op_type) in REWRITES
    ]
    if not targets:
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    facts = _facts(model)
    constants = _constants(model)
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        key = ((node.domain or "").replace("ai.onnx", ""), node.op_type)
        if key not in REWRITES:
            new_nodes.append(node)
            continue
        emitter = _Emitter(node, opset, model_path)
        emitter.constants = constants
        emitter.weight_width = lambda name, facts=facts, e=emitter: _width(facts, name, e)
        emitter.add_weight = lambda name, array: _add_initializer(graph, name, array)
        REWRITES[key](emitter, node, _attrs(node), facts)
        new_nodes.extend(emitter.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)
    return len(targets)


def _width(facts: dict, name: str, emitter: _Emitter) -> int:
    width = facts.get(f"{name}:width")
    if not width:
        raise emitter.refuse(f"cannot tell the width of {name!r} to split Q, K and V")
    return int(width)


def _add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name
