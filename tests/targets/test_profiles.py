"""Target profiles are data: every file loads, names itself, and gives TVM a valid target."""

import pytest
from tvmdeploy import targets

REQUIRED = {
    "x86-64-v3",
    "x86-64-v3-vnni",
    "x86-64-v4",
    "x86-avx512-vnni",
    "x86-amx",
    "arm64-neon",
    "arm64-dotprod",
    "arm64-sve",
    "cuda-sm75",
    "cuda-sm80",
    "cuda-sm86",
    "cuda-sm89",
    "cuda-sm90",
}


def test_required_profiles_exist():
    assert REQUIRED <= set(targets.names())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_builds_a_tvm_target(name):
    import tvm

    profile = targets.get(name)
    target = (
        tvm.target.Target(profile.target, host=profile.host)
        if profile.host
        else tvm.target.Target(profile.target)
    )
    assert target.kind.name == profile.target["kind"]
    assert profile.requires["arch"] in ("x86_64", "aarch64")
    if profile.family == "arm":
        assert profile.cross_cc and profile.qemu_cpu
        assert str(target.attrs["mtriple"]).startswith("aarch64")
    if profile.family == "cuda":
        assert str(target.attrs["arch"]) == f"sm_{profile.requires['cuda_arch']}"
        assert target.host is not None


def test_isa_profiles_are_ordered_by_features():
    v3, v4, vnni = (
        set(targets.get(n).requires["cpu_features"])
        for n in ("x86-64-v3", "x86-64-v4", "x86-avx512-vnni")
    )
    assert v3 < v4 < vnni
    assert v3 < set(targets.get("x86-64-v3-vnni").requires["cpu_features"])
    assert "sve" in targets.get("arm64-sve").requires["cpu_features"]


def test_unknown_profile_lists_known_names():
    with pytest.raises(targets.UnknownTargetError, match="x86-64-v4"):
        targets.get("x86-64-v9")


def test_the_amx_profile_requires_what_its_llvm_cpu_may_use():
    """mcpu sapphirerapids lets LLVM use every AVX-512 extension and the tiles: each one it
    enables must be a required CPU flag (/proc/cpuinfo spells them with `_`, LLVM with `-`)."""
    import tvm
    from tvm.target.codegen import llvm_get_cpu_features

    amx, vnni = targets.get("x86-amx"), targets.get("x86-avx512-vnni")
    assert set(vnni.requires["cpu_features"]) < set(amx.requires["cpu_features"])
    llvm = {str(f) for f in llvm_get_cpu_features(tvm.target.Target(amx.target))}
    assert {"amx-tile", "amx-int8", "amx-bf16", "avx512bf16"} <= llvm
    required = {f.replace("_", "") for f in amx.requires["cpu_features"]}
    used = {f.replace("-", "") for f in llvm if f.startswith(("avx512", "amx"))}
    assert used <= required, used - required
