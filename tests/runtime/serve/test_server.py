"""`tvmdeploy serve` over real sockets: a uvicorn server on a loopback port, the tiny compiled
BERT, and the clients users have (httpx, tritonclient.http, openai). Every answer is compared
with the model called directly, in the same process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
import uvicorn
from tvmdeploy.compiler.cli import app as cli
from tvmdeploy.runtime import Model, load
from tvmdeploy.runtime.serve import create_app
from tvmdeploy.runtime.serve import server as server_module
from tvmdeploy.runtime.signing import generate_keypair, sign_bundle
from typer.testing import CliRunner

TEXTS = ["A moving, beautifully acted film.", "Dull and far too long.", "fine"]
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """`app` on uvicorn in a thread on a free loopback port; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def token_rows(seed: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, seq), dtype=np.int64)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def v2_body(arrays: dict[str, np.ndarray]) -> dict:
    return {
        "inputs": [
            {"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
            for n, a in arrays.items()
        ]
    }


def logits_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def model(tiny_bundle) -> Model:
    return load(tiny_bundle)


@pytest.fixture(scope="module")
def embedding_model(tiny_bundle, tmp_path_factory) -> Model:
    """The tiny classifier relabelled as an embedding model (its two logits as the sentence
    vector): the same compiled code, served through the embedding path."""
    copy = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("emb") / "emb.tvmd")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["task"] = "feature-extraction"
    manifest["model"]["outputs"][0]["name"] = "sentence_embedding"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return load(copy)


@pytest.fixture(scope="module")
def url(model, embedding_model):
    app = create_app({"tiny": model, "emb": embedding_model}, max_batch_delay_ms=30)
    with running(app) as base:
        yield base


def test_health_metadata_and_json_infer_match_the_model(url, model):
    with httpx.Client(base_url=url) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/tiny/ready").json()["ready"] is True
        meta = client.get("/v2/models/tiny").json()
        assert [i["name"] for i in meta["inputs"]] == model.input_names
        assert all(i["datatype"] == "INT64" and i["shape"] == [-1, -1] for i in meta["inputs"])
        assert meta["outputs"][0]["name"] == "logits"
        arrays = token_rows(0, 2, 11)
        arrays["attention_mask"][1, 7:] = 0
        got = logits_of(client.post("/v2/models/tiny/infer", json=v2_body(arrays)))
    np.testing.assert_allclose(got, model(**arrays)["logits"], atol=ATOL, rtol=0)


def test_tritonclient_binary_and_json_tensors(url, model):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["name"] == "tiny"
    arrays = token_rows(1, 2, 20)
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    expected = model(**arrays)["logits"]
    binary = client.infer("tiny", inputs)  # no outputs named: all come back binary
    np.testing.assert_allclose(binary.as_numpy("logits"), expected, atol=ATOL, rtol=0)
    as_json = client.infer("tiny", inputs, outputs=[triton.InferRequestedOutput("logits", False)])
    np.testing.assert_allclose(as_json.as_numpy("logits"), expected, atol=ATOL, rtol=0)
    client.close()


def test_predict_gives_what_model_predict_gives(url, model, embedding_model):
    with httpx.Client(base_url=url) as client:
        body = client.post("/v2/models/tiny/predict", json={"text": TEXTS}).json()
        vectors = client.post("/v2/models/emb/predict", json={"text": TEXTS}).json()
    assert body["task"] == "text-classification"
    for got, want in zip(body["labels"], model.predict(TEXTS), strict=True):
        assert got["label"] == want.label and abs(got["score"] - want.score) < ATOL
    np.testing.assert_allclose(vectors["embeddings"], embedding_model.predict(TEXTS), atol=ATOL)


def test_concurrent_requests_each_get_their_own_rows_and_are_batched(url, model):
    # 16 callers at once, each with its own rows and length (one past the largest bucket).
    requests = [token_rows(100 + k, 1 + k % 2, 5 + k if k != 9 else 40) for k in range(16)]
    start = threading.Barrier(16)

    def call(arrays):
        with httpx.Client(base_url=url, timeout=30) as client:
            start.wait()
            return logits_of(client.post("/v2/models/tiny/infer", json=v2_body(arrays)))

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, requests))
    for arrays, got in zip(requests, answers, strict=True):
        np.testing.assert_allclose(got, model(**arrays)["logits"], atol=ATOL, rtol=0)
    text = httpx.get(f"{url}/metrics").text
    batches = float(re.search(r'tvmdeploy_batch_rows_count\{model="tiny"\} (\S+)', text)[1])
    single = float(
        re.search(r'tvmdeploy_batch_rows_bucket\{le="1.0",model="tiny"\} (\S+)', text)[1]
    )
    assert batches > single, "no batch held more than one row"
    assert 'tvmdeploy_requests_total{model="tiny",route="infer",status="200"}' in text
    assert "tvmdeploy_request_latency_seconds_bucket" in text and "tvmdeploy_queue_rows" in text


def test_4xx_bodies_name_the_problem(url):
    def infer(body, name="tiny"):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{url}/v2/models/{name}/infer", content=content)
        return response.status_code, response.json()["error"]

    good = v2_body(token_rows(2, 1, 4))
    status, message = infer(b'{"inputs": [')
    assert status == 400 and "malformed JSON" in message
    wrong_dtype = json.loads(json.dumps(good))
    wrong_dtype["inputs"][0]["datatype"] = "FP32"
    status, message = infer(wrong_dtype)
    assert status == 400 and "'input_ids'" in message and "FP32" in message
    wrong_shape = json.loads(json.dumps(good))
    wrong_shape["inputs"][0]["shape"] = [1, 5]
    status, message = infer(wrong_shape)
    assert status == 400 and "'input_ids'" in message and "needs 5 values" in message
    three_d = json.loads(json.dumps(good))
    three_d["inputs"][0]["shape"] = [1, 1, 4]
    assert "[batch, sequence]" in infer(three_d)[1]
    unknown = json.loads(json.dumps(good))
    unknown["inputs"][0]["name"] = "pixel_values"
    status, message = infer(unknown)
    assert status == 400 and "pixel_values" in message and "input_ids" in message
    status, message = infer(good, name="nope")
    assert status == 404 and "'nope'" in message and "tiny" in message
    status, message = infer(v2_body(token_rows(3, 1, 200)))
    assert status == 400 and "200" in message and "128" in message
    response = httpx.post(f"{url}/v2/models/tiny/predict", json={"texts": ["x"]})
    assert response.status_code == 400 and '"text"' in response.json()["error"]


def test_openai_client_lists_models_and_embeds(url, embedding_model):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny", "emb"}
    expected = embedding_model.predict(TEXTS)
    base64_default = client.embeddings.create(model="emb", input=TEXTS)
    floats = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    for result in (base64_default, floats):
        got = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model="tiny", input="hello")
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.embeddings.create(model="nope", input="hello")


def test_api_key_guards_every_route_but_health(model):
    with running(create_app({"tiny": model}, api_key="s3cret")) as base:
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        for path in ("/v2/models/tiny", "/metrics", "/v1/models"):
            assert httpx.get(base + path).status_code == 401
        wrong = httpx.get(f"{base}/v2/models/tiny", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "api key" in wrong.json()["error"]
        right = httpx.get(f"{base}/v2/models/tiny", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret").models.list().data


def test_full_queue_answers_429_with_retry_after(model):
    app = create_app({"tiny": model}, max_batch_delay_ms=400, max_queue=1)
    body = v2_body(token_rows(4, 1, 8))
    start = threading.Barrier(10)
    with running(app) as base:

        def call(_):
            with httpx.Client(base_url=base, timeout=30) as client:
                start.wait()
                return client.post("/v2/models/tiny/infer", json=body)

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(call, range(10)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and any(r.status_code == 200 for r in responses)
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert "--max-queue" in refused[0].json()["error"]
        assert all(r.status_code in (200, 429) for r in responses)
        assert httpx.post(f"{base}/v2/models/tiny/infer", json=body).status_code == 200


class _FailsOnId(Model):
    """The tiny model, except that a batch holding token id 7 raises."""

    def __call__(self, **inputs):
        if (inputs["input_ids"] == 7).any():
            raise RuntimeError("kernel exploded")
        return super().__call__(**inputs)


def test_a_failing_batch_answers_its_callers_and_the_server_goes_on(model):
    failing = _FailsOnId(model.bundle, model.engine, model.choice)
    poisoned = token_rows(5, 1, 6)
    poisoned["input_ids"][0, 3] = 7
    with running(create_app({"tiny": failing}, max_batch_delay_ms=0)) as base:
        bad = httpx.post(f"{base}/v2/models/tiny/infer", json=v2_body(poisoned))
        assert bad.status_code == 500 and "kernel exploded" in bad.json()["error"]
        good = token_rows(6, 1, 6)
        got = logits_of(httpx.post(f"{base}/v2/models/tiny/infer", json=v2_body(good)))
        np.testing.assert_allclose(got, model(**good)["logits"], atol=ATOL, rtol=0)


def test_unsigned_or_tampered_bundle_is_refused_before_anything_loads(
    tiny_bundle, tmp_path, monkeypatch
):
    keys = generate_keypair(tmp_path / "k.key")
    signed = shutil.copytree(tiny_bundle, tmp_path / "signed.tvmd")
    sign_bundle(signed, keys.private)
    tampered = shutil.copytree(signed, tmp_path / "tampered.tvmd")
    manifest = tampered / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b"\n")
    loaded = []
    monkeypatch.setattr(server_module, "load", lambda *a, **k: loaded.append(a))
    runner = CliRunner()
    for other, says in ((tiny_bundle, "not signed"), (tampered, "changed after it was signed")):
        args = ["serve", str(signed), str(other), "--trusted-key", str(keys.public)]
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert says in " ".join(result.output.split())
    assert loaded == []  # the signed bundle came first, and was not loaded either


def test_sigterm_drains_the_request_in_flight_and_exits_0(tiny_bundle, model):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TVMDEPLOY_"))}
    command = [str(Path(sys.executable).with_name("tvmdeploy")), "serve", str(tiny_bundle)]
    # A lone request waits 1.5 s for company: it is in flight when SIGTERM comes.
    command += ["--port", str(port), "--max-batch-delay-ms", "1500"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        arrays = token_rows(7, 1, 9)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post, f"{base}/v2/models/tiny/infer", json=v2_body(arrays), timeout=30
            )
            while 'tvmdeploy_queue_rows{model="tiny"} 1.0' not in httpx.get(f"{base}/metrics").text:
                assert not answer.done(), answer.result().text
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            response = answer.result()
        np.testing.assert_allclose(logits_of(response), model(**arrays)["logits"], atol=ATOL)
        assert process.wait(30) == 0, process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_max_batch_1_runs_each_request_alone(model):
    assert create_app({"tiny": model}).state.server.batchers["tiny"].max_batch == model.max_batch
    alone = create_app({"tiny": model}, max_batch=1).state.server.batchers["tiny"]
    assert alone.max_batch == 1
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        create_app({"tiny": model}, max_batch=0)
