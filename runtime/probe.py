"""Device probe: what this machine can run, read from the kernel and TVM's runtime.

Selection trusts only this: an artifact is loaded only when the probe shows every CPU feature and
the GPU it requires. CPU features come from /proc/cpuinfo exactly as the kernel spells them
(x86 `flags`, aarch64 `Features`); CUDA devices from TVM's runtime, never its compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from ._tvm import default_num_threads
from .amx_permission import GRANTED, tile_permission

_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: int  # e.g. 86 for 8.6


@dataclass(frozen=True)
class DeviceInfo:
    """What selection needs to know about a device, and a fingerprint that names it stably."""

    arch: str
    cpu_model: str
    cpu_features: frozenset[str]
    cores: int
    cuda: tuple[CudaDevice, ...] = field(default_factory=tuple)
    #: The AMX tile permission (runtime/amx_permission.py): "granted", the refusal in words, or
    #: "" where the CPU has no AMX. Not part of the fingerprint: it is the process's, not the CPU's.
    tile_permission: str = ""
    vendor: str = ""  # /proc/cpuinfo `vendor_id` (GenuineIntel, AuthenticAMD); "" where none

    @property
    def fingerprint(self) -> str:
        """Same hardware, same fingerprint: arch, CPU model and features, cores, GPUs."""
        key = json.dumps(
            [
                self.arch,
                self.cpu_model,
                sorted(self.cpu_features),
                self.cores,
                [asdict(c) for c in self.cuda],
            ]
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def description(self) -> str:
        gpus = ", ".join(f"{c.name} (sm_{c.compute_capability})" for c in self.cuda)
        return f"{self.cpu_model} ({self.arch}, {self.cores} cores)" + (
            f" + {gpus}" if gpus else ""
        )

    def to_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "description": self.description,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "cores": self.cores,
            "cpu_features": sorted(self.cpu_features),
            "cuda": [asdict(c) for c in self.cuda],
            "vendor": self.vendor or None,
            "tile_permission": self.tile_permission or None,
        }


def cpu_vendor(text: str) -> str:
    """The x86 `vendor_id` of /proc/cpuinfo text ("" on aarch64, which has none)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "vendor_id":
            return value.strip()
    return ""


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags from /proc/cpuinfo text (x86 or aarch64 layout)."""
    model, features = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not features:
            features = set(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key == "cpu part" and not model:
            model = f"ARM part {value.strip()}"
    return model, frozenset(features)


def _cuda_devices() -> tuple[CudaDevice, ...]:
    """CUDA devices through TVM's runtime; none when TVM has no CUDA runtime or no driver."""
    if os.environ.get("TVMDEPLOY_NO_GPU_PROBE") == "1":
        return ()
    from ._tvm import import_tvm

    tvm = import_tvm()
    found = []
    try:
        for index in range(16):
            dev = tvm.cuda(index)
            if not dev.exist:
                break
            major, minor = (int(x) for x in str(dev.compute_version).split("."))
            found.append(CudaDevice(index, str(dev.device_name), major * 10 + minor))
    except Exception:  # noqa: BLE001 - no libcuda or CUDA runtime module: no GPU usable here
        return tuple(found)
    return tuple(found)


@cache
def probe(cpuinfo_path: str = "/proc/cpuinfo") -> DeviceInfo:
    """Probe this machine once per process."""
    arch = platform.machine().lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    try:
        text = Path(cpuinfo_path).read_text()
        model, features = parse_cpuinfo(text)
    except OSError:
        text, model, features = "", platform.processor() or "unknown CPU", frozenset()
    return DeviceInfo(
        arch=arch,
        cpu_model=model or "unknown CPU",
        cpu_features=features,
        cores=default_num_threads(),
        cuda=_cuda_devices(),
        tile_permission=tile_permission().detail if "amx_tile" in features else "",
        vendor=cpu_vendor(text),
    )


def missing_requirements(requires: dict, device: DeviceInfo) -> list[str]:
    """What `device` lacks of `requires`, in words; empty when it can run the artifact."""
    missing = []
    arch = requires.get("arch")
    if arch and arch != device.arch:
        missing.append(f"arch {arch} (device is {device.arch})")
    absent = [f for f in requires.get("cpu_features", []) if f not in device.cpu_features]
    if absent:
        missing.append("CPU features " + ", ".join(absent))
    elif "amx_tile" in requires.get("cpu_features", []) and device.tile_permission != GRANTED:
        missing.append(device.tile_permission or "the AMX tile permission (not requested)")
    cuda_arch = requires.get("cuda_arch")
    if cuda_arch:
        best = max((c.compute_capability for c in device.cuda), default=None)
        if best is None:
            missing.append(f"a CUDA GPU of compute capability >= {cuda_arch / 10:.1f} (none found)")
        elif best < cuda_arch:
            missing.append(
                f"CUDA compute capability >= {cuda_arch / 10:.1f} (best is {best / 10:.1f})"
            )
    return missing


def slower_than_fp32(requires: dict, device: DeviceInfo) -> str:
    """Why an artifact that `device` can run is slower there than fp32 ("" when it is not): the
    profile's `slower_than_fp32` rule (vendors), recorded in the artifact's `requires`."""
    rule = requires.get("slower_than_fp32") or {}
    if device.vendor and device.vendor in rule.get("vendors", []):
        return str(rule.get("why", f"slower than fp32 on {device.vendor} CPUs"))
    return ""
