"""ARM artifacts verified for real: cross-compiled, then run in an aarch64 Python under qemu-user.

The arm64 Python sysroot lives in the user's cache (prepared by `.ci/setup.sh`, or here on first
use, ~1-2 min); it is shared with the tool rather than rebuilt per test session. When it cannot be
prepared these tests fail with the reason: CI must verify an ARM artifact under QEMU on every run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tvmdeploy import targets
from tvmdeploy.compiler.emulation import qemu

pytestmark = pytest.mark.qemu

# Resolved at import, before conftest points TVMDEPLOY_CACHE_DIR at a per-session temp dir.
USER_SYSROOT = qemu.sysroot_base()


@pytest.fixture(scope="module")
def arm_python() -> qemu.ArmPython:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMDEPLOY_ARM64_SYSROOT", str(USER_SYSROOT))
        return qemu.ensure_arm64_python()  # raises QemuUnavailable with what to do: no silent skip


@pytest.fixture(autouse=True)
def _user_sysroot(monkeypatch, arm_python):
    monkeypatch.setenv("TVMDEPLOY_ARM64_SYSROOT", str(USER_SYSROOT))


@pytest.fixture(scope="module")
def arm_bundle(tiny_exported, tmp_path_factory) -> Path:
    """The session's tiny BERT export (its config beside it) compiled for host and NEON."""
    from tvmdeploy.compiler import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("arm") / "tiny-arm.tvmd"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMDEPLOY_ARM64_SYSROOT", str(USER_SYSROOT))
        return compile_model(
            CompileOptions(
                model=str(tiny_exported.onnx_path),
                output=str(out),
                profiles=["host", "arm64-neon"],
                buckets="1,2x16,32",
            )
        )


@pytest.fixture(scope="module")
def sve_build(tiny_exported, tiny_imported, tmp_path_factory):
    """The session's tiny BERT export and import (buckets 1,2x16,32), with its reference
    cases, built for arm64-sve."""
    from tvmdeploy.compiler import build, verify

    work = tmp_path_factory.mktemp("sve")
    cases = verify.reference_cases(tiny_exported.onnx_path, tiny_imported, tiny_exported.config)
    built = build.build_artifact(tiny_imported.mod, targets.get("arm64-sve"), work / "arm64-sve")
    return built, tiny_imported, cases


def test_bundle_with_host_and_neon_artifacts_verified_under_qemu(arm_bundle):
    manifest = json.loads((arm_bundle / "manifest.json").read_text())
    by_profile = {a["profile"]: a for a in manifest["artifacts"]}
    assert len(by_profile) == 2 and "arm64-neon" in by_profile
    # Weights once, shared by both artifacts; the artifact folders hold code only.
    assert list(manifest["weights"]) == ["float32"]
    assert sorted(p.name for p in (arm_bundle / "weights").iterdir()) == ["float32.params"]
    for profile in by_profile:
        assert sorted(p.name for p in (arm_bundle / "artifacts" / profile).iterdir()) == ["lib.so"]
    parity = by_profile["arm64-neon"]["parity"]
    assert parity["where"] == "qemu:cortex-a72", parity
    assert parity["ok"] is True, parity
    assert parity["max_abs_diff"] < 1e-4
    assert by_profile["arm64-neon"]["latency"] == []  # emulated time says nothing about a device
    host = next(a for p, a in by_profile.items() if p != "arm64-neon")
    assert host["parity"]["where"] == "native" and host["parity"]["ok"] is True


def test_arm_library_is_aarch64_code(arm_bundle):
    neon = arm_bundle / "artifacts" / "arm64-neon" / "lib.so"
    host = next(p for p in (arm_bundle / "artifacts").glob("*/lib.so") if p != neon)
    assert qemu.elf_machine(neon) == qemu.EM_AARCH64
    assert qemu.elf_machine(host) == 62  # x86-64: the host artifact is not a cross build


def test_sve_library_contains_sve_instructions(sve_build):
    built, _, _ = sve_build
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, (
        "aarch64-linux-gnu-objdump missing: run `bash .ci/setup.sh` (gcc-aarch64-linux-gnu)"
    )
    listing = subprocess.run(
        [objdump, "-d", str(built.lib_path)], capture_output=True, text=True, check=True
    ).stdout
    sve = re.findall(r"\bz\d+\.[bhsdq]\b", listing)  # operands in SVE's z registers
    # Without SVE code the SIGILL test below could not fail; LLVM emits it for +sve (index vectors).
    assert len(sve) > 10, "the arm64-sve build has no SVE instructions"


def test_sve_artifact_fails_clearly_on_a_cpu_without_sve(sve_build):
    from tvmdeploy.compiler import verify

    built, imported, cases = sve_build
    record, latency = verify.verify(built, imported, cases, qemu_cpu="cortex-a72")
    assert record.ok is False and record.where == "qemu:cortex-a72"
    assert record.max_abs_diff is None and latency == []
    assert "illegal instruction" in record.detail and "SIGILL" in record.detail
    assert "illegal instruction" in record.summary()
    json.dumps(record.to_dict())  # a manifest can record it


def test_sve_artifact_passes_on_its_own_qemu_cpu(sve_build):
    from tvmdeploy.compiler import verify

    built, imported, cases = sve_build
    record, _ = verify.verify(built, imported, cases)
    assert record.where == f"qemu:{targets.get('arm64-sve').qemu_cpu}"
    assert record.ok is True, record.detail
    assert record.max_abs_diff < 1e-4


def test_without_sysroot_arm_stays_not_run_and_says_how(sve_build, tmp_path, monkeypatch):
    from tvmdeploy.compiler import verify

    built, imported, cases = sve_build
    monkeypatch.setenv("TVMDEPLOY_ARM64_SYSROOT", str(tmp_path / "empty"))
    record, _ = verify.verify(built, imported, cases)
    assert record.ok is None and record.where == "not-run"
    assert "python -m tvmdeploy.compiler.emulation.qemu --prepare" in record.detail


@pytest.mark.parametrize(
    "profile_name,instruction", [("arm64-dotprod", "sdot"), ("arm64-neon", "smull")]
)
def test_arm_int8_runs_under_qemu_with_its_instructions(
    sve_build, profile_name, instruction, tmp_path
):
    from tvmdeploy.compiler import build, verify
    from tvmdeploy.compiler.kernels.cpu_int8 import kernel_for
    from tvmdeploy.compiler.quantize import quantize_int8

    _, imported, cases = sve_build
    profile = targets.get(profile_name)
    mod, _ = quantize_int8(imported.mod, kernel_for(profile))
    built = build.build_artifact(mod, profile, tmp_path, precision="int8")
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "aarch64-linux-gnu-objdump missing: run `bash .ci/setup.sh`"
    listing = subprocess.run(
        [objdump, "-d", str(built.lib_path)], capture_output=True, text=True, check=True
    ).stdout
    assert len(re.findall(rf"\b{instruction}\b", listing)) > 10
    record, latency = verify.verify(built, imported, cases)
    assert record.where == f"qemu:{profile.qemu_cpu}" and latency == []
    assert record.ok is True, record.detail
    assert 0 < record.max_abs_diff < record.tolerance["atol"]
    if instruction == "sdot":  # a core without the dot-product extension cannot run it
        failed, _ = verify.verify(built, imported, cases, qemu_cpu="cortex-a72")
        assert failed.ok is False and "SIGILL" in failed.detail
    json.dumps(record.to_dict())
