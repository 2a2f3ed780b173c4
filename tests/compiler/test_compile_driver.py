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
