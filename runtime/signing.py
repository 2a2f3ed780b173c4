"""Signed bundles: an Ed25519 signature over the manifest, so a device runs only what it trusts.

The manifest already holds the sha256 of every file in the bundle, and the runtime checks a
file's sha256 before it reads it; signing the manifest's exact bytes therefore covers every file.
A device that is given trusted public keys (`load(..., trusted_keys=[...])` or
`TVMDEPLOY_TRUSTED_KEYS`) refuses, before any library is opened, a bundle that is unsigned,
signed by another key, or changed after signing. Ed25519 comes from `cryptography`.

`signature.json` sits beside the manifest (it cannot be inside what it signs):
    {"format": "tvmdeploy.signature", "version": 1, "algorithm": "ed25519",
     "key_id": "<16 hex>", "public_key": "<64 hex>", "signature": "<128 hex>"}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .atomic import write_json_atomic
from .errors import BundleError, OptionError, SignatureError

SIGNATURE_FILE = "signature.json"
FORMAT = "tvmdeploy.signature"
VERSION = 1
#: os.pathsep-separated public key files (or hex keys) a process trusts, when `load` is given none.
TRUSTED_KEYS_ENV = "TVMDEPLOY_TRUSTED_KEYS"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency of the package
        raise OptionError(
            "signatures need the `cryptography` package (pip install cryptography)"
        ) from None
    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_keypair(
    private_path: str | Path, public_path: str | Path | None = None
) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key (PEM); returns the paths
    and the key id. Refuses to overwrite either file."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise OptionError(f"{path} exists; refusing to overwrite a key (choose another path)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_path, public_path, key_id(raw)


def load_public_key(key: str | Path) -> bytes:
    """The raw 32-byte Ed25519 public key from a PEM file, a file of 64 hex digits, or the hex."""
    ed25519, serialization, _ = _crypto()
    text = str(key).strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OptionError(f"cannot read public key {path}: {err.strerror}") from None
    stripped = data.strip()
    if len(stripped) == 64:
        try:
            return bytes.fromhex(stripped.decode())
        except ValueError:
            pass
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        raise OptionError(f"{path} is not an Ed25519 public key (PEM or 64 hex digits)") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise OptionError(f"{path} is not an Ed25519 public key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> dict:
    """Sign `bundle_dir/manifest.json` with the private key; writes `signature.json` atomically."""
    ed25519, serialization, _ = _crypto()
    bundle_dir = Path(bundle_dir)
    manifest = bundle_dir / "manifest.json"
    try:
        manifest_bytes = manifest.read_bytes()
    except OSError:
        raise BundleError(f"{bundle_dir}: not a bundle, manifest.json is missing") from None
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise OptionError(
            f"cannot read the Ed25519 private key {private_key_path}: {err}"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise OptionError(
            f"{private_key_path} is not an Ed25519 private key (make one: tvmdeploy keygen)"
        )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "algorithm": "ed25519",
        "key_id": key_id(raw),
        "public_key": raw.hex(),
        "signature": key.sign(manifest_bytes).hex(),
    }
    write_json_atomic(bundle_dir / SIGNATURE_FILE, record, indent=2)
    return record


def read_signature(bundle_dir: Path) -> dict | None:
    """The bundle's signature record, None when unsigned; a malformed one is a SignatureError."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or record.get("algorithm") != "ed25519":
            raise ValueError("not a tvmdeploy Ed25519 signature")
        bytes.fromhex(record["public_key"]), bytes.fromhex(record["signature"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SignatureError(f"{path}: unreadable signature ({err}); re-sign the bundle") from None
    return record


def trusted_keys_from_env() -> list[str]:
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [k for k in value.split(os.pathsep) if k.strip()]


def verify_manifest(
    bundle_dir: Path, manifest_bytes: bytes, trusted_keys: Iterable[str | Path]
) -> str:
    """Check `manifest_bytes` against the bundle's signature and the trusted keys; returns the
    signer's key id.

    Raises SignatureError for an unsigned bundle, a bundle signed by a key that is not trusted, or
    a manifest that changed after signing.
    """
    ed25519, _, invalid_signature = _crypto()
    trusted = {load_public_key(k) for k in trusted_keys}
    if not trusted:
        raise OptionError("no trusted keys given")
    record = read_signature(bundle_dir)
    if record is None:
        raise SignatureError(
            f"{bundle_dir}: the bundle is not signed, and this process trusts only signed bundles; "
            "sign it with `tvmdeploy sign BUNDLE --key PRIVATE_KEY`"
        )
    public_raw = bytes.fromhex(record["public_key"])
    if public_raw not in trusted:
        raise SignatureError(
            f"{bundle_dir}: signed by key {key_id(public_raw)}, which is not one of the trusted "
            "keys "
            f"({', '.join(sorted(key_id(k) for k in trusted))}); refusing to load it"
        )
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(
            bytes.fromhex(record["signature"]), manifest_bytes
        )
    except invalid_signature:
        raise SignatureError(
            f"{bundle_dir}: manifest.json changed after it was signed by key {key_id(public_raw)}; "
            "the bundle was tampered with or rebuilt: re-sign it or get the original"
        ) from None
    return key_id(public_raw)
