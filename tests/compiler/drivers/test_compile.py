"""The compile driver: stages in order, one bundle whole or nothing, options checked once."""

import json
import logging

import pytest
from tvmdeploy.compiler import CompileOptions, compile_model, verify
from tvmdeploy.compiler.errors import OptionError, ParityError, TvmdeployError
from tvmdeploy.compiler.options import DEFAULT_BUCKETS, RpcTarget, parse_buckets
from tvmdeploy.runtime import Bundle

from tests.conftest import TINY_BUCKETS


def test_bundle_holds_what_the_options_asked_for(tiny_bundle, tiny_model_dir):
    bundle = Bundle(tiny_bundle)
    bundle.verify()
    assert {(b.batch, b.seq) for b in bundle.buckets} == {
        (b.batch, b.seq) for b in parse_buckets(TINY_BUCKETS)
    }
    (artifact,) = bundle.artifacts
    assert artifact.parity["ok"] is True and artifact.parity["where"] == "native"
    assert bundle.model["source"] == str(tiny_model_dir.resolve())
    assert bundle.manifest["export_parity"]["ok"] is True


def test_stages_are_logged_in_order_and_a_parity_failure_writes_nothing(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    real_cases = verify.reference_cases

    def wrong_reference(*args, **kwargs):  # ONNX Runtime's real outputs, shifted: verify must fail
        return [
            (b, a, [e + 1.0 for e in expected]) for b, a, expected in real_cases(*args, **kwargs)
        ]

    monkeypatch.setattr(verify, "reference_cases", wrong_reference)
    out = tmp_path / "bad.tvmd"
    with (
        caplog.at_level(logging.INFO, logger="tvmdeploy"),
        pytest.raises(ParityError, match="no bundle written"),
    ):
        compile_model(CompileOptions(model=str(tiny_model_dir), output=str(out), buckets="1x16"))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    titles = [s.split("] ", 1)[1].split(" ")[0] for s in steps if s.endswith("…")]
    assert titles == ["export", "import", "reference", "build", "verify"]
    assert any("[FAILED]" in r.getMessage() and "b1_s16" in r.getMessage() for r in caplog.records)


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(OptionError, match="BATCHES x SEQS"):
        parse_buckets("1,2;x")
    with pytest.raises(OptionError, match="needs both --rpc HOST:PORT and --rpc-key KEY"):
        RpcTarget.from_options("127.0.0.1:9190", None)
    with pytest.raises(TvmdeployError, match="HOST:PORT"):
        RpcTarget.from_options("no-port", "key")
    assert RpcTarget.from_options(None, None) is None
    assert RpcTarget.from_options("127.0.0.1:9190", "k") == RpcTarget("127.0.0.1:9190", "k")
    assert parse_buckets(DEFAULT_BUCKETS)[-1].seq == 256
    with pytest.raises(TvmdeployError, match="unknown target profile"):
        compile_model(
            CompileOptions(model=str(tmp_path), output=str(tmp_path / "x.tvmd"), profiles=["nope"])
        )
    assert not (tmp_path / "x.tvmd").exists()


def test_display_says_what_will_happen(caplog):
    from tvmdeploy.targets import get

    options = CompileOptions(
        model="m",
        output="o.tvmd",
        profiles=["x86-64-v3"],
        tune_trials=5,
        rpc=RpcTarget("127.0.0.1:9190", "board"),
    )
    with caplog.at_level(logging.INFO, logger="tvmdeploy"):
        options.display([get("x86-64-v3")])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "x86-64-v3" in text and "5 trials per profile" in text and "'board'" in text
    assert json.dumps(options.buckets)


def data_dependent_graph(folder, tail: str):
    """An embedding followed by an op whose output shape depends on the token values, which no
    static bucket can pin: `nonzero` (TVM 0.27 imports it, then fails to build it: "MatchCast is
    not supported in global lifting") or `topk` (its k is computed; TVM's importer refuses it).
    Real failures inside TVM; when tvmdeploy learns to compile one, give its test another."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed")]
    if tail == "nonzero":
        nodes += [
            helper.make_node("NonZero", ["input_ids"], ["nz"], name="where_nonzero"),
            helper.make_node("Cast", ["nz"], ["out"], to=TensorProto.FLOAT, name="as_float"),
        ]
    else:
        nodes += [
            helper.make_node("ReduceMax", ["input_ids"], ["top"], keepdims=1, name="largest_id"),
            helper.make_node("Reshape", ["top", "one"], ["k"], name="k"),
            helper.make_node("TopK", ["h", "k"], ["out", "idx"], axis=1, name="top_k_by_id"),
        ]
    ids = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    dims = ["two", "found"] if tail == "nonzero" else ["batch", "k", 8]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)]
    model = helper.make_model(
        helper.make_graph(nodes, tail, ids, out, init), opset_imports=[helper.make_opsetid("", 17)]
    )
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": 50}))
    return folder / "model.onnx"


def test_a_failure_inside_tvm_names_the_stage_and_writes_nothing(tmp_path):
    from tvmdeploy.compiler.cli import app
    from tvmdeploy.compiler.errors import StageError
    from typer.testing import CliRunner

    model = data_dependent_graph(tmp_path / "nonzero", "nonzero")
    out = tmp_path / "nonzero.tvmd"
    with pytest.raises(
        StageError, match=r"^build failed \(InternalError: .*\); .*Nothing was written"
    ) as caught:
        compile_model(CompileOptions(model=str(model), output=str(out), buckets="1x4"))
    assert caught.value.__cause__ is not None  # TVM's error, for -v
    assert not out.exists()
    quiet = CliRunner().invoke(app, ["compile", str(model), "-o", str(out), "--buckets", "1x4"])
    assert quiet.exit_code == 2 and "error: build failed" in quiet.output
    assert "Traceback" not in quiet.output and "run with -v" in quiet.output
    loud = CliRunner().invoke(
        app, ["-v", "compile", str(model), "-o", str(out), "--buckets", "1x4"]
    )
    assert loud.exit_code == 2 and "Traceback" in loud.output
    assert not out.exists()


def test_an_import_failure_names_the_onnx_node_and_op(tmp_path, capsys):
    """TVM's importer only prints the failing op; the error names the node, the op and the
    user's file (not the working copy), and TVM's printout does not reach the terminal."""
    from tvmdeploy.compiler.errors import StageError

    model = data_dependent_graph(tmp_path / "topk", "topk")
    out = tmp_path / "topk.tvmd"
    with pytest.raises(StageError) as caught:
        compile_model(CompileOptions(model=str(model), output=str(out), buckets="1x4"))
    message = str(caught.value)
    assert "node 'top_k_by_id' (op TopK)" in message and str(model) in message
    assert "k must be a constant" in message and "Nothing was written" in message
    assert "Error converting operator" not in capsys.readouterr().out
    assert not out.exists()


def test_default_buckets_follow_the_model(tiny_exported, tmp_path):
    """The tiny BERT takes 128 positions: no 256-token bucket it could not run (its session
    export, with the config.json beside it that says so)."""
    from tvmdeploy.compiler.options import default_buckets

    assert default_buckets(128) == "1,4x32,64,128"
    assert default_buckets(514) == "1,4x32,64,128,256,512"
    assert default_buckets(None) == DEFAULT_BUCKETS
    assert default_buckets(20) == "1,4x20"
    out = compile_model(
        CompileOptions(model=str(tiny_exported.onnx_path), output=str(tmp_path / "d.tvmd"))
    )
    seqs = {b.seq for b in Bundle(out).buckets}
    assert seqs == {32, 64, 128}


@pytest.mark.parametrize("name", ["bert-torchscript", "roberta-optimum"])
def test_a_bare_onnx_files_limit_comes_from_its_position_table(name, tmp_path):
    """No config.json beside the file: the position table's rows say the limit (the corpus
    models have 128 positions; RoBERTa's table has two more rows, for the padding offset, that
    no token position reaches). Defaults buckets follow it."""
    from tvmdeploy.compiler.frontend.export import export_model
    from tvmdeploy.compiler.frontend.model_facts import max_positions_of
    from tvmdeploy.compiler.options import default_buckets

    from bench.onnx_corpus import ENTRIES, POSITIONS, make

    exported = export_model(make(ENTRIES[name], tmp_path / "src"), tmp_path / "work")
    assert exported.config == {}
    assert max_positions_of(exported.onnx_path, exported.config) == POSITIONS == 128
    assert default_buckets(max_positions_of(exported.onnx_path, exported.config)) == "1,4x32,64,128"
