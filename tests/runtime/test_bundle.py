"""Bundle reading: layout per DESIGN.md, checksums enforced, corrupt bundles refused cleanly."""

import json
import shutil

import pytest
from tvmdeploy.runtime import Bundle, BundleError, IncompatibleDeviceError, load
from tvmdeploy.runtime.bundle import sha256_file


def test_layout_and_manifest(tiny_bundle):
    b = Bundle(tiny_bundle)
    m = b.manifest
    assert (tiny_bundle / "model.onnx").is_file()
    assert (tiny_bundle / "weights" / "float32.params").is_file()
    assert (tiny_bundle / "tokenizer" / "tokenizer.json").is_file()
    (artifact,) = b.artifacts
    assert (tiny_bundle / artifact.file).is_file() and artifact.file.startswith("artifacts/")
    assert artifact.sha256 == sha256_file(tiny_bundle / artifact.file)
    assert artifact.parity["where"] == "native" and artifact.parity["ok"] is True
    assert artifact.parity["max_abs_diff"] < 1e-4
    assert artifact.latency and all(e["fingerprint"] for e in artifact.latency)
    assert {f"b{b_}_s{s}" for b_ in (1, 2) for s in (16, 32)} == {x.function for x in b.buckets}
    assert m["tools"]["apache-tvm"].startswith("0.27")
    assert m["export_parity"]["reference"] == "pytorch"
    for rel, digest in m["files"].items():
        assert sha256_file(tiny_bundle / rel) == digest
    # Weights live once, outside the code: the library is far smaller than the weights.
    assert (tiny_bundle / artifact.file).stat().st_size < (
        tiny_bundle / "weights/float32.params"
    ).stat().st_size


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy.tvmd")


def test_corrupt_library_refused_before_loading(bundle_copy):
    lib = next((bundle_copy / "artifacts").glob("*/lib.so"))
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        load(bundle_copy)


def test_truncated_weights_refused(bundle_copy):
    weights = bundle_copy / "weights" / "float32.params"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="float32.params is corrupt"):
        load(bundle_copy)


def test_missing_file_refused(bundle_copy):
    (bundle_copy / "weights" / "float32.params").unlink()
    with pytest.raises(BundleError, match="missing"):
        load(bundle_copy)


def test_bad_manifests(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        load(tmp_path / "nothing.tvmd")
    manifest = bundle_copy / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="unreadable manifest"):
        load(bundle_copy)
    data = json.loads(text)
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format version 99"):
        load(bundle_copy)


def test_artifact_the_device_cannot_run_is_never_loaded(bundle_copy):
    """An artifact needing a CPU feature this machine lacks is refused, naming the feature."""
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    artifact = data["artifacts"][0]
    artifact["requires"]["cpu_features"] = artifact["requires"]["cpu_features"] + ["imaginary_isa"]
    # Make its library unloadable too: were it loaded, this would fail with a different error.
    lib = bundle_copy / artifact["file"]
    lib.write_bytes(b"not a shared library")
    data["files"][artifact["file"]] = artifact["sha256"] = sha256_file(lib)
    manifest.write_text(json.dumps(data))
    with pytest.raises(IncompatibleDeviceError, match="imaginary_isa"):
        load(bundle_copy, artifact=artifact["profile"])
    # Without a forced artifact the runtime falls back to ONNX Runtime and says why.
    model = load(bundle_copy)
    assert model.choice.artifact == "onnxruntime"
    assert artifact["profile"] in model.choice.rejected


def _rewrite_manifest(bundle_dir, edit) -> None:
    manifest = bundle_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["artifact file", "files map", "weights file", "tuning database"])
@pytest.mark.parametrize(
    "bad_path", ["../outside/lib.so", "/etc/passwd", "artifacts/../../x", "link/lib.so", ""]
)
def test_manifest_paths_must_stay_inside_the_bundle(where, bad_path, bundle_copy, tmp_path):
    """Every path the manifest names is checked when it is read, before any file is opened."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "lib.so").write_bytes(b"x")
    (bundle_copy / "link").symlink_to(tmp_path / "outside")

    def edit(data):
        if where == "artifact file":
            data["artifacts"][0]["file"] = bad_path
        elif where == "files map":
            data["files"][bad_path] = "0" * 64
        elif where == "weights file":
            data["weights"]["float32"]["file"] = bad_path
        else:
            data["artifacts"][0]["tuning"]["database"] = bad_path

    _rewrite_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="not a path inside the bundle.*unsafe"):
        Bundle(bundle_copy)
    with pytest.raises(BundleError, match="unsafe"):
        load(bundle_copy)


def test_a_file_symlinked_out_of_the_bundle_is_refused_though_its_checksum_matches(bundle_copy):
    """A listed file replaced by a symlink to an identical copy outside: refused by path, at
    `Bundle(...)`; a symlink that stays inside the bundle is fine."""
    weights = bundle_copy / "weights" / "float32.params"
    outside = bundle_copy.parent / "float32.params"
    shutil.copyfile(weights, outside)
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(BundleError, match="'weights/float32.params'.*unsafe, rebuild"):
        Bundle(bundle_copy)
    weights.unlink()
    shutil.copyfile(outside, bundle_copy / "weights" / "real.params")
    weights.symlink_to("real.params")
    Bundle(bundle_copy).verify()


def test_a_manifest_symlinked_out_of_the_bundle_is_refused(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    outside = bundle_copy.parent / "manifest.json"
    shutil.copyfile(manifest, outside)
    manifest.unlink()
    manifest.symlink_to(outside)
    with pytest.raises(BundleError, match="leads out of the bundle.*unsafe"):
        Bundle(bundle_copy)
