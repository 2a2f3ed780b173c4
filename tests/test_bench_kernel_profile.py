"""bench/kernel_profile.py: per-kernel times of a real bundle and of ONNX Runtime on its graph,
grouped by kind of kernel, consistent with the model's architecture and with each call's time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import kernel_profile

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2  # conftest.save_tiny_bert


def test_layer_indices_are_grouped():
    assert (
        kernel_profile.kernel_group("/bert/encoder/layer.11/attention/self/query/MatMul")
        == "/bert/encoder/layer.*/attention/self/query/MatMul"
    )
    assert kernel_profile.kernel_group("/distilbert/transformer/layer.0/ffn/lin1/MatMul").count(
        "layer.*"
    )
    assert kernel_profile.kernel_group("BiasGelu_token_17") == "BiasGelu"
    assert kernel_profile.kernel_group("fused_matmul_packed1_add4") == "fused_matmul_packed1_add4"


def test_tvmdeploy_kernels_follow_the_architecture(tiny_bundle):
    report = kernel_profile.profile_tvmdeploy(tiny_bundle, 1, 16, repeat=3)
    kernels = report["kernels"]
    total = sum(r["ms"] for r in kernels)
    assert 0 < total <= report["wall_ms"]
    # Six weight matmuls per layer (Q, K, V, attention output, FFN up and down), plus the pooler
    # and the classifier; one fused attention kernel per layer.
    matmuls = sum(r["calls"] for r in kernels if "matmul" in r["kernel"])
    assert matmuls == 6 * LAYERS + 2, kernels
    assert sum(r["calls"] for r in kernels if r["kernel"].startswith("attention")) == LAYERS
    assert [r["ms"] for r in kernels] == sorted((r["ms"] for r in kernels), reverse=True)


def test_the_profile_runs_the_compiled_kernels_where_ort_was_measured_faster(
    tiny_bundle, tmp_path, monkeypatch
):
    """A latency cache that ranks ONNX Runtime first (as an earlier `tvmdeploy bench` of the
    same bundle may leave it) makes `load(precision="fp32")` take ORT; the kernel profile still
    profiles the compiled fp32 artifact."""
    from tvmdeploy.runtime import Bundle, probe, select

    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path))
    bundle = Bundle(tiny_bundle)
    fp32 = [a.name for a in bundle.artifacts if a.precision == "float32"]
    select.remember_latencies(bundle, probe(), {"onnxruntime": 0.01, **dict.fromkeys(fp32, 9.0)})
    report = kernel_profile.profile_tvmdeploy(tiny_bundle, 1, 16, repeat=1)
    assert sum(r["calls"] for r in report["kernels"] if "matmul" in r["kernel"]) > 0


def test_onnxruntime_nodes_are_summed_over_layers(tiny_bundle):
    report = kernel_profile.profile_onnxruntime(tiny_bundle, 1, 16, repeat=3, threads=1)
    rows = {r["kernel"]: r for r in report["kernels"]}
    query = [k for k in rows if k.startswith("MatMul") and "layer.*" in k and "query" in k]
    assert len(query) == 1 and rows[query[0]]["calls"] == LAYERS, sorted(rows)
    assert 0 < sum(r["ms"] for r in report["kernels"]) <= report["wall_ms"]


def test_command_writes_both_profiles(tiny_bundle, tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_profile.py"), str(tiny_bundle)]
        + ["--shape", "2x32", "--repeat", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["shape"] == "2x32"
    assert [p["engine"].split()[0] for p in report["profiles"]] == ["tvmdeploy", "onnxruntime"]
    assert "| kernel | calls | ms | share |" in done.stdout
    missing = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_profile.py"), str(tiny_bundle)]
        + ["--shape", "4x64", "--no-ort"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert missing.returncode != 0 and "no 4x64 bucket" in missing.stderr
