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
