"""The AMX tile permission: the real syscall here (refused: this CPU has no AMX), and the
kernel's answers simulated at the syscall (granted, EPERM, EINVAL, EOPNOTSUPP), through the probe
and selection: a refusal makes AMX artifacts unselectable, with the reason, never a signal."""

import ctypes
import errno
import json
import shutil

import pytest
from tvmdeploy import targets
from tvmdeploy.runtime import Bundle, amx_permission
from tvmdeploy.runtime.amx_permission import (
    ARCH_GET_XCOMP_PERM,
    ARCH_REQ_XCOMP_PERM,
    GRANTED,
    XFEATURE_XTILEDATA,
    request_tile_permission,
)
from tvmdeploy.runtime.probe import DeviceInfo, missing_requirements, probe
from tvmdeploy.runtime.select import select

AMX = targets.get("x86-amx")
SPR_FLAGS = AMX.requires["cpu_features"]


def kernel(req_result: int, mask: int = 1 << XFEATURE_XTILEDATA):
    """A stand-in for the arch_prctl syscall: REQ answers `req_result`, GET writes `mask`."""
    calls = []

    def fake(code: int, arg: int) -> int:
        calls.append(code)
        if code == ARCH_REQ_XCOMP_PERM:
            assert arg == XFEATURE_XTILEDATA
            return req_result
        assert code == ARCH_GET_XCOMP_PERM
        ctypes.c_uint64.from_address(arg).value = mask
        return 0

    return fake, calls


@pytest.mark.skipif("amx_tile" in probe().cpu_features, reason="this CPU has AMX")
def test_the_real_syscall_is_refused_here_with_the_reason():
    permission = request_tile_permission()
    assert permission.granted is False
    assert "ARCH_REQ_XCOMP_PERM: EOPNOTSUPP: this CPU has no AMX" in permission.detail
    assert probe().tile_permission == ""  # no amx flag: never asked, nothing to report


def test_granted_when_the_kernel_grants_and_reports_the_bit(monkeypatch):
    fake, calls = kernel(0)
    monkeypatch.setattr(amx_permission, "arch_prctl", fake)
    permission = request_tile_permission()
    assert permission.granted and permission.detail == GRANTED
    assert calls == [ARCH_REQ_XCOMP_PERM, ARCH_GET_XCOMP_PERM]


@pytest.mark.parametrize(
    ("result", "mask", "words"),
    [
        (-errno.EPERM, 0, "EPERM: a seccomp"),
        (-errno.EINVAL, 0, "EINVAL: the kernel predates 5.16"),
        (-errno.EOPNOTSUPP, 0, "EOPNOTSUPP: this CPU has no AMX"),
        (0, 0x3, "without XTILEDATA bit 18"),  # the request "worked", the state says otherwise
    ],
)
def test_refusals_say_why(monkeypatch, result, mask, words):
    fake, _ = kernel(result, mask)
    monkeypatch.setattr(amx_permission, "arch_prctl", fake)
    permission = request_tile_permission()
    assert not permission.granted and words in permission.detail


def test_asked_once_per_process(monkeypatch):
    fake, calls = kernel(0)
    monkeypatch.setattr(amx_permission, "arch_prctl", fake)
    amx_permission.tile_permission.cache_clear()
    try:
        assert amx_permission.tile_permission().granted
        assert amx_permission.tile_permission().granted
        assert calls.count(ARCH_REQ_XCOMP_PERM) == 1
    finally:
        amx_permission.tile_permission.cache_clear()


@pytest.mark.parametrize(("result", "granted"), [(0, True), (-errno.EPERM, False)])
def test_the_probe_asks_on_an_amx_cpu_and_reports_the_state(monkeypatch, tmp_path, result, granted):
    cpuinfo = tmp_path / f"cpuinfo-{granted}"
    flags = " ".join(SPR_FLAGS)
    cpuinfo.write_text(f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: {flags}\n")
    fake, calls = kernel(result)
    monkeypatch.setattr(amx_permission, "arch_prctl", fake)
    amx_permission.tile_permission.cache_clear()
    try:
        device = probe(str(cpuinfo))
    finally:
        amx_permission.tile_permission.cache_clear()
    assert ARCH_REQ_XCOMP_PERM in calls
    assert (device.tile_permission == GRANTED) is granted
    assert device.to_dict()["tile_permission"] == device.tile_permission
    missing = missing_requirements(AMX.requires, device)
    assert (missing == []) is granted
    if not granted:
        assert "EPERM" in missing[0]


def spr(permission: str) -> DeviceInfo:
    return DeviceInfo("x86_64", "Xeon (simulated)", frozenset(SPR_FLAGS), 8, (), permission)


@pytest.fixture
def amx_bundle(tiny_bundle, tmp_path):
    """The tiny bundle's manifest listing an x86-amx and an x86-avx512-vnni int8 artifact."""
    path = shutil.copytree(tiny_bundle, tmp_path / "amx.tvmd")
    manifest = json.loads((path / "manifest.json").read_text())
    template = manifest["artifacts"][0]
    manifest["artifacts"] = [
        template
        | {
            "name": f"{p.name}-int8",
            "profile": p.name,
            "precision": "int8",
            "requires": p.requires,
            "latency": [],
            "accuracy": {},
        }
        for p in map(targets.get, ["x86-amx", "x86-avx512-vnni"])
    ]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Bundle(path)


def test_selection_takes_amx_only_with_the_permission(amx_bundle):
    assert select(amx_bundle, spr(GRANTED), precision="int8").artifact == "x86-amx-int8"
    refused = "AMX tile permission refused (ARCH_REQ_XCOMP_PERM: EPERM: a seccomp policy)"
    choice = select(amx_bundle, spr(refused), precision="int8")
    assert choice.artifact == "x86-avx512-vnni-int8"
    assert choice.rejected["x86-amx-int8"] == refused
