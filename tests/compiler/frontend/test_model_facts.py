"""A bare ONNX file's facts come from its graph, through the ops that dequantize stored weights,
before the first build; what the graph hides is refused early and can be given. Weight-only
int8 chains (`Cast → Mul(scale)`, PyTorch's export of int8-stored weights) fold into fp32 tables
that the int8 kernels take."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.errors import ModelLoadError
from tvmdeploy.compiler.frontend.model_facts import read_facts
from tvmdeploy.compiler.frontend.onnx_quantized import lift_weight_only
from tvmdeploy.runtime import InputError, load

from bench.onnx_corpus import ENTRIES, LAYERS, POSITIONS, VOCAB, inputs_for, make, reference


@pytest.fixture(scope="module")
def int8_weights_file(tmp_path_factory):
    return make(ENTRIES["bert-int8-weights"], tmp_path_factory.mktemp("int8-weights"))


def test_facts_of_an_int8_weight_file_come_through_its_dequantize_chain(int8_weights_file):
    stored = onnx.load(str(int8_weights_file))
    int8_tables = [i for i in stored.graph.initializer if i.data_type == TensorProto.INT8]
    assert any(i.dims[0] == VOCAB for i in int8_tables), "the word embedding is stored int8"
    facts = read_facts(int8_weights_file, config={})
    assert (facts.vocab_size, facts.type_vocab_size, facts.max_positions) == (VOCAB, 2, POSITIONS)
    assert "dequantize chain" in facts.sources["vocab_size"]


def test_weight_only_chains_fold_without_changing_the_outputs(int8_weights_file):
    model = onnx.load(str(int8_weights_file))
    int8_tables = sum(i.data_type == TensorProto.INT8 for i in model.graph.initializer)
    assert lift_weight_only(model) == int8_tables
    assert not any(i.data_type == TensorProto.INT8 for i in model.graph.initializer)
    feed = inputs_for(int8_weights_file)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: feed[n] for n in names})[0]
    want = reference(int8_weights_file, feed)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_int8_precision_runs_the_folded_weights_on_the_int8_kernels(int8_weights_file, tmp_path):
    from tvmdeploy.compiler.frontend.importer import import_onnx
    from tvmdeploy.compiler.kernels.cpu_int8 import kernel_for
    from tvmdeploy.compiler.options import parse_buckets
    from tvmdeploy.compiler.quantize import quantize_int8
    from tvmdeploy.targets.resolve import resolve_profile

    profile = resolve_profile("host")
    kernel = kernel_for(profile)
    if kernel is None:
        pytest.skip(f"no int8 kernel for {profile.name}")
    imported = import_onnx(int8_weights_file, parse_buckets("1x16"), POSITIONS)
    _, count = quantize_int8(imported.mod, kernel)
    assert count >= 6 * LAYERS  # q, k, v, output, and the two FFN matmuls of every layer

    out = compile_model(
        CompileOptions(
            model=str(int8_weights_file),
            output=str(tmp_path / "int8.tvmd"),
            buckets="1,2x16",
            precisions=["int8"],
        )
    )
    model = load(out, precision="int8")
    assert model.choice.artifact.endswith("int8"), model.choice.reason
    feed = inputs_for(int8_weights_file)
    want = reference(int8_weights_file, feed)["logits"]
    got = model(**feed)["logits"]
    np.testing.assert_allclose(got, want, atol=5e-2 * float(want.max() - want.min()))
    assert (got.argmax(-1) == want.argmax(-1)).all()


def _hidden_vocab_file(path, rows: int = 50, hidden: int = 8):
    """Token ids reach the table through `Mod`: neither the chain walk nor shape inference can
    tell which ids the model takes."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((rows, hidden)).astype(np.float32), "table")
    modulus = numpy_helper.from_array(np.array(rows, np.int64), "modulus")
    nodes = [
        helper.make_node("Mod", ["input_ids", "modulus"], ["ids"]),
        helper.make_node("Gather", ["table", "ids"], ["gathered"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis"], ["mask_3d"]),
        helper.make_node("Mul", ["gathered", "mask_3d"], ["last_hidden_state"]),
    ]
    axis = numpy_helper.from_array(np.array([2], np.int64), "axis")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]
    )
    graph = helper.make_graph(nodes, "hidden", [ids, mask], [out], [table, modulus, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_a_hidden_vocabulary_is_refused_before_the_first_build_and_can_be_given(tmp_path, caplog):
    path = _hidden_vocab_file(tmp_path / "hidden.onnx")
    options = CompileOptions(
        model=str(path), output=str(tmp_path / "x.tvmd"), buckets="1x16", max_positions=16
    )
    with (
        caplog.at_level(logging.INFO, logger="tvmdeploy"),
        pytest.raises(ModelLoadError, match="--vocab-size"),
    ):
        compile_model(options)
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert not any("build" in s or "import" in s for s in stages), stages
    assert not (tmp_path / "x.tvmd").exists()

    options.vocab_size = 50
    model = load(compile_model(options))
    ids = np.array([[3, 49, 7]], np.int64)
    mask = np.ones_like(ids)
    assert model(input_ids=ids, attention_mask=mask)["last_hidden_state"].shape == (1, 3, 8)
    with pytest.raises(InputError, match="50"):
        model(input_ids=np.array([[3, 50, 7]], np.int64), attention_mask=mask)
