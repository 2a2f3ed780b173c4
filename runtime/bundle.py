"""Reading a bundle (`NAME.tvmd/`): the manifest, its artifacts and file checksums.

The compiler writes bundles (compiler/package.py); this module only reads them, so the runtime
can check a bundle without TVM's compiler. Every file is checked against the manifest's sha256
before it is used: a truncated or altered file is a BundleError, never a crash in TVM. Every path
the manifest names must stay inside the bundle (no absolute paths, `..` or symlinks leading out),
checked when the manifest is read. A bundle may be signed (runtime/signing.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError
from .precision import DEFAULT_ACCURACY_GATE, PRECISIONS, artifact_name
from .signing import (
    MANIFEST,
    SIGNATURE_FILE,
    SignatureStatus,
    signature_status,
    trusted_keys_from_env,
    verify_manifest,
)

FORMAT = "tvmdeploy.bundle"
FORMAT_VERSION = 1


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
    name: str = ""  # unique in the bundle: the profile, plus the precision unless fp32
    weights: str = "float32"  # which weights entry it reads (int8 quantizes fp32 at load)
    accuracy: dict[str, Any] | None = None  # task accuracy against fp32, where measured
    fallback: bool = False  # holds the bundle's symbolic-length function (Bundle.fallback)

    @property
    def is_gpu(self) -> bool:
        return self.family == "cuda"

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Artifact:
        precision = entry.get("precision", "float32")
        return cls(
            profile=entry["profile"],
            family=entry.get("family", "cuda" if "cuda_arch" in entry["requires"] else "cpu"),
            target=entry["target"],
            requires=entry["requires"],
            file=entry["file"],
            sha256=entry["sha256"],
            precision=precision,
            code_form=entry.get("code_form", "shared-library"),
            tuning=entry.get("tuning", {}),
            parity=entry.get("parity", {}),
            latency=entry.get("latency", []),
            name=entry.get("name") or artifact_name(entry["profile"], precision),
            weights=entry.get("weights", precision),
            accuracy=entry.get("accuracy"),
            fallback=bool(entry.get("fallback", False)),
        )


def _check_fields(manifest: dict[str, Any], where: Path) -> None:
    """Every manifest field the runtime reads has the type it expects (a BundleError otherwise),
    so a damaged or hostile manifest fails here, not deep inside with a TypeError."""

    def bad(field: str, expected: str) -> BundleError:
        return BundleError(
            f"{where}: manifest field {field} is not {expected}; recompile the bundle"
        )

    def need(value: Any, kind: type | tuple[type, ...], field: str, expected: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise bad(field, expected)
        return value

    files = need(manifest.get("files"), dict, "files", "a map of path to sha256")
    for relative, digest in files.items():
        need(digest, str, f"files[{relative!r}]", "a sha256 string")
    model = need(manifest.get("model"), dict, "model", "an object")
    need(model.get("vocab_size"), int, "model.vocab_size", "an integer")
    for key in ("inputs", "outputs"):
        for k, spec in enumerate(need(model.get(key), list, f"model.{key}", "a list")):
            need(
                need(spec, dict, f"model.{key}[{k}]", "an object").get("name"),
                str,
                f"model.{key}[{k}].name",
                "a string",
            )
            need(spec.get("axes", []), list, f"model.{key}[{k}].axes", "a list")
    fallback = need(model.get("fallback") or {}, dict, "model.fallback", "an object")
    if fallback:
        need(fallback.get("function"), str, "model.fallback.function", "a string")
        if need(fallback.get("max_seq"), int, "model.fallback.max_seq", "an integer") < 1:
            raise bad("model.fallback.max_seq", "positive")
    for k, bucket in enumerate(need(manifest.get("buckets"), list, "buckets", "a list")):
        need(bucket, dict, f"buckets[{k}]", "an object")
        need(bucket.get("function"), str, f"buckets[{k}].function", "a string")
        for key in ("batch", "seq"):
            if need(bucket.get(key), int, f"buckets[{k}].{key}", "an integer") < 1:
                raise bad(f"buckets[{k}].{key}", "positive")
    for precision, entry in need(manifest.get("weights"), dict, "weights", "an object").items():
        need(entry, dict, f"weights.{precision}", "an object")
        need(entry.get("file"), str, f"weights.{precision}.file", "a string")
        names = need(entry.get("names"), list, f"weights.{precision}.names", "a list")
        for name in names:
            need(name, str, f"weights.{precision}.names[]", "a list of strings")
    for k, entry in enumerate(need(manifest.get("artifacts"), list, "artifacts", "a list")):
        need(entry, dict, f"artifacts[{k}]", "an object")
        for key in ("profile", "file", "sha256"):
            need(entry.get(key), str, f"artifacts[{k}].{key}", "a string")
        for key in ("precision", "family", "code_form", "name", "weights"):
            need(entry.get(key, ""), str, f"artifacts[{k}].{key}", "a string")
        if entry.get("precision", "float32") not in PRECISIONS.values():
            raise bad(f"artifacts[{k}].precision", f"one of {', '.join(PRECISIONS.values())}")
        accuracy = need(entry.get("accuracy") or {}, dict, f"artifacts[{k}].accuracy", "an object")
        for key in ("value", "fp32", "agreement"):
            if accuracy.get(key) is not None:
                need(accuracy[key], (int, float), f"artifacts[{k}].accuracy.{key}", "a number")
        need(entry.get("fallback", False), bool, f"artifacts[{k}].fallback", "a boolean")
        for key in ("target", "requires"):
            need(entry.get(key), dict, f"artifacts[{k}].{key}", "an object")
        for key in ("tuning", "parity"):
            need(entry.get(key, {}), dict, f"artifacts[{k}].{key}", "an object")
        for m, item in enumerate(
            need(entry.get("latency", []), list, f"artifacts[{k}].latency", "a list")
        ):
            need(item, dict, f"artifacts[{k}].latency[{m}]", "an object")
            need(
                item.get("p50_ms", 0.0),
                (int, float),
                f"artifacts[{k}].latency[{m}].p50_ms",
                "a number",
            )
            need(
                item.get("fingerprint", ""),
                str,
                f"artifacts[{k}].latency[{m}].fingerprint",
                "a string",
            )
            for key in ("batch", "seq"):
                need(item.get(key, 0), int, f"artifacts[{k}].latency[{m}].{key}", "an integer")
        tolerance = entry.get("parity", {}).get("tolerance", {})
        for key, value in need(
            tolerance, dict, f"artifacts[{k}].parity.tolerance", "an object"
        ).items():
            need(value, (int, float), f"artifacts[{k}].parity.tolerance.{key}", "a number")
        requires = entry["requires"]
        need(requires.get("arch", ""), str, f"artifacts[{k}].requires.arch", "a string")
        need(requires.get("cuda_arch", 0), int, f"artifacts[{k}].requires.cuda_arch", "an integer")
        for feature in need(
            requires.get("cpu_features", []),
            list,
            f"artifacts[{k}].requires.cpu_features",
            "a list",
        ):
            need(feature, str, f"artifacts[{k}].requires.cpu_features[]", "a list of strings")


class Bundle:
    """A bundle directory with a validated manifest."""

    def __init__(
        self,
        path: str | Path,
        trusted_keys: Sequence[str | Path] | None = None,
        *,
        check_signature: bool = True,
    ):
        """Read and check the manifest; nothing else in the bundle is read here.

        With `trusted_keys` (public key files or keys; when none are given,
        `$TVMDEPLOY_TRUSTED_KEYS`), the bundle must carry a valid signature by one of them
        (runtime/signing.py), checked on the exact bytes parsed here: SignatureError otherwise.
        Every path the manifest names must stay inside the bundle: BundleError otherwise.
        `check_signature=False` skips the signature check (`tvmdeploy verify` reports it itself).
        """
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(
                f"{self.path}: no such bundle directory (compile one with `tvmdeploy compile`)"
            )
        try:
            outside = not manifest_path.resolve().is_relative_to(self.path.resolve())
        except (OSError, RuntimeError):
            outside = True
        if outside:
            raise BundleError(
                f"{manifest_path} leads out of the bundle (a symlink); the bundle is unsafe, "
                "rebuild it with `tvmdeploy compile`"
            )
        try:
            self.manifest_bytes = manifest_path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{self.path}: not a bundle, {MANIFEST} is missing") from None
        except OSError as err:
            raise BundleError(f"{manifest_path}: unreadable manifest ({err.strerror})") from None
        keys = (list(trusted_keys or ()) or trusted_keys_from_env()) if check_signature else []
        #: The signature checked against trusted keys here; None when none were given.
        self.verified_signature: SignatureStatus | None = (
            verify_manifest(self.path, self.manifest_bytes, keys) if keys else None
        )
        try:
            self.manifest: dict[str, Any] = json.loads(self.manifest_bytes)
        except (ValueError, UnicodeDecodeError) as err:
            raise BundleError(
                f"{manifest_path}: unreadable manifest ({err}); recompile the bundle"
            ) from None
        found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
        if found != FORMAT:
            raise BundleError(f"{manifest_path}: not a tvmdeploy manifest (format={found!r})")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{self.path}: bundle format version {version}, this runtime reads version "
                f"{FORMAT_VERSION}; recompile it or use a matching tvmdeploy"
            )
        _check_fields(self.manifest, manifest_path)
        try:
            self.artifacts = [Artifact.from_manifest(a) for a in self.manifest["artifacts"]]
            self.buckets = sorted(
                (
                    Bucket(b["function"], int(b["batch"]), int(b["seq"]))
                    for b in self.manifest["buckets"]
                ),
                key=lambda b: (b.batch * b.seq, b.seq, b.batch),
            )
            fallback = self.manifest["model"].get("fallback")
            #: The symbolic-length function (batch 1, `seq` = the longest it takes), run for
            #: inputs longer than the largest bucket by the artifacts that hold it.
            self.fallback: Bucket | None = (
                Bucket(fallback["function"], 1, int(fallback["max_seq"])) if fallback else None
            )
            self.inputs: list[dict[str, Any]] = self.manifest["model"]["inputs"]
            self.outputs: list[dict[str, Any]] = self.manifest["model"]["outputs"]
            paths = [*self.manifest["files"], *(a.file for a in self.artifacts)]
            paths += [w["file"] for w in self.manifest["weights"].values()]
            paths += [a.tuning["database"] for a in self.artifacts if "database" in a.tuning]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(
                f"{manifest_path}: manifest lacks a required field ({err!r}); recompile"
            ) from None
        for relative in paths:
            self._confined(relative)

    def _confined(self, relative: Any) -> Path:
        """`relative` as a path inside the bundle; anything that could leave it is refused."""
        inside = None
        text = relative if isinstance(relative, str) else ""
        if text and "\\" not in text and "\0" not in text:
            pure = PurePosixPath(relative)
            if pure.parts and not pure.is_absolute() and ".." not in pure.parts:
                try:
                    root = self.path.resolve()
                    inside = (root / pure).resolve()
                except (OSError, RuntimeError, ValueError):  # a symlink loop, for one
                    inside = None
                if inside is not None and not inside.is_relative_to(root):
                    inside = None
        if inside is None:
            raise BundleError(
                f"{self.path}: the manifest names {relative!r}, which is not a path inside the "
                "bundle (absolute, '..', or a symlink leading out); the bundle is unsafe, rebuild "
                "it with `tvmdeploy compile`"
            )
        return inside

    @property
    def signed(self) -> bool:
        """The bundle carries a signature (valid or not: see `signature`)."""
        path = self.path / SIGNATURE_FILE
        return path.exists() or path.is_symlink()

    @property
    def signer(self) -> str | None:
        """The key id of the trusted key that signed this bundle, when trusted keys were checked."""
        return self.verified_signature.key_id if self.verified_signature else None

    @property
    def signer_fingerprint(self) -> str | None:
        """The full fingerprint of the trusted signer, when trusted keys were checked."""
        return self.verified_signature.fingerprint if self.verified_signature else None

    @cached_property
    def signature(self) -> SignatureStatus:
        """What the signature says about the manifest read here: `trusted` when checked against
        trusted keys at load, else unsigned / valid (by the key it names) / invalid."""
        return self.verified_signature or signature_status(self)

    @property
    def name(self) -> str:
        return self.manifest["model"].get("name", self.path.stem)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @cached_property
    def identity(self) -> str:
        """A content hash of the manifest: names this bundle in local caches."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()[:16]

    def file(self, relative: str) -> Path:
        """A bundle file, checked against its sha256 in the manifest before it is returned."""
        expected = self.manifest.get("files", {}).get(relative)
        path = self._confined(relative)
        if expected is None:
            raise BundleError(f"{self.path}: manifest lists no checksum for {relative}")
        if not path.is_file():
            raise BundleError(
                f"{self.path}: {relative} is missing; the bundle is incomplete, recompile it"
            )
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

    def artifact(self, name: str) -> Artifact:
        """The artifact called `name` (a profile for fp32, `profile-int8` etc. otherwise)."""
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        known = ", ".join(a.name for a in self.artifacts) or "none"
        raise BundleError(f"{self.path}: no artifact {name!r} (artifacts: {known})")

    @property
    def accuracy_gate(self) -> float:
        """Accuracy points a reduced precision may lose and still be chosen by `auto`."""
        gate = self.manifest.get("accuracy_gate", DEFAULT_ACCURACY_GATE)
        return float(gate) if isinstance(gate, (int, float)) else DEFAULT_ACCURACY_GATE

    def weights_entry(self, precision: str) -> dict[str, Any]:
        try:
            return self.manifest["weights"][precision]
        except KeyError:
            raise BundleError(f"{self.path}: no {precision} weights in the bundle") from None
