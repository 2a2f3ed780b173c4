"""Bundles are written atomically: an interrupted write leaves the old bundle or nothing."""

import json
import shutil

import pytest
from tvmdeploy.compiler.package import ArtifactEntry, write_bundle
from tvmdeploy.runtime import Bundle, BundleError


def rewrite(src, out, lib_path=None):
    """Write a bundle from an existing one's parts (the packaging stage alone)."""
    b = Bundle(src)
    a = b.artifacts[0]
    weights = b.manifest["weights"]["float32"]
    entry = ArtifactEntry(
        a.profile, a.family, a.target, a.requires, lib_path or src / a.file, parity=a.parity
    )
    return write_bundle(
        out,
        src / "model.onnx",
        {"float32": (weights["names"], (src / weights["file"]).read_bytes())},
        [entry],
        b.model,
        b.manifest["buckets"],
        src / "tokenizer",
    )


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_bundle(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="missing-lib.so.*nothing was written there"):
        rewrite(tiny_bundle, tmp_path / "new.tvmd", lib_path=tmp_path / "missing-lib.so")
    assert not (tmp_path / "new.tvmd").exists()
    assert leftovers(tmp_path) == []


def test_failed_rewrite_keeps_the_old_bundle(tiny_bundle, tmp_path):
    target = shutil.copytree(tiny_bundle, tmp_path / "kept.tvmd")
    before = (target / "manifest.json").read_text()
    with pytest.raises(BundleError, match="missing-lib.so.*nothing was written there"):
        rewrite(tiny_bundle, target, lib_path=tmp_path / "missing-lib.so")
    assert (target / "manifest.json").read_text() == before
    Bundle(target).verify()
    assert leftovers(tmp_path) == []


def test_rewrite_replaces_whole_bundle(tiny_bundle, tmp_path):
    target = shutil.copytree(tiny_bundle, tmp_path / "replaced.tvmd")
    (target / "stale-file").write_text("from an older bundle")
    rewrite(tiny_bundle, target)
    assert not (target / "stale-file").exists()
    Bundle(target).verify()
    assert (
        json.loads((target / "manifest.json").read_text())["files"].keys()
        == json.loads((tiny_bundle / "manifest.json").read_text())["files"].keys()
    )


def test_refuses_to_replace_a_non_bundle_directory(tiny_bundle, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(BundleError, match="not a tvmdeploy bundle; refusing to replace it"):
        rewrite(tiny_bundle, precious)
    assert (precious / "thesis.tex").read_text() == "do not delete"
