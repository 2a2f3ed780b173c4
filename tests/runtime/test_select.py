"""Selection: runnable artifacts only, measured latency wins, else GPU first, most specific ISA."""

import json
import shutil

import pytest
from tvmdeploy import targets
from tvmdeploy.runtime import Bundle, BundleError, load
from tvmdeploy.runtime.errors import IncompatibleDeviceError, OptionError
from tvmdeploy.runtime.precision import short
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
        template
        | {
            "name": p.name,
            "profile": p.name,
            "family": p.family,
            "requires": p.requires,
            "latency": [],
        }
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
    with pytest.raises(BundleError, match="no artifact 'arm64-sve'"):
        load(tiny_bundle, artifact="arm64-sve")
    with pytest.raises(ValueError, match="policy"):
        load(tiny_bundle, policy="fastest")


V3 = ["avx", "avx2", "fma", "f16c"]


def bundle_of(tiny_bundle, path, artifacts):
    """A copy of the tiny bundle whose manifest lists `artifacts` as (profile, precision, accuracy
    or None), each requiring what its profile and precision need. Selection reads only the
    manifest."""
    path = shutil.copytree(tiny_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    template = manifest["artifacts"][0]
    entries = []
    for profile, precision, accuracy in artifacts:
        p = targets.get(profile).for_precision(short(precision))
        entry = template | {"profile": profile, "requires": p.requires, "latency": []}
        entry |= {"precision": precision, "weights": "float32"}
        entry.pop("name", None)  # named from profile and precision, as packaging names it
        if accuracy is not None:
            entry["accuracy"] = {"metric": "accuracy", "value": accuracy, "fp32": 86.0}
        entries.append(entry)
    manifest["artifacts"] = entries
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Bundle(path)


def precision_bundle(tiny_bundle, tmp_path, int8_accuracy):
    """fp32 and int8 artifacts for x86-64-v3, int8 for x86-avx512-vnni; the int8 ones carry
    `int8_accuracy` (None: not measured)."""
    return bundle_of(
        tiny_bundle,
        tmp_path / "precisions.tvmd",
        [
            ("x86-64-v3", "float32", None),
            ("x86-64-v3", "int8", int8_accuracy),
            ("x86-avx512-vnni", "int8", int8_accuracy),
        ],
    )


def test_int8_vnni_artifact_is_refused_on_a_cpu_without_vnni(tiny_bundle, tmp_path):
    bundle = precision_bundle(tiny_bundle, tmp_path, int8_accuracy=85.5)
    assert [a.name for a in bundle.artifacts] == [
        "x86-64-v3",
        "x86-64-v3-int8",
        "x86-avx512-vnni-int8",
    ]
    choice = select(bundle, device(V4))  # AVX-512 without VNNI
    assert "avx512_vnni" in choice.rejected["x86-avx512-vnni-int8"]
    assert choice.artifact == "x86-64-v3-int8"
    assert "85.50 vs fp32 86.00" in choice.reason
    with pytest.raises(IncompatibleDeviceError, match="avx512_vnni"):
        select(bundle, device(V4), artifact="x86-avx512-vnni-int8")
    assert select(bundle, device(V4 + ["avx512_vnni"])).artifact == "x86-avx512-vnni-int8"


def test_auto_takes_int8_only_within_the_accuracy_gate(tiny_bundle, tmp_path):
    within = precision_bundle(tiny_bundle, tmp_path / "a", int8_accuracy=85.2)
    assert within.accuracy_gate == 1.0
    assert select(within, device(V3)).artifact == "x86-64-v3-int8"
    beyond = precision_bundle(tiny_bundle, tmp_path / "b", int8_accuracy=84.5)
    choice = select(beyond, device(V3))
    assert choice.artifact == "x86-64-v3"
    assert "1.50 points lost, gate 1" in choice.rejected["x86-64-v3-int8"]
    unmeasured = precision_bundle(tiny_bundle, tmp_path / "c", int8_accuracy=None)
    choice = select(unmeasured, device(V3))
    assert choice.artifact == "x86-64-v3"
    assert "no accuracy measured" in choice.rejected["x86-64-v3-int8"]
    # A wider gate written in the bundle lets the 1.5-point loss through.
    manifest = json.loads((beyond.path / "manifest.json").read_text())
    manifest["accuracy_gate"] = 2.0
    (beyond.path / "manifest.json").write_text(json.dumps(manifest))
    assert select(Bundle(beyond.path), device(V3)).artifact == "x86-64-v3-int8"


def test_a_generation_gate_verdict_decides_auto(tiny_bundle, tmp_path):
    """A generation bundle's int8 record carries its own verdict (greedy agreement and
    perplexity against fp32, compiler/decoder/quality.py): `auto` follows it, whatever the
    points lost."""
    for ok, expected in ((True, "x86-64-v3-int8"), (False, "x86-64-v3")):
        bundle = precision_bundle(tiny_bundle, tmp_path / str(ok), int8_accuracy=None)
        manifest = json.loads((bundle.path / "manifest.json").read_text())
        record = {"metric": "greedy agreement (%)", "value": 90.6, "fp32": 100.0, "ok": ok}
        for entry in manifest["artifacts"]:
            if entry["precision"] == "int8":
                entry["accuracy"] = record | {"threshold": {"min_agreement": 0.75}}
        (bundle.path / "manifest.json").write_text(json.dumps(manifest))
        choice = select(Bundle(bundle.path), device(V3))
        assert choice.artifact == expected
        if not ok:
            assert "outside its gate" in choice.rejected["x86-64-v3-int8"]


def test_an_explicit_precision_is_honoured_or_refused(tiny_bundle, tmp_path):
    bundle = precision_bundle(tiny_bundle, tmp_path, int8_accuracy=None)
    assert select(bundle, device(V3), precision="int8").artifact == "x86-64-v3-int8"
    assert select(bundle, device(V3), precision="fp32").artifact == "x86-64-v3"
    with pytest.raises(IncompatibleDeviceError, match="no bf16 artifact"):
        select(bundle, device(V3), precision="bf16")
    with pytest.raises(IncompatibleDeviceError, match="no int4 artifact"):
        select(bundle, device(V3), precision="int4")
    with pytest.raises(OptionError, match="unknown precision 'int2'"):
        select(bundle, device(V3), precision="int2")


def test_unmeasured_int8_ranks_before_int4_and_a_measured_latency_still_wins(tiny_bundle, tmp_path):
    # On AVX2 the int4 GEMV decoded slower than int8's (docs/benchmarks.md): without a latency
    # measured here, int8 goes first; int4 is taken where it alone passes or was measured faster.
    both = [("x86-64-v3", p, 86.0) for p in ("float32", "int4", "int8")]
    bundle = bundle_of(tiny_bundle, tmp_path / "both.tvmd", both)
    assert select(bundle, device(V3)).artifact == "x86-64-v3-int8"
    only_int4 = bundle_of(tiny_bundle, tmp_path / "int4.tvmd", both[:2])
    assert select(only_int4, device(V3)).artifact == "x86-64-v3-int4"
    here = device(V3)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    for entry, ms in zip(manifest["artifacts"], (9.0, 1.0, 2.0), strict=True):
        entry["latency"] = [{"fingerprint": here.fingerprint, "batch": 1, "seq": 16, "p50_ms": ms}]
    (bundle.path / "manifest.json").write_text(json.dumps(manifest))
    assert select(Bundle(bundle.path), here).artifact == "x86-64-v3-int4"


def test_bf16_artifact_is_refused_on_an_avx512_cpu_without_bf16(tiny_bundle, tmp_path):
    bundle = bundle_of(
        tiny_bundle,
        tmp_path / "bf16.tvmd",
        [("x86-64-v4", "float32", 86.0), ("x86-64-v4", "bfloat16", 86.0)],
    )
    choice = select(bundle, device(V4))
    assert choice.artifact == "x86-64-v4"
    assert "avx512_bf16" in choice.rejected["x86-64-v4-bf16"]
    assert select(bundle, device(V4 + ["avx512_bf16"])).artifact == "x86-64-v4-bf16"
    with pytest.raises(IncompatibleDeviceError, match="avx512_bf16"):
        select(bundle, device(V4), precision="bf16")


def test_auto_skips_vdpbf16ps_where_the_profile_says_it_loses_to_fp32(tiny_bundle, tmp_path):
    """Cooper Lake (Intel, AVX512-BF16, no AMX): the profile's rule holds the vdpbf16ps artifact
    back on `auto`; Zen 4 takes it; asked for by name it still runs."""
    bundle = bundle_of(
        tiny_bundle,
        tmp_path / "bf16.tvmd",
        [("x86-avx512-vnni", "float32", None), ("x86-avx512-vnni", "bfloat16", 85.9)],
    )
    features = targets.get("x86-avx512-vnni").requires["cpu_features"] + ["avx512_bf16"]

    def cpu(vendor):
        return DeviceInfo("x86_64", "simulated", frozenset(features), 8, (), vendor=vendor)

    intel = select(bundle, cpu("GenuineIntel"))
    assert intel.artifact == "x86-avx512-vnni"
    assert "vdpbf16ps loses to the fp32 FMA on Intel" in intel.rejected["x86-avx512-vnni-bf16"]
    assert select(bundle, cpu("AuthenticAMD")).artifact == "x86-avx512-vnni-bf16"
    forced = select(bundle, cpu("GenuineIntel"), precision="bf16")
    assert forced.artifact == "x86-avx512-vnni-bf16"
