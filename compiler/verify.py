"""Stage 5, verify: run each built artifact where it can run and compare it with ONNX Runtime.

Inputs are deterministic (seeded ids, a partly masked row), one set per bucket. An artifact this
machine cannot run natively is run under emulation where its profile names a `qemu_cpu` (ARM, see
qemu.py), on a remote device through TVM RPC where the caller names one (`verify_rpc`), and
otherwise recorded `not-run` rather than guessed at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tvmdeploy.runtime._tvm import prepare_params
from tvmdeploy.runtime.engine import ort_input_dtypes
from tvmdeploy.runtime.parity import Comparison, default_tolerance, parity_summary
from tvmdeploy.runtime.precision import tolerance_for
from tvmdeploy.runtime.probe import DeviceInfo, missing_requirements, probe

from .errors import QemuUnavailable
from .frontend.export import deterministic_inputs
from .frontend.importer import ImportedModel
from .options import BucketSpec


@dataclass
class Parity:
    reference: str
    where: str  # native / qemu:<cpu> / gpu:<name> / rpc:<key> / not-run
    max_abs_diff: float | None
    tolerance: dict[str, float]
    ok: bool | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "where": self.where,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "detail": self.detail,
        }

    def summary(self) -> str:
        return parity_summary(self.to_dict())


def reference_cases(onnx_path: Path, imported: ImportedModel, config: dict[str, Any]):
    """(bucket, inputs, ONNX Runtime outputs) for every bucket, on the user's original graph
    (int64 inputs, cast for ORT where the graph takes int32 ids)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    dtypes = ort_input_dtypes(session)
    names = [i["name"] for i in imported.inputs]
    cases = []
    checked = list(imported.buckets)
    if imported.fallback:  # an odd length near the model's limit, beyond every bucket
        longest = max(b.seq for b in imported.buckets)
        length = max(longest + 1, imported.fallback.seq - 3)
        checked.append(BucketSpec(1, length, imported.fallback.function))
    for k, bucket in enumerate(checked):
        arrays = deterministic_inputs(config, names, bucket.batch, bucket.seq, seed=k)
        feed = {n: a.astype(dtypes[n], copy=False) for n, a in arrays.items()}
        cases.append((bucket, arrays, session.run(None, feed)))
    return cases


def without_fallback_case(cases) -> list:
    """The cases of an artifact built without the fallback function."""
    return [case for case in cases if case[0].name is None]


def tolerance_for_cases(precision: str, cases, source: str = "float32") -> dict[str, float]:
    """The parity tolerance for an artifact of `precision` (runtime/precision.py), scaled for
    reduced precisions by the range of the reference outputs; the looser of the artifact's and
    the source graph's, since ONNX Runtime computes an fp16 or quantized user graph's reference
    in that precision (normalize.source_precision); twice int8's for a quantized graph."""
    values = [np.asarray(o, dtype=np.float64) for _, _, expected in cases for o in expected]
    spread = max((float(v.max() - v.min()) for v in values if v.size), default=0.0)
    mine, theirs = tolerance_for(precision, spread), tolerance_for(source, spread)
    if source == "int8":
        # ORT's reference carries its own activation rounding, which tvmdeploy does not repeat
        # (normalize.py lifts the weights to float): two independent quantization errors.
        theirs = {key: 2 * value for key, value in theirs.items()}
    return {key: max(mine[key], theirs[key]) for key in mine}


def run_native(
    lib_path: Path,
    imported: ImportedModel,
    cases,
    timing_runs: int = 10,
    tolerance: dict[str, float] | None = None,
):
    """Run the library here: its comparison with the reference, and p50 latency per bucket."""
    import tvm

    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    params = prepare_params(vm, imported.params)
    raw = list(imported.params)  # the fallback function reads the weights as stored
    comparison = Comparison(**(tolerance or default_tolerance()))
    latencies = []
    for bucket, arrays, expected in cases:
        weights = raw if bucket.name else params
        args = [tvm.runtime.tensor(arrays[i["name"]]) for i in imported.inputs] + weights
        fn = vm[bucket.function]
        result = fn(*args)
        outputs = [result.numpy()] if hasattr(result, "numpy") else [o.numpy() for o in result]
        comparison.add(bucket.function, outputs, expected)
        if timing_runs and bucket.name is None:  # buckets only: the fallback is not chosen by time
            times = []
            for _ in range(timing_runs):
                start = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - start) * 1e3)
            latencies.append(
                {"batch": bucket.batch, "seq": bucket.seq, "p50_ms": float(np.median(times))}
            )
    return comparison, latencies


def verify_emulated(build, imported: ImportedModel, cases, qemu_cpu: str | None = None) -> Parity:
    """Parity of an aarch64 artifact run under qemu-user on `qemu_cpu` (default: the profile's).

    `not-run` when qemu or the arm64 Python sysroot is missing; a crash (SIGILL on a CPU model
    without the library's instructions) is a failed verification with the reason, not an error.
    """
    from .emulation import qemu

    tolerance = tolerance_for_cases(build.precision, cases, imported.source_precision)
    profile = build.profile
    cpu = qemu_cpu or profile.qemu_cpu
    try:
        arm = qemu.find_arm64_python()
    except QemuUnavailable as e:
        why = f"cannot verify under QEMU: {e}"
        return Parity("onnxruntime", "not-run", None, tolerance, None, why)
    run = qemu.run_cases(build.lib_path, imported, cases, cpu, arm)
    if not run.ok:
        detail = run.detail
        if cpu != profile.qemu_cpu:
            detail += f" (profile {profile.name} is verified on qemu -cpu {profile.qemu_cpu})"
        return Parity("onnxruntime", f"qemu:{cpu}", None, tolerance, False, detail)
    comparison = Comparison(**tolerance)
    for (bucket, _, expected), outputs in zip(cases, run.outputs, strict=True):
        comparison.add(bucket.function, outputs, expected)
    return _parity(f"qemu:{cpu}", comparison, tolerance)


def verify_rpc(
    build, imported: ImportedModel, cases, rpc: str, rpc_key: str, session_timeout: float = 600.0
) -> Parity:
    """Parity of an artifact run on the device behind `rpc_key` at the tracker `rpc` (HOST:PORT).

    Unreachable tracker, unknown key or another arch raise (the caller asked for this device); a
    failure while loading or running on the device is a failed verification with the reason.
    """
    import tvm
    from tvmdeploy.runtime import remote

    tolerance = tolerance_for_cases(build.precision, cases, imported.source_precision)
    where = f"rpc:{rpc_key}"
    profile = build.profile
    with remote.connect(rpc, rpc_key, session_timeout=session_timeout) as session:
        remote.check_artifact_runs(profile.requires, profile.is_gpu, profile.name, session.device)
        blob = tvm.runtime.save_param_dict(dict(zip(imported.param_names, imported.params)))
        names = [i["name"] for i in imported.inputs]
        comparison = Comparison(**tolerance)
        try:
            vm = remote.RemoteVM(
                session,
                build.lib_path,
                blob,
                imported.param_names,
                name=profile.name,
                raw_weights_for=[b.function for b, _, _ in cases if b.name],
            )
            for bucket, arrays, expected in cases:
                outputs = vm.run(bucket.function, [arrays[n] for n in names])
                comparison.add(bucket.function, outputs, expected)
        except remote.RemoteError as err:
            return Parity("onnxruntime", where, None, tolerance, False, str(err))
    return _parity(where, comparison, tolerance)


def verify(
    build,
    imported: ImportedModel,
    cases,
    device: DeviceInfo | None = None,
    timing_runs: int = 10,
    qemu_cpu: str | None = None,
):
    """Parity record (and build-time latencies when run natively) for one built artifact.

    `qemu_cpu` forces emulation on that qemu CPU model (for profiles that name a `qemu_cpu`).
    """
    device = device or probe()
    tolerance = tolerance_for_cases(build.precision, cases, imported.source_precision)
    profile = build.profile
    missing = missing_requirements(profile.requires, device)
    if profile.qemu_cpu and (missing or qemu_cpu):
        return verify_emulated(build, imported, cases, qemu_cpu), []
    if profile.family == "cuda" and not device.cuda:
        why = (
            f"no CUDA device on the build host (the artifact needs compute capability >= "
            f"{profile.requires.get('cuda_arch', 0) / 10:.1f}); `pytest -m gpu` on a GPU host "
            f"checks it"
        )
        return Parity("onnxruntime", "not-run", None, tolerance, None, why), []
    if profile.family == "cuda" or missing:
        why = (
            ("needs " + "; ".join(missing))
            if missing
            else ("GPU verification at build time is not implemented")
        )
        return Parity("onnxruntime", "not-run", None, tolerance, None, why), []
    comparison, latencies = run_native(build.lib_path, imported, cases, timing_runs, tolerance)
    for entry in latencies:
        entry.update(fingerprint=device.fingerprint, device=device.description)
    return _parity("native", comparison, tolerance), latencies


def _parity(where: str, comparison: Comparison, tolerance: dict[str, float]) -> Parity:
    return Parity(
        "onnxruntime", where, comparison.max_abs_diff, tolerance, comparison.ok, comparison.detail
    )
