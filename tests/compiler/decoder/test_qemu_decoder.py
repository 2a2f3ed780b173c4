"""The generation gate on an arm64 artifact: the tiny Llama cross-compiled for arm64-neon, run in
the aarch64 Python under qemu-user (qemu_decoder_worker.py) against transformers, with the same
prompts and rules as natively; against another model's reference it refuses the compile.

Like tests/compiler/emulation/test_qemu.py, these fail with the reason (QemuUnavailable) when the
arm64 sysroot cannot be prepared, rather than skipping: the ARM gate must run in CI.
"""

from __future__ import annotations

import json

import pytest
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.decoder import parity
from tvmdeploy.compiler.emulation import qemu
from tvmdeploy.compiler.errors import ParityError

from tests.conftest import save_tiny_llm

pytestmark = pytest.mark.qemu

# Resolved at import, before conftest points TVMDEPLOY_CACHE_DIR at a per-session temp dir.
USER_SYSROOT = qemu.sysroot_base()


@pytest.fixture(autouse=True)
def _user_sysroot(monkeypatch):
    monkeypatch.setenv("TVMDEPLOY_ARM64_SYSROOT", str(USER_SYSROOT))
    qemu.ensure_arm64_python()  # raises QemuUnavailable with what to do: no silent skip


def test_the_arm64_artifact_is_gated_under_qemu(tiny_llm_dir, tmp_path):
    out = compile_model(
        CompileOptions(
            model=str(tiny_llm_dir),
            output=str(tmp_path / "arm.tvmd"),
            profiles=["host", "arm64-neon"],
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    by_profile = {a["profile"]: a["parity"] for a in manifest["artifacts"]}
    arm = by_profile.pop("arm64-neon")
    ((host,),) = [list(by_profile.values())]
    assert host["where"] == "native" and host["ok"] is True
    assert arm["where"] == "qemu:cortex-a72" and arm["ok"] is True, arm
    assert arm["max_abs_diff"] <= arm["tolerance"]["logits_atol"]
    greedy = arm["greedy"]
    assert greedy["compared"] == parity.GREEDY_TOKENS * len(parity.PROMPTS)
    assert greedy["agreed"] == greedy["compared"]
    (arm_entry,) = [a for a in manifest["artifacts"] if a["profile"] == "arm64-neon"]
    against_ort = arm_entry["parity_onnxruntime"]  # the same run, against the export on ORT
    assert against_ort["where"] == "qemu:cortex-a72" and against_ort["ok"] is True, against_ort


def test_a_failed_arm64_gate_writes_no_bundle(tiny_llm_dir, tmp_path, monkeypatch):
    """Against another model's reference (other weights), the emulated gate refuses."""
    other_dir = save_tiny_llm(tmp_path / "other", seed=5)
    real = parity.reference_cases
    monkeypatch.setattr(parity, "reference_cases", lambda _dir, prompts: real(other_dir, prompts))
    out = tmp_path / "refused.tvmd"
    with pytest.raises(ParityError, match=r"failed \(qemu:cortex-a72\)"):
        compile_model(
            CompileOptions(
                model=str(tiny_llm_dir), output=str(out), profiles=["arm64-neon"], onnx=False
            )
        )
    assert not out.exists()
    assert not list(tmp_path.glob(".refused.tvmd*"))
