"""Choosing the artifact to run on this device (the runtime rule in docs/design.md).

1. keep only artifacts whose `requires` the device meets (the others are never loaded);
2. a latency measured on this device's fingerprint (in the bundle or the local cache) wins;
3. otherwise GPU before CPU, then the most specific ISA.
The ONNX Runtime fallback (`onnxruntime`) competes only where a latency for it was measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_json_atomic
from .bundle import Bundle
from .errors import IncompatibleDeviceError
from .paths import cache_dir
from .probe import DeviceInfo, missing_requirements

ONNXRUNTIME = "onnxruntime"


@dataclass
class Choice:
    """Which engine runs the model, and why."""

    artifact: str  # a profile name, or "onnxruntime"
    reason: str
    compatible: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # profile -> what the device lacks
    measured_ms: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.artifact}: {self.reason}"


def _choices_file() -> Path:
    return cache_dir() / "choices.json"


def cached_latencies(bundle: Bundle, device: DeviceInfo) -> dict[str, float]:
    """Latencies (ms) measured earlier on this device for this bundle, by engine."""
    try:
        entries = json.loads(_choices_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return entries.get(bundle.identity, {}).get(device.fingerprint, {})


def remember_latencies(bundle: Bundle, device: DeviceInfo, latencies_ms: dict[str, float]) -> None:
    """Store measured latencies for this bundle and device (atomically; a race loses nothing)."""
    path = _choices_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        entries = {}
    entries.setdefault(bundle.identity, {})[device.fingerprint] = latencies_ms
    write_json_atomic(path, entries)


def bundle_latencies(bundle: Bundle, device: DeviceInfo) -> dict[str, float]:
    """p50 latencies recorded in the manifest at build time on this very device."""
    found: dict[str, float] = {}
    for artifact in bundle.artifacts:
        for entry in artifact.latency:
            if entry.get("fingerprint") == device.fingerprint and "p50_ms" in entry:
                found[artifact.profile] = min(
                    found.get(artifact.profile, float("inf")), entry["p50_ms"]
                )
    return found


def rank_key(is_gpu: bool, requires: dict, name: str) -> tuple:
    """GPU before CPU, then the most specific ISA (more required features, newer CUDA arch)."""
    specificity = len(requires.get("cpu_features", [])) + int(requires.get("cuda_arch", 0))
    return (not is_gpu, -specificity, name)


def select(
    bundle: Bundle,
    device: DeviceInfo,
    artifact: str | None = None,
    onnxruntime_available: bool = False,
) -> Choice:
    """Pick the engine for `bundle` on `device`; `artifact` forces one (and is still checked)."""
    rejected = {
        a.profile: "; ".join(missing)
        for a in bundle.artifacts
        if (missing := missing_requirements(a.requires, device))
    }
    compatible = [a for a in bundle.artifacts if a.profile not in rejected]
    names = [a.profile for a in compatible]

    if artifact is not None:
        if artifact == ONNXRUNTIME:
            return Choice(ONNXRUNTIME, "forced by the caller", names, rejected)
        chosen = bundle.artifact(artifact)
        if chosen.profile in rejected:
            raise IncompatibleDeviceError(
                f"artifact {artifact!r} cannot run on this device ({device.description}): it needs "
                f"{rejected[chosen.profile]}. Compatible artifacts: {', '.join(names) or 'none'}"
            )
        return Choice(chosen.profile, "forced by the caller", names, rejected)

    measured = {**bundle_latencies(bundle, device), **cached_latencies(bundle, device)}
    allowed = set(names) | ({ONNXRUNTIME} if onnxruntime_available else set())
    measured = {k: v for k, v in measured.items() if k in allowed}
    if measured:
        best = min(measured, key=measured.get)
        if len(measured) == 1:
            reason = f"the only candidate measured on this device ({measured[best]:.2f} ms p50)"
        else:
            ranking = ", ".join(
                f"{k} {v:.2f} ms" for k, v in sorted(measured.items(), key=lambda kv: kv[1])
            )
            reason = f"fastest measured on this device (p50: {ranking})"
        return Choice(best, reason, names, rejected, measured)
    if compatible:
        best_artifact = min(compatible, key=lambda a: rank_key(a.is_gpu, a.requires, a.profile))
        kind = "GPU" if best_artifact.is_gpu else "CPU"
        return Choice(
            best_artifact.profile,
            f"most specific {kind} artifact this device can run (no latency measured here yet)",
            names,
            rejected,
        )
    if onnxruntime_available:
        return Choice(
            ONNXRUNTIME,
            "no compiled artifact fits this device; ONNX Runtime fallback",
            names,
            rejected,
        )
    raise IncompatibleDeviceError(
        f"no artifact in {bundle.path} can run on {device.description}: "
        + "; ".join(f"{k} needs {v}" for k, v in rejected.items())
        + ". Install onnxruntime to use the bundle's ONNX fallback, or compile for this device "
        "(`tvmdeploy compile ... --target host`)."
    )
