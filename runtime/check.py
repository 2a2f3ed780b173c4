"""`tvmdeploy verify BUNDLE`: check a bundle on the device it landed on, before trusting it.

Rows, in order: the signature (against the given public keys, or just whether there is one), every
file's sha256, then each artifact this device can run, loaded and compared against ONNX Runtime on
the bundle's own ONNX model (the tolerance its manifest recorded). Artifacts the device cannot run
get a `not-run` row saying what it lacks. Only the runtime is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import Bundle
from .errors import TvmdeployError
from .inputs import synthetic_inputs
from .model import load
from .parity import ATOL, RTOL, Comparison
from .probe import missing_requirements, probe
from .signing import read_signature, verify_manifest

OK, FAILED, NOT_RUN = "ok", "failed", "not-run"


@dataclass
class CheckRow:
    """One check: what was checked, its status (ok / failed / not-run) and the detail."""

    what: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def all_ok(rows: Sequence[CheckRow]) -> bool:
    """No check failed (rows that could not run here are not failures)."""
    return all(row.status != FAILED for row in rows)


def check_bundle(
    bundle_dir: str | Path,
    public_keys: Sequence[str | Path] = (),
    shapes: Sequence[tuple[int, int]] = ((1, 16), (2, 32)),
) -> list[CheckRow]:
    """Every check of the bundle, as rows; never raises for a failed check (a missing or
    unreadable bundle still raises BundleError)."""
    bundle = Bundle(bundle_dir)
    rows = [_signature_row(bundle, public_keys)]
    files = bundle.manifest.get("files", {})
    for relative in files:
        try:
            bundle.file(relative)
            rows.append(CheckRow(f"sha256 {relative}", OK))
        except TvmdeployError as err:
            rows.append(CheckRow(f"sha256 {relative}", FAILED, str(err)))
    if any(row.status == FAILED for row in rows):
        return rows  # never load code from a bundle that failed its signature or checksums
    device = probe()
    reference = _reference(bundle)
    for artifact in bundle.artifacts:
        what = f"parity {artifact.profile}"
        missing = missing_requirements(artifact.requires, device)
        if missing:
            rows.append(CheckRow(what, NOT_RUN, "this device lacks " + "; ".join(missing)))
        elif reference is None:
            rows.append(CheckRow(what, NOT_RUN, "no ONNX Runtime or model.onnx to compare with"))
        else:
            rows.append(_parity_row(bundle, artifact, reference, shapes))
    return rows


def _signature_row(bundle: Bundle, public_keys: Sequence[str | Path]) -> CheckRow:
    try:
        if public_keys:
            signer = verify_manifest(bundle.path, bundle.manifest_bytes, public_keys)
            return CheckRow("signature", OK, f"signed by trusted key {signer}")
        record = read_signature(bundle.path)
    except TvmdeployError as err:
        return CheckRow("signature", FAILED, str(err))
    if record is None:
        return CheckRow("signature", NOT_RUN, "unsigned (sign with `tvmdeploy sign`)")
    return CheckRow(
        "signature", NOT_RUN, f"signed by key {record['key_id']}; pass --key PUB to check it"
    )


def _reference(bundle: Bundle):
    try:
        return load(bundle.path, artifact="onnxruntime")
    except (TvmdeployError, ImportError):
        return None


def _parity_row(bundle: Bundle, artifact, reference, shapes) -> CheckRow:
    what = f"parity {artifact.profile}"
    tolerance = artifact.parity.get("tolerance") or {}
    atol, rtol = float(tolerance.get("atol", ATOL)), float(tolerance.get("rtol", RTOL))
    names = [i["name"] for i in bundle.inputs]
    try:
        model = load(bundle.path, artifact=artifact.profile)
        comparison = Comparison()
        for batch, seq in shapes:
            seq = min(seq, model.max_seq)
            arrays = synthetic_inputs(
                names, int(bundle.model["vocab_size"]), batch, seq, padded_row=True
            )
            got, want = model(**arrays), reference(**arrays)
            comparison.add(f"{batch}x{seq}", list(got.values()), list(want.values()), atol, rtol)
    except TvmdeployError as err:
        return CheckRow(what, FAILED, str(err))
    detail = f"max abs diff {comparison.max_abs_diff:.2e} (atol {atol:g}, rtol {rtol:g})"
    if comparison.ok:
        return CheckRow(what, OK, detail)
    return CheckRow(what, FAILED, f"{detail}: {comparison.detail}")
