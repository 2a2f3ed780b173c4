"""Selection: runnable artifacts only, measured latency wins, else GPU first, most specific ISA."""

import json
import shutil

import pytest
from tvmdeploy import targets
from tvmdeploy.runtime import Bundle, BundleError, load
from tvmdeploy.runtime.probe import CudaDevice, DeviceInfo, probe
from tvmdeploy.runtime.select import ONNXRUNTIME, cached_latencies, select


def device(features, cuda=()):
    return DeviceInfo("x86_64", "test CPU", frozenset(features), 8, tuple(cuda))


@pytest.fixture
def multi_bundle(tiny_bundle, tmp_path):
    """The tiny bundle's manifest listing several profiles (selection reads only the manifest)."""
    path = shutil.copytree(tiny_bundle, tmp_path / "multi.tvmd")
    manifest = json.loads((path / "manifest.json").read_text())
    template = manifest["artifacts"][0]
    manifest["artifacts"] = [
        template | {"profile": p.name, "family": p.family, "requires": p.requires, "latency": []}
        for p in map(
            targets.get, ["x86-64-v3", "x86-64-v4", "x86-avx512-vnni", "cuda-sm80", "arm64-neon"]
        )
    ]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Bundle(path)


V4 = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"]


def test_most_specific_cpu_artifact_without_measurements(multi_bundle):
    choice = select(multi_bundle, device(V4))
    assert choice.artifact == "x86-64-v4"
    assert set(choice.rejected) == {"x86-avx512-vnni", "cuda-sm80", "arm64-neon"}
    assert "avx512_vnni" in choice.rejected["x86-avx512-vnni"]
    assert select(multi_bundle, device(["avx", "avx2", "fma", "f16c"])).artifact == "x86-64-v3"


def test_gpu_before_cpu(multi_bundle):
    choice = select(multi_bundle, device(V4, [CudaDevice(0, "A100", 80)]))
    assert choice.artifact == "cuda-sm80" and "GPU" in choice.reason
    assert select(multi_bundle, device(V4, [CudaDevice(0, "T4", 75)])).artifact == "x86-64-v4"


def test_measured_latency_on_this_fingerprint_wins(multi_bundle):
    here = device(V4)
    manifest = multi_bundle.manifest
    manifest["artifacts"][0]["latency"] = [
        {"fingerprint": here.fingerprint, "batch": 1, "seq": 16, "p50_ms": 1.0}
    ]
    manifest["artifacts"][1]["latency"] = [
        {"fingerprint": here.fingerprint, "batch": 1, "seq": 16, "p50_ms": 3.0}
    ]
    manifest["artifacts"][2]["latency"] = [
        {"fingerprint": "elsewhere", "batch": 1, "seq": 16, "p50_ms": 0.1}
    ]
    (multi_bundle.path / "manifest.json").write_text(json.dumps(manifest))
    bundle = Bundle(multi_bundle.path)
    choice = select(bundle, here)
    assert choice.artifact == "x86-64-v3" and "fastest measured" in choice.reason
    # A measurement taken on another machine does not count here.
    assert select(bundle, device(V4 + ["avx512_vnni"])).artifact == "x86-avx512-vnni"


def test_policy_measure_times_candidates_and_caches_the_winner(tiny_bundle):
    model = load(tiny_bundle, policy="measure")
    bundle = model.bundle
    measured = cached_latencies(bundle, probe())
    profile = bundle.artifacts[0].profile
    assert set(measured) == {profile, ONNXRUNTIME}
    assert all(v > 0 for v in measured.values())
    assert model.choice.artifact == min(measured, key=measured.get)
    assert "fastest measured" in model.choice.reason
    # The next load reuses the cached measurement instead of timing again.
    assert load(tiny_bundle).choice.artifact == model.choice.artifact


def test_forcing_an_artifact(tiny_bundle):
    profile = Bundle(tiny_bundle).artifacts[0].profile
    model = load(tiny_bundle, artifact=profile)
    assert model.choice.artifact == profile and model.choice.reason == "forced by the caller"
    with pytest.raises(BundleError, match="no artifact for profile 'arm64-sve'"):
        load(tiny_bundle, artifact="arm64-sve")
    with pytest.raises(ValueError, match="policy"):
        load(tiny_bundle, policy="fastest")
