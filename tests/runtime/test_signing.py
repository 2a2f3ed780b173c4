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
from tvmdeploy.runtime.signing import TRUSTED_KEYS_ENV, generate_keypair, sign_bundle
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
    if (
        case == "library swapped"
    ):  # an attacker rewrites the library and its checksum, not the signature
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


def test_a_signed_bundle_whose_library_changed_fails_its_checksum(keys, bundle_copy):
    sign_bundle(bundle_copy, keys["mine"][0])
    replace_file(lib_of(bundle_copy), b"garbage")
    with pytest.raises(BundleError, match="is corrupt"):
        load(
            bundle_copy,
            trusted_keys=[keys["mine"][1]],
            artifact=Bundle(bundle_copy).artifacts[0].profile,
        )


@pytest.mark.parametrize(
    "bad_path", ["../outside/lib.so", "/etc/passwd", "artifacts/../../x", "link/lib.so"]
)
def test_manifest_paths_must_stay_inside_the_bundle(bad_path, bundle_copy, tmp_path):
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "lib.so").write_bytes(b"x")
    os.symlink(tmp_path / "outside", bundle_copy / "link")
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["artifacts"][0]["file"] = bad_path
    data["files"][bad_path] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        Bundle(bundle_copy)


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
