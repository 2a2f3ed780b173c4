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
