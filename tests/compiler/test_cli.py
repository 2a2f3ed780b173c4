"""The CLI: every command explains itself, scripts get JSON, errors exit non-zero with a message."""

import json

import pytest
from tvmdeploy import targets
from tvmdeploy.compiler.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "command", [c.name or c.callback.__name__ for c in app.registered_commands]
)
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output.splitlines()) > 4


def test_top_level_help_lists_commands():
    result = invoke("--help")
    for command in ("compile", "bench", "inspect", "targets", "demo"):
        assert command in result.output


def test_targets_json_lists_every_profile():
    rows = json.loads(invoke("targets", "--json").output)
    assert [r["name"] for r in rows] == targets.names()
    assert any(r["runs_here"] for r in rows) and not all(r["runs_here"] for r in rows)


def test_inspect_json_is_the_manifest(tiny_bundle):
    shown = json.loads(invoke("inspect", str(tiny_bundle), "--json").output)
    assert shown == json.loads((tiny_bundle / "manifest.json").read_text())
    text = invoke("inspect", str(tiny_bundle), "--check").output
    assert "checksums: all" in text and "native" in text


def test_bench_writes_versioned_json(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(
        "bench",
        str(tiny_bundle),
        "--compare",
        "onnxruntime",
        "--batch",
        "1,2",
        "--seq",
        "16",
        "--warmup",
        "1",
        "--runs",
        "5",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "tvmdeploy.bench" and report["schema_version"] == 1
    assert report["device"]["fingerprint"]
    rows = report["results"]
    assert {(r["engine"], r["batch"]) for r in rows} == {
        (e, b) for e in ("tvmdeploy", "onnxruntime") for b in (1, 2)
    }
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["runs"] == 5 and r["throughput_per_s"] == pytest.approx(
            r["batch"] * 1e3 / r["mean_ms"]
        )
        assert r["parity"]["max_abs_diff"] < 1e-4


def test_errors_exit_non_zero_with_message(tmp_path):
    result = runner.invoke(
        app, ["compile", str(tmp_path / "missing"), "-o", str(tmp_path / "x.tvmd")]
    )
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json is missing" in result.output
    result = runner.invoke(
        app, ["compile", str(tmp_path), "-o", str(tmp_path / "x.tvmd"), "-t", "x86-64-v9"]
    )
    assert result.exit_code == 2 and "unknown target profile" in result.output
    assert not (tmp_path / "x.tvmd").exists()
