"""The bad-input corpus: every case ends in a tvmdeploy error of the right type whose message says
what to do, and never in a signal. Cases that load native code run in a child process, so a crash
would show as a signal instead of killing the test session."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvmdeploy.compiler.errors import ModelLoadError, ToolMissingError
from tvmdeploy.compiler.frontend.export import export_model
from tvmdeploy.runtime import Bundle, BundleError, IncompatibleDeviceError, InputError, load
from tvmdeploy.runtime.bundle import sha256_file
from tvmdeploy.runtime.errors import TvmdeployError

# -- models ---------------------------------------------------------------------------------------


def external_data_model(folder):
    """A one-MatMul ONNX model whose weight lives in an external-data file beside it."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    return path


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "garbage",
        "external data missing",
        "weights missing",
        "unknown task",
        "no model",
    ],
)
def test_bad_models(case, tiny_model_dir, tiny_exported, tmp_path):
    task = None
    if case == "truncated":
        model = tmp_path / "t.onnx"
        model.write_bytes(tiny_exported.onnx_path.read_bytes()[:5000])
        expected = "not a valid ONNX model.*copied whole"
    elif case == "garbage":
        model = tmp_path / "g.onnx"
        model.write_bytes(np.random.default_rng(0).bytes(3000))
        expected = "not a valid ONNX model.*export the model again"
    elif case == "external data missing":
        model = external_data_model(tmp_path)
        (tmp_path / "ext.onnx.data").unlink()
        expected = "external-data file 'ext.onnx.data', which is not beside it; copy that file"
    elif case == "weights missing":
        model = tmp_path / "hf"
        model.mkdir()
        shutil.copy(tiny_model_dir / "config.json", model)
        expected = "could not export this model: .*no file named"
    elif case == "unknown task":
        model, task = tiny_model_dir, "nonsense"
        expected = "only supports the tasks"
    else:
        model = tmp_path / "nothing"
        expected = "no such file or directory"
    with pytest.raises(ModelLoadError, match=expected):
        export_model(model, tmp_path / "out", task=task)


def test_external_data_present_travels_with_the_graph(tmp_path):
    model = external_data_model(tmp_path)
    exported = export_model(model, tmp_path / "out")
    assert (exported.onnx_path.parent / "ext.onnx.data").is_file()
    onnx.checker.check_model(str(exported.onnx_path))


# -- bundles --------------------------------------------------------------------------------------

LOAD = textwrap.dedent("""
    import sys
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.errors import TvmdeployError
    try:
        load(sys.argv[1], artifact=sys.argv[2])
        print("LOADED")
    except TvmdeployError as err:
        print(type(err).__name__ + ": " + str(err))
""")


def load_in_child(bundle_dir, artifact) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_USE_RUNTIME_LIB")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(bundle_dir), artifact],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"signal or crash (rc {done.returncode}): {done.stderr[-1500:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b.tvmd")


def rewrite_manifest(bundle_dir, change) -> None:
    path = bundle_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_library_for_another_architecture_is_refused_not_crashed(bundle_copy, tmp_path):
    """An aarch64 library where the x86 one should be (checksum updated): a clean BundleError."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.fail("aarch64-linux-gnu-gcc is missing; .ci/setup.sh installs it")
    source = tmp_path / "f.c"
    source.write_text("int f(void) { return 1; }\n")
    bundle = Bundle(bundle_copy)
    artifact = bundle.artifacts[0]
    lib = bundle_copy / artifact.file
    lib.unlink()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    rewrite_manifest(bundle_copy, lambda d: d["files"].update({artifact.file: sha256_file(lib)}))
    said = load_in_child(bundle_copy, artifact.profile)
    assert said.startswith("BundleError:") and "could not load this artifact" in said


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "tampered library",
        "format version",
        "not a manifest",
        "artifact for another device",
    ],
)
def test_bad_bundles(case, bundle_copy):
    profile = Bundle(bundle_copy).artifacts[0].profile
    lib = bundle_copy / Bundle(bundle_copy).artifacts[0].file
    if case == "missing file":
        lib.unlink()
        error, expected = BundleError, "is missing; the bundle is incomplete, recompile it"
    elif case == "tampered library":
        lib.write_bytes(lib.read_bytes()[:-100] + b"\0" * 100)
        error, expected = BundleError, "is corrupt .*recompile or re-copy the bundle"
    elif case == "format version":
        rewrite_manifest(bundle_copy, lambda d: d.update(format_version=99))
        error, expected = BundleError, "format version 99.*recompile it or use a matching tvmdeploy"
    elif case == "not a manifest":
        (bundle_copy / "manifest.json").write_text("[1, 2, 3]")
        error, expected = BundleError, "not a tvmdeploy manifest"
    else:
        rewrite_manifest(
            bundle_copy, lambda d: d["artifacts"][0]["requires"].update(arch="riscv64")
        )
        error, expected = (
            IncompatibleDeviceError,
            "cannot run on this device.*it needs arch riscv64",
        )
    with pytest.raises(error, match=expected):
        load(bundle_copy, artifact=profile)
    said = load_in_child(bundle_copy, profile)
    assert said.startswith(error.__name__ + ":")


# -- model inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"input_idz": [[1, 2]]}, "unknown input.*this model takes"),
        ({"attention_mask": [[1, 1]]}, "input_ids is required"),
        ({"input_ids": np.array([[1.0, 2.0]])}, "must hold integers"),
        ({"input_ids": np.array([[np.nan, 1.0]])}, "must hold integers"),
        ({"input_ids": np.array([[np.inf, 1.0]])}, "must hold integers"),
        ({"input_ids": [1, 2, 3]}, "must be 2-D.*add a batch axis"),
        ({"input_ids": np.ones((1, 2, 3), np.int64)}, "must be 2-D"),
        ({"input_ids": np.ones((0, 4), np.int64)}, "empty input"),
        ({"input_ids": np.ones((1, 0), np.int64)}, "empty input"),
        (  # beyond its 32-token buckets the fallback function takes it, up to the model's 128
            {"input_ids": np.ones((1, 129), np.int64)},
            "exceeds this model's limit of 128 tokens; truncate the input",
        ),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, "only 0 and 1"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 1, 1]]}, "must match"),
        ({"input_ids": [[-1, 2]]}, r"must lie in \[0, 30522\)"),
        ({"input_ids": [[30522, 2]]}, r"must lie in \[0, 30522\)"),
    ],
)
def test_bad_model_inputs(model, inputs, expected):
    with pytest.raises(InputError, match=expected):
        model(**inputs)


# -- tools and services ---------------------------------------------------------------------------


def test_missing_cross_compiler_is_named_before_building(tiny_imported, tmp_path, monkeypatch):
    from tvmdeploy import targets
    from tvmdeploy.compiler.build import build_artifact

    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-gcc on this PATH
    with pytest.raises(ToolMissingError, match="aarch64-linux-gnu-gcc.*not on PATH; install it"):
        build_artifact(tiny_imported.mod, targets.get("arm64-neon"), tmp_path / "arm")
    assert not (tmp_path / "arm" / "lib.so").exists()


def test_missing_qemu_is_named_with_the_package_to_install(monkeypatch, tmp_path):
    from tvmdeploy.compiler.emulation import qemu
    from tvmdeploy.compiler.errors import QemuUnavailable

    monkeypatch.setenv("PATH", str(tmp_path))  # neither qemu-aarch64-static nor qemu-aarch64
    with pytest.raises(QemuUnavailable, match="not installed; run `bash .ci/setup.sh` or `apt-get"):
        qemu.find_qemu()


def test_full_disk_while_packaging_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):
    import errno

    from tvmdeploy.compiler import package

    bundle = Bundle(tiny_bundle)
    real_copy = shutil.copyfile

    def disk_full(src, dst, *args, **kwargs):
        if str(dst).endswith("lib.so"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(package.shutil, "copyfile", disk_full)
    a = bundle.artifacts[0]
    entry = package.ArtifactEntry(
        profile=a.profile,
        family="x86",
        target=a.target,
        requires=a.requires,
        lib_path=tiny_bundle / a.file,
        code_form=a.code_form,
        tuning={},
        parity={},
        latency=[],
    )
    weights = bundle.weights_entry("float32")
    out = tmp_path / "full.tvmd"
    with pytest.raises(
        BundleError, match="No space left on device.*nothing was written.*Free disk space"
    ):
        package.write_bundle(
            out,
            tiny_bundle / "model.onnx",
            {"float32": (weights["names"], (tiny_bundle / weights["file"]).read_bytes())},
            [entry],
            bundle.model,
            bundle.manifest["buckets"],
        )
    assert list(tmp_path.iterdir()) == []


def test_every_error_is_a_tvmdeploy_error():
    for error in (
        ModelLoadError,
        ToolMissingError,
        BundleError,
        IncompatibleDeviceError,
        InputError,
    ):
        assert issubclass(error, TvmdeployError)
