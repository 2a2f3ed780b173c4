"""Quantized ONNX ops rewritten into standard ONNX (the registry is onnx_contrib.REWRITES).

`MatMulNBits` weights are dequantized at compile time to the scales' dtype: there is no int4 GEMM
kernel here, and a dense weight is what both the fp32 kernels and the int8 quantizer
(`--precision int8`, which requantizes it per channel) take. `QLinearMatMul` and ORT's fused
integer matmuls become the DequantizeLinear / MatMulInteger ops that define them, which TVM's
importer takes. Each rewrite gets onnx_contrib's emitter `e` (fresh node names, constants).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto


def optional_input(node: onnx.NodeProto, i: int) -> str | None:
    """The node's i-th input name, or None where it is absent or empty."""
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-endian unsigned `bits`-bit fields of each byte, `count` per row of the last axis."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    fields = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_nbits(b, scales, zero_points, k: int, n: int, bits: int, block: int):
    """MatMulNBits' packed weight [N, blocks, blob] to the dense [K, N] matrix it encodes."""
    blocks = (k + block - 1) // block
    q = _unpack(b.reshape(n, blocks, -1), bits, block).astype(np.float32)  # [N, blocks, block]
    scale = scales.reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), float(1 << (bits - 1)), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = _unpack(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    dense = (q - zero[..., None]) * scale[..., None]
    return dense.reshape(n, blocks * block)[:, :k].T.copy()


def matmul_nbits(e, node, attrs, ranks) -> None:
    """Y = A @ dequantize(B) (+ bias), with B dequantized here, at compile time."""
    constants = e.constants
    names = [optional_input(node, i) for i in range(6)]
    if names[4]:
        raise e.refuse("g_idx (act-order) weights")
    for name in (names[1], names[2], names[3]):
        if name and name not in constants:
            raise e.refuse(f"input {name!r} is computed, not a stored weight")
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits not in (2, 4, 8):
        raise e.refuse(f"{bits}-bit weights (supported: 2, 4, 8)")
    scales = constants[names[2]]
    dense = dequantize_nbits(
        constants[names[1]],
        scales,
        constants.get(names[3]) if names[3] else None,
        k,
        n,
        bits,
        block,
    )
    weight = e.add_weight(node.input[1] + "_dequantized", dense.astype(scales.dtype))
    out = e.op("MatMul", [node.input[0], weight], [node.output[0]] if not names[5] else 1)
    if names[5]:
        e.op("Add", [out, names[5]], [node.output[0]])


def qlinear_matmul(e, node, attrs, ranks) -> None:
    """QLinearMatMul as DequantizeLinear x2 -> MatMul -> QuantizeLinear (its definition)."""
    a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = node.input[:8]
    da = e.op("DequantizeLinear", [a, a_scale, a_zero])
    db = e.op("DequantizeLinear", [b, b_scale, b_zero], axis=-1 if ranks.get(b) == 2 else 1)
    e.op("QuantizeLinear", [e.op("MatMul", [da, db]), y_scale, y_zero], [node.output[0]])


def matmul_integer_to_float(e, node, attrs, ranks) -> None:
    """com.microsoft.MatMulIntegerToFloat: MatMulInteger, then * a_scale * b_scale (+ bias)."""
    a, b, a_scale, b_scale = node.input[:4]
    a_zero, b_zero, bias = optional_input(node, 4), optional_input(node, 5), optional_input(node, 6)
    inputs = [a, b] + ([a_zero or ""] if a_zero or b_zero else []) + ([b_zero] if b_zero else [])
    product = e.op("Cast", [e.op("MatMulInteger", inputs)], to=TensorProto.FLOAT)
    scaled = e.op("Mul", [product, e.op("Mul", [a_scale, b_scale])])
    e.op("Add", [scaled, bias], [node.output[0]]) if bias else e.op(
        "Identity", [scaled], [node.output[0]]
    )


def dynamic_quantize_matmul(e, node, attrs, ranks) -> None:
    """com.microsoft.DynamicQuantizeMatMul: DynamicQuantizeLinear(A), then as above."""
    a, b, b_scale = node.input[:3]
    b_zero, bias = optional_input(node, 3), optional_input(node, 4)
    qa, a_scale, a_zero = e.op("DynamicQuantizeLinear", [a], 3)
    product = e.op("MatMulInteger", [qa, b, a_zero] + ([b_zero] if b_zero else []))
    scaled = e.op(
        "Mul", [e.op("Cast", [product], to=TensorProto.FLOAT), e.op("Mul", [a_scale, b_scale])]
    )
    e.op("Add", [scaled, bias], [node.output[0]]) if bias else e.op(
        "Identity", [scaled], [node.output[0]]
    )


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """DequantizeLinear's definition: (q - zero) * scale, per tensor or along `axis`."""
    values = q.astype(np.float32)
    scale = scale.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.ndim == 1 and q.ndim > 1:  # per channel along `axis`
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def dequantize_weights(model: onnx.ModelProto) -> int:
    """Turn a quantized graph back into the float graph it encodes, in place; returns how many
    weight matmuls were lifted.

    - ORT dynamic quantization: `DynamicQuantizeLinear(x)` → `MatMulInteger(·, Wq)` → `Cast` →
      `Mul` by x_scale · w_scale becomes `MatMul(x, W)` with W = (Wq - w_zero) · w_scale.
    - QDQ: `DequantizeLinear` of a stored weight becomes that float weight, and an activation's
      `QuantizeLinear` → `DequantizeLinear` pair (simulated quantization) becomes a Clip to the
      range it can represent: the rounding goes, the clamping stays (ORT folds a ReLU into the
      range of the quantization after it).

    Why: TVM runs integer ops through generic kernels (an ORT-quantized MiniLM took about 1 s per
    call against ORT's 15 ms), while a float weight reaches the packed fp32 kernels, and with
    `--precision int8` tvmdeploy's own int8 kernels (per-channel weights, per-row activations).
    The weights keep their int8 rounding, so fp32 artifacts compute the model the user
    quantized, without the activation rounding."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list] = {}  # id(node) -> nodes replacing it ([] removes it)
    lifted = 0

    def only_consumer(name, op_type):
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in outputs:
            return users[0]
        return None

    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            quantizer = producer.get(node.input[0])
            if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear":
                continue
            cast = only_consumer(node.output[0], "Cast")
            scaled = only_consumer(cast.output[0], "Mul") if cast else None
            if scaled is None:
                continue
            other = [i for i in scaled.input if i != cast.output[0]]
            scales = producer.get(other[0]) if len(other) == 1 else None
            if scales is None or scales.op_type != "Mul":
                continue
            w_scale = [i for i in scales.input if i != quantizer.output[1]]
            if (
                len(w_scale) != 1
                or w_scale[0] not in inits
                or quantizer.output[1] not in scales.input
            ):
                continue
            w_zero = value(optional_input(node, 3)) if optional_input(node, 3) else None
            dense = _dequantize(value(node.input[1]), value(w_scale[0]), w_zero, axis=1)
            name = node.input[1] + "_dequantized"
            graph.initializer.append(numpy_helper.from_array(dense, name))
            inits[name] = graph.initializer[-1]
            matmul = onnx.helper.make_node(
                "MatMul", [quantizer.input[0], name], [scaled.output[0]], name=node.name
            )
            replaced[id(node)], replaced[id(cast)], replaced[id(scaled)] = [matmul], [], []
            lifted += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            q = value(node.input[0])
            zero = value(optional_input(node, 2)) if optional_input(node, 2) else None
            dense = _dequantize(q, value(node.input[1]), zero, axis if axis >= 0 else q.ndim + axis)
            graph.initializer.append(numpy_helper.from_array(dense, node.output[0]))
            inits[node.output[0]] = graph.initializer[-1]
            replaced[id(node)] = []
            lifted += 1
        elif node.op_type == "DequantizeLinear":
            quantize = producer.get(node.input[0])
            clip = _range_clip(node, quantize, value)
            if clip is not None:
                graph.initializer.extend(clip[1])
                replaced[id(node)] = [clip[0]]
    _replace_nodes(graph, replaced, outputs)
    return lifted


#: Integer storage types of weight-only quantized tables (`Cast` of one to float dequantizes it).
_INTEGER_STORAGE = {
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT4,
    TensorProto.UINT4,
}
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def lift_weight_only(model: onnx.ModelProto) -> int:
    """Weight-only quantization in standard ops, `Cast(Wq) [→ Sub(zero)] → Mul(scale)
    [→ Transpose]` on a stored integer table, folded into the float table it computes, in place;
    returns how many.

    Why: that is how PyTorch exports a model whose weights are kept int8 (every weight and the
    word embedding dequantized in the graph before its `MatMul` or `Gather`). Left in the graph
    the weight is an activation to TVM: no packing, no int8 kernel, and the embedding table
    hides the vocabulary. Folded, the matmuls reach the packed fp32 kernels and, with
    `--precision int8`, tvmdeploy's int8 kernels (requantized per channel), as QDQ weights do;
    the values keep their int8 rounding, so the fp32 artifact computes what the user's graph does.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}

    def only_consumer(name: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    def other_constant(node, name: str):
        others = [i for i in node.input if i != name]
        return others[0] if len(others) == 1 and others[0] in inits else None

    replaced: dict[int, list] = {}
    lifted = 0
    for node in graph.node:
        if node.op_type != "Cast" or node.input[0] not in inits:
            continue
        stored = inits[node.input[0]]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if stored.data_type not in _INTEGER_STORAGE or to not in _FLOATS or len(stored.dims) < 2:
            continue
        chain, value = [node], numpy_helper.to_array(stored).astype(np.float32)
        step = only_consumer(node.output[0])
        if step is not None and step.op_type == "Sub" and step.input[0] == node.output[0]:
            zero = other_constant(step, node.output[0])
            if zero is None:
                continue
            value = value - numpy_helper.to_array(inits[zero]).astype(np.float32)
            chain.append(step)
            step = only_consumer(step.output[0])
        if step is None or step.op_type != "Mul":
            continue
        scale = other_constant(step, chain[-1].output[0])
        if scale is None:
            continue
        value = value * numpy_helper.to_array(inits[scale]).astype(np.float32)
        if list(value.shape) != list(stored.dims):  # the scale must not broadcast the table up
            continue
        chain.append(step)
        after = only_consumer(step.output[0])  # F.linear's weight.T: stored transposed, once
        perm = (
            next((list(a.ints) for a in after.attribute if a.name == "perm"), None)
            if after
            else None
        )
        if (
            after is not None
            and after.op_type == "Transpose"
            and value.ndim == 2
            and perm in (None, [1, 0])
        ):
            value = value.T
            chain.append(after)
        dense = numpy_helper.from_array(
            np.ascontiguousarray(value, np.float32), chain[-1].output[0]
        )
        graph.initializer.append(dense)
        inits[dense.name] = dense
        for done in chain:
            replaced[id(done)] = []
        lifted += 1
    _replace_nodes(graph, replaced, outputs)
    return lifted


def _range_clip(dequantize, quantize, value):
    """Clip(x, lo, hi) (and its two constants) for a per-tensor QuantizeLinear → DequantizeLinear
    pair on an activation x; None for any other form."""
    from onnx import numpy_helper

    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    if list(quantize.input[1:]) != list(dequantize.input[1:]) or len(quantize.input) < 3:
        return None
    scale, zero = value(quantize.input[1]), value(quantize.input[2])
    if scale is None or zero is None or scale.size != 1 or zero.dtype not in (np.int8, np.uint8):
        return None
    info = np.iinfo(zero.dtype)
    step, offset = float(scale.reshape(())), float(zero.reshape(()))
    name = dequantize.output[0]
    bounds = [
        numpy_helper.from_array(np.array((info.min - offset) * step, np.float32), f"{name}_lo"),
        numpy_helper.from_array(np.array((info.max - offset) * step, np.float32), f"{name}_hi"),
    ]
    clip = onnx.helper.make_node(
        "Clip", [quantize.input[0], f"{name}_lo", f"{name}_hi"], [name], name=dequantize.name
    )
    return clip, bounds


def _consumers(graph: onnx.GraphProto) -> dict[str, list]:
    """{value name: the nodes that read it}."""
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _replace_nodes(graph: onnx.GraphProto, replaced: dict[int, list], outputs: set[str]) -> None:
    """Each node in `replaced` (by id) swapped for its replacements ([] removes it), then what
    nothing reads any more dropped: nodes and initializers."""
    if not replaced:
        return
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(_live(nodes, outputs))
    drop_unused_initializers(graph)


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes something still reads (graph outputs at the root), in their order."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs read outer values too
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    needed.update(i for n in sub.node for i in n.input)
    return keep[::-1]


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Initializers no node reads any more (a MatMulNBits' packed weight once dequantized)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:  # subgraphs read outer names too
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                used |= {i for n in sub.node for i in n.input}
    dropped = {i.name for i in graph.initializer if i.name not in used}
    if not dropped:
        return
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
