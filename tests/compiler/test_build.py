"""Build stage: one `lib.so` per profile, code only, loadable and of the profile's architecture."""

import pytest
from tvmdeploy import targets
from tvmdeploy.compiler.build import build_artifact, tvm_target
from tvmdeploy.targets.resolve import host_profile

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def test_host_build_is_a_loadable_library_without_weights(tiny_imported, tmp_path):
    import tvm

    profile = host_profile()
    built = build_artifact(tiny_imported.mod, profile, tmp_path / "host")
    assert built.lib_path == tmp_path / "host" / "lib.so" and built.code_form == "shared-library"
    assert built.target == profile.target and built.profile == profile
    assert elf_machine(built.lib_path) == ELF_MACHINE["x86_64"]
    # Code only: the library is far smaller than the weights it is run with.
    weights = sum(p.numpy().nbytes for p in tiny_imported.params)
    assert built.lib_path.stat().st_size < weights
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(built.lib_path)), tvm.cpu())
    for bucket in tiny_imported.buckets:
        assert vm.module.implements_function(bucket.function)


@pytest.mark.qemu
def test_arm_profile_is_cross_compiled_for_aarch64(tiny_imported, tmp_path):
    profile = targets.get("arm64-neon")
    built = build_artifact(tiny_imported.mod, profile, tmp_path / "arm")
    assert elf_machine(built.lib_path) == ELF_MACHINE["aarch64"]


def test_tvm_target_follows_the_profile():
    for name in ("x86-64-v3", "arm64-neon", "cuda-sm80"):
        profile = targets.get(name)
        target = tvm_target(profile, num_cores=3)
        assert target.kind.name == profile.target["kind"]
        if profile.target["kind"] == "llvm":
            assert int(target.attrs["num-cores"]) == 3
            assert str(target.attrs["mcpu"]) == profile.target["mcpu"]
