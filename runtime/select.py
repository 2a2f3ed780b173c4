"""Choosing the artifact to run on this device (the runtime rule in docs/design.md).

1. keep only artifacts whose `requires` the device meets (the others are never loaded);
2. keep only the precision asked for; with `auto`, a reduced precision only where its recorded
   task accuracy is within the bundle's accuracy gate of fp32 and its profile does not say it is
   slower than fp32 on this CPU (vdpbf16ps on Intel); fp32 is always allowed;
3. a latency measured on this device's fingerprint (in the bundle or the local cache) wins;
4. otherwise GPU before CPU, then the reduced precision (int8 before int4 before bf16/fp16
   before fp32), then the most specific ISA.
The ONNX Runtime fallback (`onnxruntime`) competes only where a latency for it was measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_json_atomic
from .bundle import Bundle
from .errors import IncompatibleDeviceError
from .paths import cache_dir
from .precision import PRECISIONS, admits_fp32, canonical, short, within_gate
from .probe import DeviceInfo, missing_requirements, slower_than_fp32

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
    """One latency (ms) per artifact, from the p50s recorded in the manifest at build time on this
    very device: the geometric mean over the buckets every measured artifact has, so artifacts
    are compared on the same shapes (one small, noisy bucket does not decide)."""
    per_artifact: dict[str, dict[tuple, float]] = {}
    for artifact in bundle.artifacts:
        for entry in artifact.latency:
            if entry.get("fingerprint") == device.fingerprint and "p50_ms" in entry:
                key = (entry.get("batch"), entry.get("seq"))
                found = per_artifact.setdefault(artifact.name, {})
                found[key] = min(found.get(key, float("inf")), float(entry["p50_ms"]))
    if not per_artifact:
        return {}
    common = set.intersection(*(set(v) for v in per_artifact.values()))
    return {
        name: math.exp(sum(math.log(max(v[k], 1e-9)) for k in common) / len(common))
        if common
        else min(v.values())
        for name, v in per_artifact.items()
    }


_SPEED_ORDER = list(reversed(PRECISIONS.values()))  # int8, int4, bfloat16, float16, float32


def rank_key(is_gpu: bool, requires: dict, name: str, precision: str = "float32") -> tuple:
    """GPU before CPU, then the faster precision, then the most specific ISA (more required
    features, newer CUDA arch)."""
    specificity = len(requires.get("cpu_features", [])) + int(requires.get("cuda_arch", 0))
    return (not is_gpu, _SPEED_ORDER.index(precision), -specificity, name)


def _precision_filter(
    bundle: Bundle, compatible: list, precision: str, device: DeviceInfo
) -> tuple[list, dict]:
    """The compatible artifacts `precision` allows, and why each other one was held back (with
    `auto`, also one whose profile says it is slower than fp32 on this CPU)."""
    held: dict[str, str] = {}
    if precision == "auto":
        allowed = []
        for a in compatible:
            if a.precision == "float32":
                allowed.append(a)
                continue
            ok, why = within_gate(a.accuracy, bundle.accuracy_gate)
            slower = slower_than_fp32(a.requires, device)
            if ok and not slower:
                allowed.append(a)
            else:
                held[a.name] = f"{short(a.precision)} not taken by auto: {slower or why}"
        return allowed, held
    dtype = canonical(precision)
    for a in compatible:
        if a.precision != dtype:
            held[a.name] = f"precision {short(a.precision)}, not the {short(dtype)} asked for"
    return [a for a in compatible if a.precision == dtype], held


def select(
    bundle: Bundle,
    device: DeviceInfo,
    artifact: str | None = None,
    onnxruntime_available: bool = False,
    precision: str = "auto",
) -> Choice:
    """Pick the engine for `bundle` on `device`; `artifact` forces one (and is still checked);
    `precision` ("auto", "fp32", "int8", ...) restricts the choice to one precision."""
    rejected = {
        a.name: "; ".join(missing)
        for a in bundle.artifacts
        if (missing := missing_requirements(a.requires, device))
    }
    compatible = [a for a in bundle.artifacts if a.name not in rejected]
    names = [a.name for a in compatible]
    if precision != "auto":
        canonical(precision)  # an unknown name fails here, whatever else is asked

    if artifact is not None:
        if artifact == ONNXRUNTIME:
            return Choice(ONNXRUNTIME, "forced by the caller", names, rejected)
        chosen = bundle.artifact(artifact)
        if chosen.name in rejected:
            raise IncompatibleDeviceError(
                f"artifact {artifact!r} cannot run on this device ({device.description}): it needs "
                f"{rejected[chosen.name]}. Compatible artifacts: {', '.join(names) or 'none'}"
            )
        return Choice(chosen.name, "forced by the caller", names, rejected)

    eligible, held = _precision_filter(bundle, compatible, precision, device)
    if compatible and not eligible:
        raise IncompatibleDeviceError(
            f"no {precision} artifact in {bundle.path} can run on {device.description}: "
            + "; ".join(f"{k}: {v}" for k, v in {**rejected, **held}.items())
        )
    if held:
        rejected = {**rejected, **held}
    compatible = eligible
    onnxruntime_available = onnxruntime_available and admits_fp32(precision)
    measured = {**bundle_latencies(bundle, device), **cached_latencies(bundle, device)}
    allowed = {a.name for a in compatible} | ({ONNXRUNTIME} if onnxruntime_available else set())
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
        best_artifact = min(
            compatible, key=lambda a: rank_key(a.is_gpu, a.requires, a.name, a.precision)
        )
        kind = "GPU" if best_artifact.is_gpu else "CPU"
        why = f"fastest-precision, most specific {kind} artifact this device can run"
        if best_artifact.precision != "float32":
            why += f" ({within_gate(best_artifact.accuracy, bundle.accuracy_gate)[1]})"
        return Choice(
            best_artifact.name,
            f"{why}; no latency measured here yet",
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
