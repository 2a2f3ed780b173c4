"""Verify stage: an artifact against ONNX Runtime, with a verdict that can fail and says where."""

from pathlib import Path

import numpy as np
import pytest
from tvmdeploy import targets
from tvmdeploy.compiler import verify
from tvmdeploy.compiler.build import BuildResult, build_artifact
from tvmdeploy.runtime.parity import ATOL, RTOL, compare, compare_cases
from tvmdeploy.runtime.probe import probe
from tvmdeploy.targets.resolve import host_profile


@pytest.fixture(scope="module")
def host_build(tiny_imported, tmp_path_factory):
    return build_artifact(
        tiny_imported.mod, host_profile(), tmp_path_factory.mktemp("verify") / "host"
    )


@pytest.fixture(scope="module")
def cases(tiny_exported, tiny_imported):
    return verify.reference_cases(tiny_exported.onnx_path, tiny_imported, tiny_exported.config)


def test_native_artifact_matches_onnx_runtime(host_build, tiny_imported, cases):
    record, latencies = verify.verify(host_build, tiny_imported, cases, timing_runs=3)
    assert record.ok is True and record.where == "native"
    assert 0 <= record.max_abs_diff < ATOL
    assert record.tolerance == {"atol": ATOL, "rtol": RTOL}
    assert {(e["batch"], e["seq"]) for e in latencies} == {
        (b.batch, b.seq) for b in tiny_imported.buckets
    }
    assert all(e["p50_ms"] > 0 and e["fingerprint"] == probe().fingerprint for e in latencies)


def test_a_wrong_reference_fails_and_names_the_bucket(host_build, tiny_imported, cases):
    bucket, arrays, expected = cases[-1]
    shifted = [*cases[:-1], (bucket, arrays, [e + 1.0 for e in expected])]
    record, _ = verify.verify(host_build, tiny_imported, shifted, timing_runs=0)
    assert record.ok is False
    assert record.max_abs_diff == pytest.approx(1.0, abs=1e-3)
    assert record.detail.startswith(bucket.function) and "outside tolerance" in record.detail


@pytest.mark.skipif(
    bool(probe().cuda), reason="this machine has a GPU: the CUDA path runs in the gpu tests"
)
def test_cuda_artifact_without_a_gpu_is_not_run_with_the_reason(tiny_imported, cases):
    profile = targets.get("cuda-sm80")
    build = BuildResult(profile, Path("never-opened.so"), dict(profile.target), "cuda-fatbin", 0.0)
    record, latencies = verify.verify(build, tiny_imported, cases)
    assert record.ok is None and record.where == "not-run" and latencies == []
    assert "no CUDA device" in record.detail and "8.0" in record.detail


def test_compare_counts_nan_and_shape_as_failures():
    want = [np.zeros((2, 3), np.float32)]
    assert compare([np.full((2, 3), 5e-5, np.float32)], want)[1] is True
    nan = np.zeros((2, 3), np.float32)
    nan[0, 1] = np.nan
    assert compare([nan], want)[1] is False
    diff, ok, detail = compare([np.zeros((3, 2), np.float32)], want)
    assert not ok and diff == float("inf") and "shape" in detail
    merged = compare_cases(
        [("a", want, want), ("b", [want[0] + 1], want), ("c", [want[0] + 2], want)]
    )
    assert not merged.ok and merged.max_abs_diff == 2.0 and merged.detail.startswith("b:")
