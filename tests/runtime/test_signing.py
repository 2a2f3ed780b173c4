"""Signed bundles and confined paths: a device refuses what it was not meant to run, before any
library is opened; `tvmdeploy verify` reports every check."""

import json
import os
import shutil

import pytest
from tvmdeploy.compiler.cli import app
from tvmdeploy.runtime import Bundle, BundleError, OptionError, SignatureError, load
from tvmdeploy.runtime.bundle import sha256_file
from tvmdeploy.runtime.check import all_ok, check_bundle
from tvmdeploy.runtime.signing import (
    SIGNATURE_FILE,
    TRUSTED_KEYS_ENV,
    generate_keypair,
    load_public_key,
    sign_bundle,
    signature_status,
    verify_signature,
)
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    mine = generate_keypair(folder / "mine.key")
    other = generate_keypair(folder / "other.key")
    return {"mine": mine, "other": other}


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b.tvmd")


def lib_of(bundle_dir):
    return bundle_dir / Bundle(bundle_dir).artifacts[0].file


def replace_file(path, data: bytes) -> None:
    """A new file at `path` (a new inode: a library mapped by this process stays intact, as it does
    when an attacker replaces a bundle's file; writing it in place would SIGBUS the mapping)."""
    path.unlink()
    path.write_bytes(data)


def test_keygen_writes_a_private_key_only_the_owner_reads(keys, tmp_path):
    private, public, key_id = keys["mine"]
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in public.read_bytes() and len(key_id) == 16
    with pytest.raises(OptionError, match="refusing to overwrite"):
        generate_keypair(private)
    with pytest.raises(OptionError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "new.key", public)
    assert not (tmp_path / "new.key").exists()
    hex_pair = generate_keypair(tmp_path / "h.key", tmp_path / "h.pub", encoding="hex")
    assert hex_pair.private.stat().st_mode & 0o777 == 0o600
    assert len(hex_pair.public.read_text().strip()) == 64


def test_keys_as_pem_or_hex_files_or_the_key_text_itself(keys, bundle_copy, tmp_path):
    """A hex key pair signs like a PEM one; a public key is accepted as a file or as its text."""
    pair = generate_keypair(tmp_path / "h.key", encoding="hex")
    record = sign_bundle(bundle_copy, pair.private)
    raw_hex = pair.public.read_text().strip()
    assert record["public_key"] == raw_hex and record["key_id"] == pair.key_id
    for key in (pair.public, str(pair.public), raw_hex):
        assert Bundle(bundle_copy, trusted_keys=[key]).signer == pair.key_id
    pem_text = keys["mine"][1].read_text()
    assert load_public_key(pem_text) == load_public_key(keys["mine"][1])
    with pytest.raises(OptionError, match="not an Ed25519 public key"):
        load_public_key(keys["mine"][0])  # the private PEM is refused where a public key goes


def test_signed_bundle_loads_with_its_key_and_through_the_environment(
    keys, bundle_copy, monkeypatch
):
    sign_bundle(bundle_copy, keys["mine"][0])
    model = load(bundle_copy, trusted_keys=[keys["mine"][1]])
    assert Bundle(bundle_copy, trusted_keys=[keys["mine"][1]]).signer == keys["mine"][2]
    assert model(input_ids=[[1, 2, 3]])["logits"].shape == (1, 2)
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join(str(k[1]) for k in keys.values()))
    assert Bundle(bundle_copy).signer == keys["mine"][2]


@pytest.mark.parametrize("case", ["unsigned", "other key", "manifest edited", "library swapped"])
def test_untrusted_bundles_are_refused_before_any_library_is_opened(case, keys, bundle_copy):
    if case != "unsigned":
        sign_bundle(bundle_copy, keys["other" if case == "other key" else "mine"][0])
    manifest = bundle_copy / "manifest.json"
    if case == "manifest edited":
        data = json.loads(manifest.read_text())
        data["model"]["name"] = "something else"
        manifest.write_text(json.dumps(data))
    if case == "library swapped":  # the library and its checksum rewritten, not the signature
        lib = lib_of(bundle_copy)
        replace_file(lib, b"\x7fELF not what was signed")
        data = json.loads(manifest.read_text())
        data["files"][str(lib.relative_to(bundle_copy))] = sha256_file(lib)
        manifest.write_text(json.dumps(data))
    expected = {
        "unsigned": "not signed",
        "other key": "not one of the trusted",
        "manifest edited": "changed after it was signed",
        "library swapped": "changed after it was signed",
    }[case]
    with pytest.raises(SignatureError, match=expected):
        Bundle(bundle_copy, trusted_keys=[keys["mine"][1]])  # reads only the manifest
    with pytest.raises(SignatureError, match=expected):
        load(bundle_copy, trusted_keys=[keys["mine"][1]])
    if case == "unsigned":
        assert load(bundle_copy).choice.artifact  # without trusted keys nothing changes


def test_signature_file_status_and_checksums(keys, bundle_copy):
    """signature.json: its format; the bundle's status before and after signing; checksums (which
    do not list it) still pass; a re-sign replaces it."""
    unsigned = Bundle(bundle_copy)
    assert not unsigned.signed and unsigned.signature.state == "unsigned"
    assert unsigned.signer is None and unsigned.signature.describe() == "unsigned"
    record = sign_bundle(bundle_copy, keys["mine"][0])
    assert json.loads((bundle_copy / SIGNATURE_FILE).read_text()) == record
    assert set(record) == {
        "format",
        "version",
        "algorithm",
        "signed_file",
        "key_id",
        "fingerprint",
        "public_key",
        "signature",
    }
    assert record["fingerprint"].startswith(record["key_id"]) and len(record["signature"]) == 128
    b = Bundle(bundle_copy)
    assert b.signed and b.signer is None  # no trusted keys: who signed is not proven
    assert b.signature.state == "valid" and b.signature.key_id == keys["mine"][2]
    assert SIGNATURE_FILE not in b.manifest["files"]
    b.verify()  # the signature beside the manifest is no unlisted-file problem
    load(bundle_copy, verify=True, trusted_keys=[keys["mine"][1]])
    trusted = Bundle(bundle_copy, trusted_keys=[keys["mine"][1]])
    assert trusted.signature.state == "trusted" and trusted.signer == keys["mine"][2]
    assert trusted.signer_fingerprint == record["fingerprint"]
    assert verify_signature(bundle_copy, [keys["mine"][1]]).key_id == keys["mine"][2]
    sign_bundle(bundle_copy, keys["other"][0])  # re-signing replaces the signature
    assert signature_status(bundle_copy).key_id == keys["other"][2]
    with pytest.raises(SignatureError, match="not one of the trusted"):
        verify_signature(bundle_copy, [keys["mine"][1]])


def test_a_signature_cannot_be_passed_off_as_another_keys(keys, bundle_copy):
    """The signed message holds the signer's fingerprint: naming another trusted key in
    signature.json (with a consistent fingerprint and id) breaks the signature."""
    sign_bundle(bundle_copy, keys["mine"][0])
    path = bundle_copy / SIGNATURE_FILE
    record = json.loads(path.read_text())
    copy = shutil.copytree(bundle_copy, bundle_copy.parent / "other.tvmd")
    theirs = sign_bundle(copy, keys["other"][0])
    record.update({k: theirs[k] for k in ("public_key", "fingerprint", "key_id")})
    path.write_text(json.dumps(record))
    both = [keys["mine"][1], keys["other"][1]]
    with pytest.raises(SignatureError, match="changed after it was signed"):
        Bundle(bundle_copy, trusted_keys=both)
    assert signature_status(bundle_copy).state == "invalid"


@pytest.mark.parametrize(
    "content", ["{not json", '{"format": "tvmdeploy.signature", "version": 1}', "[]"]
)
def test_malformed_signature_is_refused(content, keys, bundle_copy):
    sign_bundle(bundle_copy, keys["mine"][0])
    (bundle_copy / SIGNATURE_FILE).write_text(content)
    with pytest.raises(SignatureError, match="unreadable signature"):
        Bundle(bundle_copy, trusted_keys=[keys["mine"][1]])
    status = Bundle(bundle_copy).signature
    assert status.state == "invalid" and "unreadable signature" in status.describe()


def test_the_environment_cannot_be_bypassed_by_an_empty_key_list(keys, bundle_copy, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["mine"][1]))
    for trusted in (None, [], ()):
        with pytest.raises(SignatureError, match="not signed"):
            Bundle(bundle_copy, trusted_keys=trusted)
    with pytest.raises(SignatureError, match="not signed"):
        load(bundle_copy)
    assert not Bundle(bundle_copy, check_signature=False).signed  # what `verify` reads it with
    rows = check_bundle(bundle_copy)  # the environment's keys are the ones verify checks
    assert rows[0].status == "failed" and "not signed" in rows[0].detail
    assert not all_ok(rows) and not any(r.what.startswith("parity") for r in rows)


def test_a_signed_bundle_whose_library_changed_fails_its_checksum(keys, bundle_copy):
    sign_bundle(bundle_copy, keys["mine"][0])
    replace_file(lib_of(bundle_copy), b"garbage")
    with pytest.raises(BundleError, match="is corrupt"):
        load(
            bundle_copy,
            trusted_keys=[keys["mine"][1]],
            artifact=Bundle(bundle_copy).artifacts[0].profile,
        )


def test_verify_checks_signature_checksums_and_parity(keys, bundle_copy):
    sign_bundle(bundle_copy, keys["mine"][0])
    rows = check_bundle(bundle_copy, [keys["mine"][1]])
    assert all_ok(rows) and rows[0].what == "signature" and rows[0].status == "ok"
    parity = [r for r in rows if r.what.startswith("parity")]
    assert parity and all(r.status == "ok" and "max abs diff" in r.detail for r in parity)
    assert sum(r.what.startswith("sha256") for r in rows) == len(
        Bundle(bundle_copy).manifest["files"]
    )
    replace_file(lib_of(bundle_copy), b"tampered")
    rows = check_bundle(bundle_copy, [keys["mine"][1]])
    assert not all_ok(rows)
    assert [r.status for r in rows if "lib.so" in r.what] == ["failed"]
    assert not any(r.what.startswith("parity") for r in rows)  # no code is loaded from it


def test_verify_without_keys_unsigned_tampered_and_unsafe(keys, bundle_copy):
    """Without keys: unsigned is not a failure, a signature is still checked against the key it
    names; a manifest naming a path outside the bundle is one failed row, not an exception."""
    rows = check_bundle(bundle_copy)
    assert all_ok(rows) and (rows[0].status, rows[0].detail.split()[0]) == ("not-run", "unsigned")
    assert any(r.what.startswith("parity") and r.status == "ok" for r in rows)
    sign_bundle(bundle_copy, keys["mine"][0])
    rows = check_bundle(bundle_copy)
    assert rows[0].status == "not-run" and keys["mine"][2] in rows[0].detail
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["artifacts"][0]["file"] = "../../elsewhere/lib.so"
    manifest.write_text(json.dumps(data))
    rows = check_bundle(bundle_copy)
    assert [(r.what, r.status) for r in rows] == [("signature", "failed"), ("manifest", "failed")]
    assert "changed after it was signed" in rows[0].detail and "unsafe" in rows[1].detail
    rows = check_bundle(bundle_copy, ["0" * 64])
    assert rows[0].status == "failed"
    with pytest.raises(BundleError, match="no such bundle"):
        check_bundle(bundle_copy.parent / "absent.tvmd")


def test_cli_keygen_sign_verify_inspect(bundle_copy, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["keygen", str(tmp_path / "k.key")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["inspect", str(bundle_copy)]).output.count("unsigned") == 1
    result = runner.invoke(app, ["sign", str(bundle_copy), "--key", str(tmp_path / "k.key")])
    assert result.exit_code == 0 and "signed" in result.output
    assert "signature: signed by key" in runner.invoke(app, ["inspect", str(bundle_copy)]).output
    good = runner.invoke(
        app, ["verify", str(bundle_copy), "--key", str(tmp_path / "k.pub"), "--json"]
    )
    assert good.exit_code == 0 and all(r["status"] != "failed" for r in json.loads(good.output))
    wrong = runner.invoke(app, ["verify", str(bundle_copy), "--key", "0" * 64])
    assert wrong.exit_code == 1 and "failed" in wrong.output
