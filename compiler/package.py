"""Stage 6, package: write the bundle directory atomically, manifest last.

Everything is written into a hidden staging directory beside the destination and renamed into
place in one step, so an interrupted write leaves either the old bundle or the new one, never
half of either. Every file's sha256 goes into the manifest; the runtime checks them before use.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from tvmdeploy.runtime.precision import DEFAULT_ACCURACY_GATE, artifact_name

from .errors import BundleError
from .frontend.export import TOKENIZER_FILES, external_data_files


@dataclass
class ArtifactEntry:
    """What the manifest states about one artifact (docs/design.md, "Bundle")."""

    profile: str
    family: str
    target: dict[str, Any]
    requires: dict[str, Any]
    lib_path: Path
    precision: str = "float32"
    code_form: str = "shared-library"
    tuning: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    latency: list[dict[str, Any]] = field(default_factory=list)
    tuning_files: list[Path] = field(default_factory=list)
    weights: str = "float32"  # the weights entry it reads
    fallback: bool = False  # holds the symbolic-length function (model["fallback"])

    @property
    def name(self) -> str:
        return artifact_name(self.profile, self.precision)


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "tvmdeploy",
        "apache-tvm",
        "apache-tvm-ffi",
        "onnx",
        "onnxruntime",
        "optimum-onnx",
        "transformers",
        "torch",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def weights_blob(names: list[str], params: list[Any]) -> bytes:
    """The weights in TVM's param-dict format (`weights/<precision>.params`), keyed by name."""
    import tvm

    return tvm.runtime.save_param_dict(dict(zip(names, params, strict=True)))


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def write_bundle(
    out_dir: str | Path,
    onnx_path: Path | None,
    weights: dict[str, tuple[list[str], bytes]],
    artifacts: list[ArtifactEntry],
    model_info: dict[str, Any],
    buckets: list[dict[str, Any]],
    tokenizer_dir: Path | None = None,
    export_parity: dict[str, Any] | None = None,
    accuracy_gate: float = DEFAULT_ACCURACY_GATE,
    evaluate: Callable[[Path], dict[str, dict[str, Any]]] | None = None,
    check_staged: Callable[[Path], dict[str, dict[str, Any]]] | None = None,
) -> Path:
    """Write `out_dir` (a `.tvmd` directory); replaces an existing bundle only once complete.

    Everything is staged in a hidden sibling directory and renamed into place, so a crash, a full
    disk or `kill -9` at any moment leaves the previous bundle (or nothing) at `out_dir`, never a
    partial one; what a killed run left beside it is cleaned up by the next run.
    `evaluate(staging_dir)` runs on the complete staged bundle and returns accuracy records by
    artifact name (evaluate.py), written into the manifest before the bundle is moved in place.
    `check_staged(staging_dir)` likewise returns manifest fields by artifact name (a decoder's
    parity record, measured through the runtime on the staged bundle); raising in it leaves
    nothing at `out_dir`. `onnx_path` None: a bundle without `model.onnx` (decoders).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        if onnx_path is not None:
            shutil.copyfile(onnx_path, staging / "model.onnx")
            for name in external_data_files(onnx_path):  # weights of a graph of 2 GB or more
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(onnx_path.parent / name, staging / name)
        weight_entries = {}
        for precision, (names, blob) in weights.items():
            (staging / "weights").mkdir(exist_ok=True)
            (staging / "weights" / f"{precision}.params").write_bytes(blob)
            weight_entries[precision] = {"file": f"weights/{precision}.params", "names": names}
        artifact_entries = []
        for artifact in artifacts:
            rel = f"artifacts/{artifact.name}/lib.so"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact.lib_path, staging / rel)
            tuning = dict(artifact.tuning)
            if artifact.tuning_files:
                tuning_dir = staging / "tuning" / artifact.name
                tuning_dir.mkdir(parents=True, exist_ok=True)
                for f in artifact.tuning_files:
                    shutil.copyfile(f, tuning_dir / f.name)
                tuning["database"] = f"tuning/{artifact.name}"
            artifact_entries.append(
                {
                    "name": artifact.name,
                    "profile": artifact.profile,
                    "family": artifact.family,
                    "target": artifact.target,
                    "requires": artifact.requires,
                    "file": rel,
                    "sha256": sha256_file(staging / rel),
                    "precision": artifact.precision,
                    "weights": artifact.weights,
                    "code_form": artifact.code_form,
                    "tuning": tuning,
                    "parity": artifact.parity,
                    "latency": artifact.latency,
                    "fallback": artifact.fallback,
                }
            )
        if tokenizer_dir is not None:
            (staging / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, staging / "tokenizer" / name)
        files = {
            str(p.relative_to(staging)): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tools": tool_versions(),
            "model": model_info,
            "export_parity": export_parity or {},
            "buckets": buckets,
            "weights": weight_entries,
            "artifacts": artifact_entries,
            "accuracy_gate": accuracy_gate,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check_staged is not None:
            fields = check_staged(staging)
            for entry in artifact_entries:
                entry.update(fields.get(entry["name"], {}))
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if evaluate is not None:
            records = evaluate(staging)
            for entry in artifact_entries:
                if entry["name"] in records:
                    entry["accuracy"] = records[entry["name"]]
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(staging)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            if not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
                raise BundleError(
                    f"{out_dir} exists and is not a tvmdeploy bundle; refusing to replace it "
                    "(choose another -o path or remove it)"
                )
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        what_to_do = "free disk space" if full else "check the path and its permissions"
        raise BundleError(
            f"could not write the bundle {out_dir}: {err.strerror or err} "
            f"({err.filename or 'while packaging'}); nothing was written there. "
            f"{what_to_do.capitalize()} or choose another -o path, then compile again"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _recover(out_dir: Path) -> None:
    """Clean up after packaging runs that were killed: remove their staging directories, and put
    back a previous bundle a run had moved aside just before it died."""
    for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, pid = leftover.name.removeprefix(f".{out_dir.name}.").partition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists() and (leftover / MANIFEST).is_file():
            os.replace(leftover, out_dir)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
