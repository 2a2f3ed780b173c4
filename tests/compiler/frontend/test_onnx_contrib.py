"""ONNX Runtime's contrib and quantized ops, rewritten into standard ONNX (onnx_contrib.py).

Each test builds a one-op graph, runs it in ONNX Runtime (the ops' reference implementation),
rewrites it, checks that only standard ops remain, and runs the rewrite in ONNX Runtime on the
same inputs: the outputs must match to float rounding. The corpus tests then take the rewritten
graphs through TVM.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvmdeploy.compiler.errors import UnsupportedOperatorError
from tvmdeploy.compiler.frontend.onnx_contrib import rewrite_contrib_ops
from tvmdeploy.compiler.frontend.onnx_quantized import dequantize_nbits

MS = "com.microsoft"
B, S, H, N = 2, 6, 16, 2
RNG = np.random.default_rng(0)
FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "one_op", inputs, outputs, list(initializers))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    )


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def check(model: onnx.ModelProto, feed: dict, atol: float = 2e-5) -> onnx.ModelProto:
    """ORT on the contrib graph vs ORT on its rewrite; returns the rewrite."""
    expected = _run(model, feed)
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert rewrite_contrib_ops(rewritten) >= 1
    assert all(n.domain in ("", "ai.onnx") for n in rewritten.graph.node)
    onnx.checker.check_model(rewritten)
    got = _run(rewritten, feed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)
    return rewritten


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


@pytest.mark.parametrize(
    "op,inputs,attrs",
    [
        ("Gelu", ["x"], {}),
        ("BiasGelu", ["x", "bias"], {}),
        ("FastGelu", ["x"], {}),
        ("FastGelu", ["x", "bias"], {}),
        ("QuickGelu", ["x"], {"alpha": 1.5}),
    ],
)
def test_gelu_family(op, inputs, attrs):
    node = helper.make_node(op, inputs, ["y"], domain=MS, **attrs)
    init = [numpy_helper.from_array(_x(H), "bias")]
    model = _model([node], [_vi("x", FLOAT, [B, S, H])], [_vi("y", FLOAT, [B, S, H])], init)
    check(model, {"x": _x(B, S, H) * 3})


@pytest.mark.parametrize("with_bias,with_sum", [(False, False), (True, True)])
def test_skip_layer_normalization(with_bias, with_sum):
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    outputs = ["y"] + (["", "", "sum"] if with_sum else [])
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain=MS, epsilon=1e-6)
    init = [numpy_helper.from_array(_x(H), n) for n in ("gamma", "beta", "bias")]
    outs = [_vi("y", FLOAT, [B, S, H])] + ([_vi("sum", FLOAT, [B, S, H])] if with_sum else [])
    model = _model([node], [_vi("x", FLOAT, [B, S, H]), _vi("skip", FLOAT, [B, S, H])], outs, init)
    check(model, {"x": _x(B, S, H), "skip": _x(B, S, H)})


def test_skip_layer_normalization_before_opset_17_is_decomposed():
    node = helper.make_node(
        "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=MS
    )
    init = [numpy_helper.from_array(_x(H), n) for n in ("gamma", "beta")]
    model = _model(
        [node],
        [_vi("x", FLOAT, [B, S, H]), _vi("skip", FLOAT, [B, S, H])],
        [_vi("y", FLOAT, [B, S, H])],
        init,
        opset=13,
    )
    rewritten = check(model, {"x": _x(B, S, H), "skip": _x(B, S, H)})
    assert "LayerNormalization" not in {n.op_type for n in rewritten.graph.node}


def test_simplified_layer_normalizations():
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["a"], epsilon=1e-6),
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["a", "skip", "gamma"], ["y"], domain=MS
        ),
    ]
    init = [numpy_helper.from_array(_x(H), "gamma")]
    model = _model(
        nodes,
        [_vi("x", FLOAT, [B, S, H]), _vi("skip", FLOAT, [B, S, H])],
        [_vi("y", FLOAT, [B, S, H])],
        init,
    )
    check(model, {"x": _x(B, S, H), "skip": _x(B, S, H)})


def test_embed_layer_normalization_with_mask_index():
    inputs = ["ids", "segments", "word", "position", "segment", "gamma", "beta", "mask"]
    node = helper.make_node(
        "EmbedLayerNormalization", inputs, ["y", "mask_index"], domain=MS, epsilon=1e-12
    )
    init = [
        numpy_helper.from_array(_x(30, H), "word"),
        numpy_helper.from_array(_x(16, H), "position"),
        numpy_helper.from_array(_x(2, H), "segment"),
        numpy_helper.from_array(_x(H), "gamma"),
        numpy_helper.from_array(_x(H), "beta"),
    ]
    int32 = TensorProto.INT32
    model = _model(
        [node],
        [_vi(n, int32, [B, S]) for n in ("ids", "segments", "mask")],
        [_vi("y", FLOAT, [B, S, H]), _vi("mask_index", int32, [B])],
        init,
    )
    mask = np.ones((B, S), np.int32)
    mask[1, 4:] = 0
    feed = {
        "ids": RNG.integers(0, 30, (B, S)).astype(np.int32),
        "segments": RNG.integers(0, 2, (B, S)).astype(np.int32),
        "mask": mask,
    }
    check(model, feed)


def _attention_model(mask_shape, mask_dtype=TensorProto.INT32, **attrs):
    inputs = ["x", "w", "b"] + (["mask"] if mask_shape else [])
    node = helper.make_node("Attention", inputs, ["y"], domain=MS, num_heads=N, **attrs)
    init = [
        numpy_helper.from_array(_x(H, 3 * H) * 0.3, "w"),
        numpy_helper.from_array(_x(3 * H), "b"),
    ]
    graph_inputs = [_vi("x", FLOAT, [B, S, H])]
    if mask_shape:
        graph_inputs.append(_vi("mask", mask_dtype, mask_shape))
    return _model([node], graph_inputs, [_vi("y", FLOAT, [B, S, H])], init)


@pytest.mark.parametrize(
    "mask_shape,attrs",
    [
        (None, {}),
        ([B], {}),  # key lengths (ORT's transformer optimizer writes this form)
        ([B], {"mask_filter_value": -3.4028234663852886e38}),
        ([B, S], {}),  # raw 0/1 mask
        ([B, S, S], {}),
        (None, {"unidirectional": 1}),
        ([B, S], {"scale": 0.5}),
    ],
)
def test_attention(mask_shape, attrs):
    model = _attention_model(mask_shape, **attrs)
    feed = {"x": _x(B, S, H)}
    if mask_shape == [B]:
        feed["mask"] = np.array([S, S - 2], np.int32)
    elif mask_shape:
        mask = np.ones(mask_shape, np.int32)
        mask[1, ..., S - 2 :] = 0
        feed["mask"] = mask
    check(model, feed)


def test_attention_with_past_state_is_refused_naming_the_node():
    node = helper.make_node(
        "Attention",
        ["x", "w", "b", "", "past"],
        ["y", "present"],
        domain=MS,
        num_heads=N,
        name="layer0_attention",
    )
    model = _model(
        [node],
        [_vi("x", FLOAT, [B, S, H]), _vi("past", FLOAT, [2, B, N, S, H // N])],
        [_vi("y", FLOAT, [B, S, H])],
        [numpy_helper.from_array(_x(H, 3 * H), "w"), numpy_helper.from_array(_x(3 * H), "b")],
    )
    with pytest.raises(UnsupportedOperatorError, match="com.microsoft.Attention") as caught:
        rewrite_contrib_ops(model, "user.onnx")
    assert "layer0_attention" in str(caught.value) and "past/present" in str(caught.value)
    assert "user.onnx" in str(caught.value)


@pytest.mark.parametrize("mask", [None, "lengths", "raw"])
def test_multi_head_attention(mask):
    L = 5
    inputs = ["q", "k", "v", "bias"] + (["mask"] if mask else [])
    node = helper.make_node("MultiHeadAttention", inputs, ["y"], domain=MS, num_heads=N)
    graph_inputs = [
        _vi("q", FLOAT, [B, S, H]),
        _vi("k", FLOAT, [B, L, H]),
        _vi("v", FLOAT, [B, L, H]),
    ]
    feed = {"q": _x(B, S, H), "k": _x(B, L, H), "v": _x(B, L, H)}
    if mask == "lengths":
        graph_inputs.append(_vi("mask", TensorProto.INT32, [B]))
        feed["mask"] = np.array([L, 3], np.int32)
    elif mask == "raw":
        graph_inputs.append(_vi("mask", TensorProto.INT32, [B, L]))
        feed["mask"] = np.array([[1] * L, [1, 1, 1, 0, 0]], np.int32)
    model = _model(
        [node],
        graph_inputs,
        [_vi("y", FLOAT, [B, S, H])],
        [numpy_helper.from_array(_x(3 * H), "bias")],
    )
    check(model, feed)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian `bits`-bit fields into bytes along the last axis."""
    per = 8 // bits
    padded = np.zeros((*values.shape[:-1], -(-values.shape[-1] // per) * per), np.uint8)
    padded[..., : values.shape[-1]] = values
    grouped = padded.reshape(*values.shape[:-1], -1, per).astype(np.uint16)
    return (grouped << (np.arange(per) * bits)).sum(-1).astype(np.uint8)


@pytest.mark.parametrize(
    "bits,k,zero_points,with_bias",
    [
        (4, 64, None, False),
        (4, 40, "packed", True),
        (8, 64, "packed", False),
        (4, 64, "float", False),
    ],
)
def test_matmul_nbits(bits, k, zero_points, with_bias):
    """MatMulNBits with K not a multiple of the block (40), zero points packed or float."""
    n, block = 24, 32
    blocks = -(-k // block)
    q = RNG.integers(0, 1 << bits, (n, blocks, block)).astype(np.uint8)
    packed = _pack(q, bits)  # [N, blocks, blob]
    scales = (RNG.random(n * blocks).astype(np.float32) + 0.5) * 0.05
    init = [numpy_helper.from_array(packed, "w_q"), numpy_helper.from_array(scales, "w_scales")]
    inputs = ["a", "w_q", "w_scales"]
    if zero_points == "packed":
        zp = RNG.integers(0, 1 << bits, (n, blocks)).astype(np.uint8)
        init.append(numpy_helper.from_array(_pack(zp, bits).reshape(-1), "w_zp"))
        inputs.append("w_zp")
    elif zero_points == "float":
        init.append(numpy_helper.from_array(RNG.random(n * blocks).astype(np.float32) * 8, "w_zp"))
        inputs.append("w_zp")
    if with_bias:
        init.append(numpy_helper.from_array(_x(n), "bias"))
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block
    )
    model = _model([node], [_vi("a", FLOAT, [B, S, k])], [_vi("y", FLOAT, [B, S, n])], init)
    rewritten = check(model, {"a": _x(B, S, k)}, atol=1e-4)
    dense = next(i for i in rewritten.graph.initializer if i.name.endswith("_dequantized"))
    assert list(dense.dims) == [k, n] and "w_q" not in {i.name for i in rewritten.graph.initializer}


def test_dequantize_nbits_matches_the_definition():
    """One 4-bit block by hand: (nibble - zero point) * scale, low nibble first."""
    packed = np.array([[[0x21, 0x43]]], np.uint8)  # values 1, 2, 3, 4
    dense = dequantize_nbits(packed, np.array([0.5], np.float32), None, 4, 1, 4, 4)
    assert dense.ravel().tolist() == [(v - 8) * 0.5 for v in (1, 2, 3, 4)]


def test_quantized_matmuls():
    """QLinearMatMul, MatMulIntegerToFloat and DynamicQuantizeMatMul in one graph."""
    k, n = H, 8
    b_int8 = RNG.integers(-100, 100, (k, n)).astype(np.int8)
    init = [
        numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(3, np.uint8), "a_zero"),
        numpy_helper.from_array(b_int8, "b"),
        numpy_helper.from_array(np.array(0.02, np.float32), "b_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "b_zero"),
        numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zero"),
        numpy_helper.from_array(_x(n), "bias"),
    ]
    nodes = [
        helper.make_node(
            "QLinearMatMul",
            ["a_u8", "a_scale", "a_zero", "b", "b_scale", "b_zero", "y_scale", "y_zero"],
            ["y_q"],
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            ["a_u8", "b", "a_scale", "b_scale", "a_zero", "b_zero", "bias"],
            ["y_f"],
            domain=MS,
        ),
        helper.make_node(
            "DynamicQuantizeMatMul", ["a_f", "b", "b_scale", "b_zero", "bias"], ["y_d"], domain=MS
        ),
    ]
    model = _model(
        nodes,
        [_vi("a_u8", TensorProto.UINT8, [B * S, k]), _vi("a_f", FLOAT, [B * S, k])],
        [
            _vi("y_q", TensorProto.UINT8, [B * S, n]),
            _vi("y_f", FLOAT, [B * S, n]),
            _vi("y_d", FLOAT, [B * S, n]),
        ],
        init,
    )
    feed = {"a_u8": RNG.integers(0, 255, (B * S, k)).astype(np.uint8), "a_f": _x(B * S, k)}
    check(model, feed, atol=1.01)  # uint8 outputs may round one step apart; floats exactly
    expected, got = _run(model, feed), _run(_rewritten(model), feed)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-5, atol=1e-4)


def _rewritten(model):
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    rewrite_contrib_ops(copy)
    return copy


@pytest.mark.parametrize("form", ["dynamic", "qdq"])
def test_quantized_graphs_are_lifted_back_to_float_weights(form, tmp_path):
    """ORT's quantizers on a two-layer MLP: the lifted graph has float weights and no integer
    ops (so TVM's fp32 and int8 kernels run it), and computes the quantized model's weights:
    ORT on it matches ORT on the original within the activation rounding it drops."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from tvmdeploy.compiler.frontend.onnx_quantized import dequantize_weights

    w1, w2 = _x(H, 64) * 0.2, _x(64, 8) * 0.2
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    init = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    model = _model(nodes, [_vi("x", FLOAT, [B, S, H])], [_vi("y", FLOAT, [B, S, 8])], init)
    source, quantized = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, source)
    feed = {"x": _x(B, S, H)}
    if form == "dynamic":
        quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
    else:

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"x": _x(B, S, H)} for _ in range(4)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(source), str(quantized), Reader(), quant_format=QuantFormat.QDQ)
    original = onnx.load(quantized)
    lifted = onnx.ModelProto.FromString(original.SerializeToString())
    assert dequantize_weights(lifted) == 2
    integer_ops = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
    assert not integer_ops & {n.op_type for n in lifted.graph.node}
    weights = {i.name: numpy_helper.to_array(i) for i in lifted.graph.initializer}
    assert all(w.dtype == np.float32 for w in weights.values())
    if form == "qdq":  # ORT folded the ReLU into r's quantization range: a Clip keeps it
        assert "Clip" in {n.op_type for n in lifted.graph.node}
    # The lifted weights are the quantized ones: within half a quantization step of the floats.
    w1_lifted = next(w for w in weights.values() if w.shape == w1.shape)
    step = np.abs(w1).max() / 127
    assert np.abs(w1_lifted - w1).max() <= step / 2 + 1e-6
    (want,) = _run(original, feed)
    (got,) = _run(lifted, feed)
    (exact,) = _run(model, feed)
    spread = float(exact.max() - exact.min())
    np.testing.assert_allclose(got, want, atol=0.05 * spread)
    # Only the weights' rounding is left: closer to the float model than ORT's int8 run.
    assert np.abs(got - exact).max() <= np.abs(want - exact).max() + 1e-6
