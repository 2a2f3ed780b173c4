"""Device probe: parses the kernel's CPU description and matches profile requirements."""

import platform
import shutil
import subprocess

from tvmdeploy import targets
from tvmdeploy.runtime.probe import (
    CudaDevice,
    DeviceInfo,
    missing_requirements,
    parse_cpuinfo,
    probe,
)

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6138 CPU @ 2.00GHz
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl

processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6138 CPU @ 2.00GHz
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl
"""

# The layout of a Cortex-A72 (Raspberry Pi 4) /proc/cpuinfo.
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
"""


def test_parse_x86_cpuinfo():
    model, features = parse_cpuinfo(X86_CPUINFO)
    assert model.startswith("Intel(R) Xeon(R) Gold 6138")
    assert {"avx2", "avx512f", "fma"} <= features and "avx512_vnni" not in features


def test_parse_arm_cpuinfo():
    model, features = parse_cpuinfo(ARM_CPUINFO)
    assert model == "ARM part 0xd08"
    assert "asimd" in features and "sve" not in features


def _device(arch, features, cuda=()):
    return DeviceInfo(
        arch=arch, cpu_model="test", cpu_features=frozenset(features), cores=4, cuda=tuple(cuda)
    )


def test_requirements_against_devices():
    skylake = _device("x86_64", parse_cpuinfo(X86_CPUINFO)[1])
    assert missing_requirements(targets.get("x86-64-v4").requires, skylake) == []
    assert missing_requirements(targets.get("x86-avx512-vnni").requires, skylake) == [
        "CPU features avx512_vnni"
    ]
    assert "arch aarch64" in missing_requirements(targets.get("arm64-neon").requires, skylake)[0]
    pi4 = _device("aarch64", parse_cpuinfo(ARM_CPUINFO)[1])
    assert missing_requirements(targets.get("arm64-neon").requires, pi4) == []
    assert missing_requirements(targets.get("arm64-sve").requires, pi4) == [
        "CPU features asimddp, sve, i8mm, bf16"
    ]
    assert "none found" in missing_requirements(targets.get("cuda-sm80").requires, skylake)[0]
    t4 = _device("x86_64", [], [CudaDevice(0, "Tesla T4", 75)])
    assert missing_requirements(targets.get("cuda-sm75").requires, t4) == []
    assert "best is 7.5" in missing_requirements(targets.get("cuda-sm80").requires, t4)[0]


def test_fingerprint_is_stable_and_hardware_specific():
    a = _device("x86_64", ["avx2"])
    assert a.fingerprint == _device("x86_64", ["avx2"]).fingerprint
    assert a.fingerprint != _device("x86_64", ["avx2", "avx512f"]).fingerprint


def test_probe_this_machine_agrees_with_lscpu():
    device = probe()
    assert device.arch == platform.machine()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    flags_line = next(line for line in lscpu.splitlines() if line.startswith("Flags:"))
    assert set(flags_line.split(":", 1)[1].split()) == set(device.cpu_features)
    # GPUs as the NVIDIA driver lists them (none where there is no driver), whatever this machine
    # has.
    smi = shutil.which("nvidia-smi")
    listed = (
        subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout
        if smi
        else ""
    )
    assert len(device.cuda) == sum(line.startswith("GPU ") for line in listed.splitlines())


def test_the_vendor_is_read_from_cpuinfo(tmp_path):
    from tvmdeploy.runtime.probe import cpu_vendor

    assert cpu_vendor("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: avx\n") == "GenuineIntel"
    assert cpu_vendor("processor\t: 0\nFeatures\t: asimd\n") == ""
    path = tmp_path / "cpuinfo"
    path.write_text("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7R13\nflags\t: avx avx2\n")
    assert probe(str(path)).vendor == "AuthenticAMD"
