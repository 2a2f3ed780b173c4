"""Fuzzing, bounded in time: manifests (random JSON and mutations of a real one) and model inputs
(random arrays, dtypes, shapes). The only allowed outcomes are success or a tvmdeploy error."""

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tvmdeploy.runtime import Bundle, load
from tvmdeploy.runtime.errors import TvmdeployError
from tvmdeploy.runtime.probe import probe
from tvmdeploy.runtime.select import select

DEVICE = probe()

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def scratch(tiny_bundle, tmp_path_factory):
    """A copy of the real bundle whose manifest each example overwrites."""
    return shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("fuzz") / "b.tvmd")


@pytest.fixture(scope="module")
def real_manifest(tiny_bundle):
    return json.loads((tiny_bundle / "manifest.json").read_text())


def open_bundle(folder, manifest_text: str) -> None:
    (folder / "manifest.json").write_text(manifest_text)
    try:
        bundle = Bundle(folder)
        bundle.verify()
        for artifact in bundle.artifacts:
            bundle.weights_entry(artifact.precision)
        select(bundle, DEVICE, onnxruntime_available=True)  # what load() does before any library
    except TvmdeployError:
        pass


@FUZZ
@given(JSON)
def test_random_json_manifests(scratch, document):
    open_bundle(scratch, json.dumps(document))


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_manifests(scratch, data):
    (scratch / "manifest.json").write_bytes(data)
    try:
        Bundle(scratch)
    except TvmdeployError:
        pass


def paths_in(document, prefix=()):
    """Every (path, value) leaf of a JSON document."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths_in(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths_in(value, (*prefix, index))
    yield prefix, document


@FUZZ
@given(data=st.data())
def test_mutated_real_manifests(scratch, real_manifest, data):
    """One field of the real manifest replaced by random JSON, or deleted."""
    document = copy.deepcopy(real_manifest)
    paths = [p for p, _ in paths_in(document) if p]
    path = data.draw(st.sampled_from(paths))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(JSON)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    open_bundle(scratch, json.dumps(document))


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


DTYPES = st.sampled_from(
    ["int64", "int32", "int8", "uint8", "uint64", "float32", "float64", "bool"]
)


@FUZZ
@given(
    arrays=st.dictionaries(
        st.sampled_from(["input_ids", "attention_mask", "token_type_ids", "other"]),
        hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)),
        max_size=3,
    )
)
def test_random_model_inputs(model, arrays):
    try:
        out = model(**arrays)
    except TvmdeployError:
        return
    logits = out["logits"]
    assert logits.shape == (arrays["input_ids"].shape[0], 2) and np.isfinite(logits).all()
