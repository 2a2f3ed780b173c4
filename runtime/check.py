"""`tvmdeploy verify BUNDLE`: check a bundle on the device it landed on, before trusting it.

Rows, in order: the signature (against the given public keys or `$TVMDEPLOY_TRUSTED_KEYS`; without
any, only against the key it names), every file's sha256, then each artifact this device can run,
loaded and compared against ONNX Runtime on the bundle's own ONNX model (the tolerance its
manifest recorded). Artifacts the device cannot run get a `not-run` row saying what it lacks.
Only the runtime is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, Bundle
from .errors import TvmdeployError
from .generate import Generator
from .inputs import synthetic_inputs
from .model import load
from .parity import ATOL, RTOL, Comparison
from .probe import missing_requirements, probe
from .signing import (
    INVALID,
    UNSIGNED,
    signature_status,
    trusted_keys_from_env,
    verify_manifest,
    verify_signature,
)

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
    public_keys: Sequence[str | Path] | None = None,
    shapes: Sequence[tuple[int, int]] = ((1, 16), (2, 32)),
) -> list[CheckRow]:
    """Every check of the bundle, as rows; never raises for a failed check.

    `public_keys` (files or keys; default `$TVMDEPLOY_TRUSTED_KEYS`) are the keys the signature
    must be from; without any, the signature is only checked against the key it names (`not-run`
    when valid: who signed is unproven). A manifest that is unreadable or names paths outside the
    bundle is one `failed` row; a missing bundle directory or manifest raises BundleError. No
    library is loaded from a bundle whose signature or checksums failed.
    """
    keys = list(public_keys or ()) or trusted_keys_from_env()
    try:
        bundle = Bundle(bundle_dir, check_signature=False)
    except TvmdeployError as err:
        if not (Path(bundle_dir) / MANIFEST).is_file():
            raise  # not a bundle at all: nothing to report on
        return [_signature_row(Path(bundle_dir), keys), CheckRow("manifest", FAILED, str(err))]
    rows = [_signature_row(bundle, keys)]
    for relative in bundle.manifest["files"]:
        try:
            bundle.file(relative)
            rows.append(CheckRow(f"sha256 {relative}", OK))
        except TvmdeployError as err:
            rows.append(CheckRow(f"sha256 {relative}", FAILED, str(err)))
    if not all_ok(rows):
        return rows  # never load code from a bundle that failed its signature or checksums
    device = probe()
    reference = _reference(bundle, keys)
    for artifact in bundle.artifacts:
        what = f"parity {artifact.name}"
        missing = missing_requirements(artifact.requires, device)
        if missing:
            rows.append(CheckRow(what, NOT_RUN, "this device lacks " + "; ".join(missing)))
        elif reference is None:
            rows.append(CheckRow(what, NOT_RUN, "no ONNX Runtime or model.onnx to compare with"))
        elif isinstance(reference, Generator):
            rows.append(_generation_parity_row(bundle, artifact, reference, keys))
        else:
            rows.append(_parity_row(bundle, artifact, reference, shapes, keys))
    return rows


#: A generation artifact's prefill logits against ONNX Runtime on the bundle's export: the
#: compile gate's tolerance (fp32 over tens of layers), on seeded prompts of these lengths.
GENERATION_ATOL = 2e-3
GENERATION_PROMPTS = (5, 33)


def _generation_parity_row(bundle: Bundle, artifact, reference, keys) -> CheckRow:
    """Prefill logits of the artifact against the ONNX Runtime engine (greedy tokens are the
    compile gate's, with its tie rule; here the logits they come from are compared)."""
    what = f"parity {artifact.name}"
    rng = np.random.default_rng(0)
    vocab = int(bundle.model["vocab_size"])
    try:
        model = load(bundle.path, artifact=artifact.name, trusted_keys=keys or None)
        worst = 0.0
        for n in GENERATION_PROMPTS:
            prompt = rng.integers(0, vocab, size=min(n, model.context_length - 1)).tolist()
            got, want = model.prefill_logits(prompt), reference.prefill_logits(prompt)
            worst = max(worst, float(np.abs(got - want).max()))
    except TvmdeployError as err:
        return CheckRow(what, FAILED, str(err))
    except Exception as err:  # noqa: BLE001 - a crash inside TVM is this check failing
        return CheckRow(what, FAILED, f"{type(err).__name__}: {err}")
    detail = f"prefill logits max abs diff {worst:.2e} vs ONNX Runtime (atol {GENERATION_ATOL:g})"
    return CheckRow(what, OK if worst <= GENERATION_ATOL else FAILED, detail)


def _signature_row(bundle: Bundle | Path, keys: Sequence[str | Path]) -> CheckRow:
    """The signature against `keys`, or (none given) against the key it names."""
    if keys:
        try:
            if isinstance(bundle, Bundle):
                signer = verify_manifest(bundle.path, bundle.manifest_bytes, keys)
            else:
                signer = verify_signature(bundle, keys)
        except TvmdeployError as err:
            return CheckRow("signature", FAILED, str(err))
        return CheckRow("signature", OK, f"signed by trusted key {signer.key_id}")
    status = signature_status(bundle)
    if status.state == INVALID:
        return CheckRow("signature", FAILED, status.detail)
    if status.state == UNSIGNED:
        return CheckRow("signature", NOT_RUN, "unsigned (sign with `tvmdeploy sign`)")
    return CheckRow(
        "signature",
        NOT_RUN,
        f"valid signature by key {status.key_id}; pass --key PUB to check it is a trusted key",
    )


def _reference(bundle: Bundle, keys: Sequence[str | Path]):
    try:
        return load(bundle.path, artifact="onnxruntime", trusted_keys=keys or None)
    except (TvmdeployError, ImportError):
        return None


def _parity_row(bundle: Bundle, artifact, reference, shapes, keys) -> CheckRow:
    what = f"parity {artifact.name}"
    tolerance = artifact.parity.get("tolerance") or {}
    atol, rtol = float(tolerance.get("atol", ATOL)), float(tolerance.get("rtol", RTOL))
    names = [i["name"] for i in bundle.inputs]
    try:
        model = load(bundle.path, artifact=artifact.name, trusted_keys=keys or None)
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
    except Exception as err:  # noqa: BLE001 - a crash inside TVM is this check failing
        return CheckRow(what, FAILED, f"{type(err).__name__}: {err}")
    detail = f"max abs diff {comparison.max_abs_diff:.2e} (atol {atol:g}, rtol {rtol:g})"
    if comparison.ok:
        return CheckRow(what, OK, detail)
    return CheckRow(what, FAILED, f"{detail}: {comparison.detail}")
