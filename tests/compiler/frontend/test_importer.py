"""ONNX → Relax import: buckets, unsupported operators named, I/O axes read from the graph."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvmdeploy.compiler.errors import UnsupportedOperatorError
from tvmdeploy.compiler.frontend.importer import import_onnx, io_spec, unsupported_ops
from tvmdeploy.compiler.options import BucketSpec, parse_buckets


def test_parse_buckets_cross_product_and_groups():
    assert parse_buckets("1,4x32,64") == [
        BucketSpec(1, 32),
        BucketSpec(1, 64),
        BucketSpec(4, 32),
        BucketSpec(4, 64),
    ]
    assert parse_buckets("1x32;8x128") == [BucketSpec(1, 32), BucketSpec(8, 128)]
    assert BucketSpec(4, 64).function == "b4_s64"


@pytest.mark.parametrize("bad", ["", "32", "1x", "0x32", "ax32", "1x-4"])
def test_parse_buckets_rejects_bad_specs(bad):
    with pytest.raises(ValueError):
        parse_buckets(bad)


def embedding_graph(tail_op: str, path) -> str:
    """input_ids → Gather(embedding) → tail_op → output, with symbolic batch/seq dims."""
    table = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "emb"
    )
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node(tail_op, ["h"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(
                "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            )
        ],
        [
            helper.make_tensor_value_info(
                "out", TensorProto.FLOAT, ["batch_size", "sequence_length", 8]
            )
        ],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def test_unsupported_operator_is_named(tmp_path):
    path = embedding_graph("Celu", tmp_path / "celu.onnx")
    assert unsupported_ops(onnx.load(path)) == ["Celu"]
    with pytest.raises(UnsupportedOperatorError, match="Celu") as info:
        import_onnx(path, [BucketSpec(1, 4)])
    assert info.value.ops == ["Celu"]


def test_io_spec_marks_batch_and_seq_axes(tmp_path):
    inputs, outputs = io_spec(onnx.load(embedding_graph("Relu", tmp_path / "relu.onnx")))
    assert inputs == [{"name": "input_ids", "dtype": "int64"}]
    assert outputs == [{"name": "out", "dtype": "float32", "axes": ["batch", "seq", None]}]


def test_one_function_per_bucket_sharing_weights(tmp_path):
    import tvm

    path = embedding_graph("Relu", tmp_path / "relu.onnx")
    imported = import_onnx(path, parse_buckets("1,2x4,8"))
    names = sorted(gv.name_hint for gv in imported.mod.get_global_vars())
    assert names == ["b1_s4", "b1_s8", "b2_s4", "b2_s8"]
    assert len(imported.params) == 1 and imported.param_names == ["emb"]
    # Each bucket function is static: its input is [batch, seq], the weight is a parameter.
    func = imported.mod["b2_s8"]
    assert [int(d) for d in func.params[0].ty.shape] == [2, 8]
    assert len(func.params) == 2
    assert isinstance(imported.params[0], tvm.runtime.Tensor)


def _embedding_graph(rng) -> onnx.ModelProto:
    """ids -> word table (Gather by ids) + position table (Gather by a constant range, sliced to
    the input's length: foldable at a static shape) -> MatMul by a large weight."""
    vocab, positions, hidden = 300, 256, 96  # every table above normalize.FOLD_LIMIT_BYTES
    tables = {
        "word": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "pos": rng.standard_normal((positions, hidden)).astype(np.float32),
        "proj": rng.standard_normal((hidden, 4 * hidden)).astype(np.float32),
        "range": np.arange(positions, dtype=np.int64)[None],
    }
    small = {"zero": np.array([0], np.int64), "one": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["w"], name="word_gather"),
        helper.make_node("Shape", ["input_ids"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["len"], axis=0, name="seq_len"),
        helper.make_node("Slice", ["range", "zero", "len", "one"], ["ids"], name="pos_ids"),
        helper.make_node("Gather", ["pos", "ids"], ["p"], name="pos_gather"),
        helper.make_node("Add", ["w", "p"], ["x"], name="add"),
        helper.make_node("MatMul", ["x", "proj"], ["out"], name="proj_matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 4 * hidden])],
        [numpy_helper.from_array(v, k) for k, v in {**tables, **small}.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folding_without_the_weights_it_cannot_use_gives_the_same_graph():
    """Tables read by a node fed from the token inputs go to onnxslim without their values;
    a table a constant index reads (the position slice) keeps them, so it still folds. The
    normalized graph is the one folding the whole model gives, and runs as the original does
    on ONNX Runtime."""
    import onnxruntime
    from tvmdeploy.compiler.frontend import normalize

    model = _embedding_graph(np.random.default_rng(0))
    prepared = normalize.prepare(model, "emb.onnx")
    assert normalize._unfoldable_weights(prepared.model) == {"word", "proj"}
    light = normalize.for_bucket(prepared, 2, 16)
    ids = np.random.default_rng(1).integers(0, 300, (2, 16), dtype=np.int64)

    def run(m):
        session = onnxruntime.InferenceSession(m.SerializeToString())
        return session.run(None, {"input_ids": ids})[0]

    original = normalize._unfoldable_weights
    try:
        normalize._unfoldable_weights = lambda m: set()
        whole = normalize.for_bucket(prepared, 2, 16)
    finally:
        normalize._unfoldable_weights = original
    assert light.SerializeToString() == whole.SerializeToString()
    assert "pos_gather" not in {n.name for n in light.graph.node}  # folded: 2*16*96*4 bytes
    np.testing.assert_allclose(run(light), run(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("low", "high"), [(-0.5, 0.75), (float("nan"), 0.75)])
def test_constant_clip_bounds_are_resolved_at_import_and_match_onnxruntime(tmp_path, low, high):
    """TVM guards each Clip bound with `where(isnan(bound), ...)`; constant bounds are resolved
    at import (frontend/clip_bounds.py), so no `isnan` is left for constant folding to build,
    and a NaN bound still means unbounded, as in ONNX Runtime."""
    import onnxruntime
    import tvm
    from tvm import relax

    path = embedding_graph("Identity", tmp_path / "clip.onnx")
    model = onnx.load(path)
    model.graph.node[-1].CopyFrom(helper.make_node("Clip", ["h", "lo", "hi"], ["out"]))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(low, np.float32), "lo"),
            numpy_helper.from_array(np.array(high, np.float32), "hi"),
        ]
    )
    onnx.save(model, path)
    imported = import_onnx(path, parse_buckets("1x4"))
    assert "isnan" not in imported.mod.script()
    ids = np.array([[1, 7, 30, 49]], np.int64)
    mod = relax.transform.BindParams("b1_s4", {})(imported.mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["b1_s4"](tvm.runtime.tensor(ids), *[tvm.runtime.tensor(p) for p in imported.params])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = session.run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(got.numpy(), want)
    assert want.min() < -0.5 if np.isnan(low) else want.min() == np.float32(-0.5)
