"""Reading a bundle (`NAME.tvmd/`): the manifest, its artifacts and file checksums.

The compiler writes bundles (compiler/package.py); this module only reads them, so the runtime
can check a bundle without TVM's compiler. Every file is checked against the manifest's sha256
before it is used: a truncated or altered file is a BundleError, never a crash in TVM.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT = "tvmdeploy.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bucket:
    """One static shape the bundle was compiled for: a Relax function per bucket."""

    function: str
    batch: int
    seq: int


@dataclass(frozen=True)
class Artifact:
    """One compiled code artifact, as the manifest states it."""

    profile: str
    family: str
    target: dict[str, Any]
    requires: dict[str, Any]
    file: str
    sha256: str
    precision: str
    code_form: str
    tuning: dict[str, Any]
    parity: dict[str, Any]
    latency: list[dict[str, Any]]

    @property
    def is_gpu(self) -> bool:
        return self.family == "cuda"

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Artifact:
        return cls(
            profile=entry["profile"],
            family=entry.get("family", "cuda" if "cuda_arch" in entry["requires"] else "cpu"),
            target=entry["target"],
            requires=entry["requires"],
            file=entry["file"],
            sha256=entry["sha256"],
            precision=entry.get("precision", "float32"),
            code_form=entry.get("code_form", "shared-library"),
            tuning=entry.get("tuning", {}),
            parity=entry.get("parity", {}),
            latency=entry.get("latency", []),
        )


class Bundle:
    """A bundle directory with a validated manifest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(f"{self.path}: no such bundle directory (compile one with `tvmdeploy compile`)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise BundleError(f"{self.path}: not a bundle, {MANIFEST} is missing") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{manifest_path}: unreadable manifest ({err}); recompile the bundle") from None
        if self.manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path}: not a tvmdeploy manifest (format={self.manifest.get('format')!r})")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{self.path}: bundle format version {version}, this runtime reads version "
                f"{FORMAT_VERSION}; recompile it or use a matching tvmdeploy"
            )
        try:
            self.artifacts = [Artifact.from_manifest(a) for a in self.manifest["artifacts"]]
            self.buckets = sorted(
                (Bucket(b["function"], int(b["batch"]), int(b["seq"])) for b in self.manifest["buckets"]),
                key=lambda b: (b.batch * b.seq, b.seq, b.batch),
            )
            self.inputs: list[dict[str, Any]] = self.manifest["model"]["inputs"]
            self.outputs: list[dict[str, Any]] = self.manifest["model"]["outputs"]
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{manifest_path}: manifest lacks a required field ({err!r}); recompile") from None

    @property
    def name(self) -> str:
        return self.manifest["model"].get("name", self.path.stem)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @cached_property
    def identity(self) -> str:
        """A content hash of the manifest: names this bundle in local caches."""
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()[:16]

    def file(self, relative: str) -> Path:
        """A bundle file, checked against its sha256 in the manifest before it is returned."""
        expected = self.manifest.get("files", {}).get(relative)
        path = self.path / relative
        if expected is None:
            raise BundleError(f"{self.path}: manifest lists no checksum for {relative}")
        if not path.is_file():
            raise BundleError(f"{self.path}: {relative} is missing; the bundle is incomplete, recompile it")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{self.path}: {relative} is corrupt (sha256 {actual[:12]}…, manifest says "
                f"{expected[:12]}…); recompile or re-copy the bundle"
            )
        return path

    def verify(self) -> None:
        """Check every file in the manifest; raises BundleError on the first bad one."""
        for relative in self.manifest.get("files", {}):
            self.file(relative)

    def artifact(self, profile: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.profile == profile:
                return artifact
        known = ", ".join(a.profile for a in self.artifacts) or "none"
        raise BundleError(f"{self.path}: no artifact for profile {profile!r} (artifacts: {known})")

    def weights_entry(self, precision: str) -> dict[str, Any]:
        try:
            return self.manifest["weights"][precision]
        except KeyError:
            raise BundleError(f"{self.path}: no {precision} weights in the bundle") from None
