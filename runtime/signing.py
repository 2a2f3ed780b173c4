"""Signed bundles: an Ed25519 signature over the manifest, so a device runs only what it trusts.

The manifest already holds the sha256 of every file in the bundle, and the runtime checks a
file's sha256 before it reads it; signing the manifest's exact bytes therefore covers every file.
A device that is given trusted public keys (`load(..., trusted_keys=[...])` or
`TVMDEPLOY_TRUSTED_KEYS`) refuses, before any library is opened, a bundle that is unsigned,
signed by another key, or changed after signing. Ed25519 comes from `cryptography` (imported only
when a key or signature is used, so `import tvmdeploy.runtime` stays light).

`signature.json` sits beside the manifest (it cannot be inside what it signs, and it is not in
the manifest's `files`, so checksums ignore it):
    {"format": "tvmdeploy.signature", "version": 2, "algorithm": "ed25519",
     "signed_file": "manifest.json", "key_id": "<16 hex>", "fingerprint": "<64 hex>",
     "public_key": "<64 hex>", "signature": "<128 hex>"}
`fingerprint` is the sha256 of the raw 32-byte public key and `key_id` its first 16 digits. The
signed message is `b"tvmdeploy.signature/2\\n" + fingerprint + b"\\n" + manifest bytes`, so a
signature names its key and cannot be replayed as a signature over anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .atomic import write_json_atomic
from .errors import BundleError, OptionError, SignatureError

SIGNATURE_FILE = "signature.json"
#: The bundle file a signature covers (bundle.py reads the same name from here).
MANIFEST = "manifest.json"
FORMAT = "tvmdeploy.signature"
VERSION = 2
#: os.pathsep-separated public key files (or hex keys) a process trusts, when `load` is given none.
TRUSTED_KEYS_ENV = "TVMDEPLOY_TRUSTED_KEYS"
_DOMAIN = b"tvmdeploy.signature/2\n"
_HEX = frozenset("0123456789abcdefABCDEF")

#: SignatureStatus.state values.
UNSIGNED, VALID, TRUSTED, INVALID = "unsigned", "valid", "trusted", "invalid"


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


def fingerprint(public_raw: bytes) -> str:
    """A public key's fingerprint: the sha256 (64 hex digits) of its raw 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()


def key_id(public_raw: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its fingerprint."""
    return fingerprint(public_raw)[:16]


def _message(public_raw: bytes, manifest_bytes: bytes) -> bytes:
    return _DOMAIN + fingerprint(public_raw).encode("ascii") + b"\n" + manifest_bytes


def _is_hex(text: str, digits: int) -> bool:
    return len(text) == digits and set(text) <= _HEX


class KeyPair(NamedTuple):
    private: Path
    public: Path
    key_id: str


@dataclass(frozen=True)
class SignatureStatus:
    """What a bundle's signature says.

    state: `unsigned`; `valid` (a correct signature over this manifest by `key_id`, whose trust
    was not checked); `trusted` (valid, and by one of the trusted keys); `invalid` (malformed, by
    an untrusted key, or the manifest changed after signing: `detail` says which).
    """

    state: str
    key_id: str | None = None
    fingerprint: str | None = None
    detail: str = ""

    @property
    def signed(self) -> bool:
        return self.state != UNSIGNED

    def describe(self) -> str:
        """One line for `inspect`."""
        if self.state == UNSIGNED:
            return "unsigned"
        if self.state == TRUSTED:
            return f"signed by trusted key {self.key_id}"
        if self.state == VALID:
            return f"signed by key {self.key_id} (not checked against trusted keys)"
        return f"INVALID: {self.detail}"


def generate_keypair(
    private_path: str | Path, public_path: str | Path | None = None, *, encoding: str = "pem"
) -> KeyPair:
    """Write a new Ed25519 private key (mode 0600) and its public key (default: PRIVATE.pub);
    returns the paths and the key id. `encoding` is "pem" (PKCS8 / SubjectPublicKeyInfo) or "hex"
    (the raw 32 bytes as 64 hex digits). Refuses to overwrite either file."""
    if encoding not in ("pem", "hex"):
        raise OptionError(f"key encoding must be 'pem' or 'hex', not {encoding!r}")
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    if private_path.resolve() == public_path.resolve():
        raise OptionError(f"{private_path}: the private and public key need different files")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise OptionError(f"{path} exists; refusing to overwrite a key (choose another path)")
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if encoding == "pem":
        private_data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_data = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private_data, public_data = (seed.hex() + "\n").encode(), (raw.hex() + "\n").encode()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(private_path, private_data, 0o600)
    try:
        _write_new(public_path, public_data, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPair(private_path, public_path, key_id(raw))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never replacing a file, nor following a link there) with `mode`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise OptionError(f"{path} exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; never added any
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def load_public_key(key: str | Path) -> bytes:
    """The raw 32-byte Ed25519 public key from a PEM or hex file, or from the key itself (64 hex
    digits, or PEM text)."""
    ed25519, serialization, _ = _crypto()
    text = str(key).strip()
    if _is_hex(text, 64):
        return bytes.fromhex(text)
    if text.startswith("-----BEGIN"):
        data, where = text.encode(), "the public key given"
    else:
        try:
            data, where = Path(text).read_bytes(), text
        except OSError as err:
            raise OptionError(f"cannot read public key {text}: {err.strerror}") from None
        stripped = data.strip()
        if _is_hex(stripped.decode("ascii", "replace"), 64):
            return bytes.fromhex(stripped.decode())
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise OptionError(f"{where} is not an Ed25519 public key (PEM or 64 hex digits)") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise OptionError(f"{where} is not an Ed25519 public key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file (unencrypted PKCS8) or a file of 64 hex digits."""
    ed25519, serialization, _ = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise OptionError(f"cannot read the private key {path}: {err.strerror}") from None
    stripped = data.strip().decode("ascii", "replace")
    if _is_hex(stripped, 64):
        return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(stripped))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise OptionError(f"cannot read the Ed25519 private key {path}: {err}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise OptionError(f"{path} is not an Ed25519 private key (make one: tvmdeploy keygen)")
    return key


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> dict[str, Any]:
    """Sign `bundle_dir/manifest.json` with the private key; writes `signature.json` atomically
    (replacing an earlier signature) and returns its record.

    Sign only a bundle that is whole: the caller checks it first (`Bundle(dir).verify()`).
    """
    _, serialization, _ = _crypto()
    bundle_dir = Path(bundle_dir)
    manifest_bytes = _manifest_bytes(bundle_dir)
    key = load_private_key(private_key_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "algorithm": "ed25519",
        "signed_file": MANIFEST,
        "key_id": key_id(raw),
        "fingerprint": fingerprint(raw),
        "public_key": raw.hex(),
        "signature": key.sign(_message(raw, manifest_bytes)).hex(),
    }
    write_json_atomic(bundle_dir / SIGNATURE_FILE, record, indent=2)
    return record


def read_signature(bundle_dir: str | Path) -> dict[str, Any] | None:
    """The bundle's signature record, None when unsigned; a malformed one is a SignatureError."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        record = json.loads(path.read_bytes())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError("not a tvmdeploy signature")
        if record.get("version") != VERSION or record.get("algorithm") != "ed25519":
            raise ValueError(
                f"version {record.get('version')} / {record.get('algorithm')}, this runtime "
                f"reads version {VERSION} / ed25519"
            )
        public, signature = record["public_key"], record["signature"]
        if not (_is_hex(public, 64) and _is_hex(signature, 128)):
            raise ValueError("public_key or signature is not hex of the right length")
        raw = bytes.fromhex(public)
        if record.get("fingerprint") != fingerprint(raw) or record.get("key_id") != key_id(raw):
            raise ValueError("fingerprint or key_id does not match the public key")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SignatureError(
            f"{path}: unreadable signature ({err}); re-sign the bundle with `tvmdeploy sign`"
        ) from None
    return record


def trusted_keys_from_env() -> list[str]:
    """The public keys named by `$TVMDEPLOY_TRUSTED_KEYS` (os.pathsep-separated)."""
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [k for k in value.split(os.pathsep) if k.strip()]


def _check(record: dict[str, Any], manifest_bytes: bytes) -> bool:
    ed25519, _, invalid_signature = _crypto()
    raw = bytes.fromhex(record["public_key"])
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(
            bytes.fromhex(record["signature"]), _message(raw, manifest_bytes)
        )
    except invalid_signature:
        return False
    return True


def verify_manifest(
    bundle_dir: str | Path, manifest_bytes: bytes, trusted_keys: Iterable[str | Path]
) -> SignatureStatus:
    """Check `manifest_bytes` against the bundle's signature and the trusted keys; returns the
    `trusted` status (signer's key id and fingerprint).

    Raises SignatureError for an unsigned bundle, a bundle signed by a key that is not trusted, or
    a manifest that changed after signing; OptionError for an unreadable key or no keys.
    """
    bundle_dir = Path(bundle_dir)
    trusted = {load_public_key(k) for k in trusted_keys}
    if not trusted:
        raise OptionError("no trusted public keys given")
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
            f"keys ({', '.join(sorted(key_id(k) for k in trusted))}); refusing to load it"
        )
    if not _check(record, manifest_bytes):
        raise SignatureError(
            f"{bundle_dir}: manifest.json changed after it was signed by key {key_id(public_raw)}; "
            "the bundle was tampered with or rebuilt: re-sign it or get the original"
        )
    return SignatureStatus(TRUSTED, key_id(public_raw), fingerprint(public_raw))


def _manifest_bytes(bundle_dir: Path) -> bytes:
    try:
        return (bundle_dir / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: not a bundle, {MANIFEST} is missing") from None
    except OSError as err:
        raise BundleError(
            f"{bundle_dir / MANIFEST}: unreadable manifest ({err.strerror})"
        ) from None


def verify_signature(bundle_dir: str | Path, trusted_keys: Iterable[str | Path]) -> SignatureStatus:
    """`verify_manifest` on the bundle's manifest as it is on disk now (raises SignatureError)."""
    bundle_dir = Path(bundle_dir)
    return verify_manifest(bundle_dir, _manifest_bytes(bundle_dir), trusted_keys)


def signature_status(bundle: Any) -> SignatureStatus:
    """What the signature of `bundle` (a `Bundle`, or a bundle directory) says, without trusted
    keys: unsigned, valid (by the key it names) or invalid (malformed, or the manifest changed
    after signing). Never raises SignatureError; a valid signature proves who signed only once
    its key is checked against trusted ones (`verify_signature`)."""
    bundle_dir = Path(getattr(bundle, "path", bundle))
    manifest_bytes = getattr(bundle, "manifest_bytes", None)
    if manifest_bytes is None:
        manifest_bytes = _manifest_bytes(bundle_dir)
    try:
        record = read_signature(bundle_dir)
    except SignatureError as err:
        return SignatureStatus(INVALID, detail=str(err))
    if record is None:
        return SignatureStatus(UNSIGNED)
    ident, fp = record["key_id"], record["fingerprint"]
    if not _check(record, manifest_bytes):
        return SignatureStatus(
            INVALID,
            ident,
            fp,
            f"manifest.json changed after it was signed by key {ident}; re-sign the bundle",
        )
    return SignatureStatus(VALID, ident, fp)
