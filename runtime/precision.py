"""Precisions: their names, what an artifact of each is called, and which one `auto` may take.

A bundle can hold several artifacts per profile, one per precision (docs/design.md, "Bundle").
The manifest spells precisions as dtypes (`float32`, `int8`, `int4`, `bfloat16`, `float16`);
users write the short names (`fp32`, `int8`, `int4`, `bf16`, `fp16`). An fp32 artifact is named
after its profile (as before precisions existed); the others get the short name appended:
`x86-64-v3-int8`.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError

#: Short name -> manifest dtype, fastest-expected last.
PRECISIONS = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    # Weight-only, generation bundles only (compiler/decoder/quantized_int4.py). Ranked below
    # int8: fewer bytes, but on AVX2 its GEMV is compute-bound and its prefill dequantizes, so it
    # decoded and prefilled slower than int8 (docs/benchmarks.md); a measured latency still wins.
    "int4": "int4",
    "int8": "int8",
}
_SHORT = {v: k for k, v in PRECISIONS.items()}

#: Parity tolerance against ONNX Runtime's fp32 outputs, per precision: |ours - ort| must stay
#: within atol + rtol * |ort|, where for reduced precisions atol scales with the output's range
#: (`scaled_atol`), since a quantization error is relative to the values it quantizes.
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 1e-4},
    "float16": {"atol": 2e-2, "rtol": 2e-2, "range_atol": 2e-2},
    "bfloat16": {"atol": 5e-2, "rtol": 5e-2, "range_atol": 5e-2},
    "int8": {"atol": 5e-2, "rtol": 5e-2, "range_atol": 5e-2},
    "int4": {"atol": 1e-1, "rtol": 1e-1, "range_atol": 1e-1},
}

#: Accuracy points a reduced precision may lose against fp32 and still be taken by `auto`.
DEFAULT_ACCURACY_GATE = 1.0


def canonical(precision: str) -> str:
    """The manifest's spelling of `precision` (either spelling accepted)."""
    if precision in _SHORT:
        return precision
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise OptionError(
            f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}"
        ) from None


def admits_fp32(precision: str) -> bool:
    """Whether a `load(precision=...)` policy may run fp32 (so the ONNX Runtime fallback, which
    is fp32, may compete too)."""
    return precision == "auto" or canonical(precision) == "float32"


def short(precision: str) -> str:
    return _SHORT.get(precision, precision)


def artifact_name(profile: str, precision: str) -> str:
    """`profile` for fp32, else `profile-<short precision>`."""
    dtype = canonical(precision)
    return profile if dtype == "float32" else f"{profile}-{short(dtype)}"


def tolerance_for(precision: str, reference_range: float = 0.0) -> dict[str, float]:
    """atol/rtol for comparing an artifact of `precision` with ONNX Runtime fp32 outputs whose
    values span `reference_range` (max - min)."""
    spec = TOLERANCES[canonical(precision)]
    atol = max(spec["atol"], spec.get("range_atol", 0.0) * reference_range)
    return {"atol": float(atol), "rtol": float(spec["rtol"])}


def within_gate(accuracy: dict[str, Any] | None, gate_points: float) -> tuple[bool, str]:
    """Whether an artifact's recorded accuracy lets `auto` take it, and why (or why not).

    `accuracy` is the manifest's record: {"metric", "value", "fp32", "agreement", "examples"}
    with value and fp32 in points (percent). A record that carries its own verdict (`ok`, with
    its `threshold`: a generation artifact's quantized gate, compiler/decoder/quality.py) is
    taken as decided at build time."""
    if not accuracy or accuracy.get("value") is None or accuracy.get("fp32") is None:
        return False, "no accuracy measured against fp32"
    drop = float(accuracy["fp32"]) - float(accuracy["value"])
    metric = accuracy.get("metric", "accuracy")
    text = f"{metric} {accuracy['value']:.2f} vs fp32 {accuracy['fp32']:.2f}"
    if "ok" in accuracy:
        verdict = "within" if accuracy["ok"] else "outside"
        return bool(accuracy["ok"]), f"{text} ({verdict} its gate {accuracy.get('threshold')})"
    return drop <= gate_points, f"{text} ({drop:+.2f} points lost, gate {gate_points:g})"
