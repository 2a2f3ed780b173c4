"""The Ray Serve deployment on a real local Ray cluster: two raylets on 127.0.0.1 (one CPU each,
so the two replicas sit one per raylet), requests through Ray Serve's HTTP proxy by real clients
(tritonclient, httpx, the `openai` client streaming server-sent events), answers compared with
the bundles called directly in this process. One cluster for the module: Ray's start is the slow
part."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import ray
import tritonclient.http as triton
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve import Application
from tvmdeploy.compiler.cli import app as cli
from tvmdeploy.runtime import load
from tvmdeploy.runtime.errors import OptionError, SignatureError
from tvmdeploy.runtime.serve.ray import (
    APP_NAME,
    REPLICA_HEADER,
    RETRIED_HEADER,
    app_builder,
    application,
)
from tvmdeploy.runtime.signing import generate_keypair
from typer.testing import CliRunner

from .test_completions import stream_counts
from .test_server import ATOL, TEXTS, free_port, logits_of, token_rows, v2_body

NODE = {"num_cpus": 1, "object_store_memory": 80 << 20, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture(scope="module")
def llm(tiny_llm_bundle):
    return load(tiny_llm_bundle)


@pytest.fixture(scope="module")
def url(tiny_bundle, tiny_llm_bundle):
    # Ray turns 127.0.0.1 into the machine's own address when it connects, unless it runs in
    # its one-machine mode (the env var for the raylets and workers, the constant for here).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        yield from _serving(tiny_bundle, tiny_llm_bundle)


def _serving(tiny_bundle, tiny_llm_bundle):
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(
            [f"tiny={tiny_bundle}", f"llm={tiny_llm_bundle}"], replicas=2, max_batch_delay_ms=400
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_same_routes_through_the_proxy_spread_over_both_replicas(url, model):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("tiny")
    arrays = token_rows(1, 2, 20)
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    got = client.infer("tiny", inputs).as_numpy("logits")
    np.testing.assert_allclose(got, model(**arrays)["logits"], atol=ATOL, rtol=0)
    client.close()

    with httpx.Client(base_url=url, timeout=30) as http:
        body = http.post("/v2/models/tiny/predict", json={"text": TEXTS}).json()
        for got_label, want in zip(body["labels"], model.predict(TEXTS), strict=True):
            assert got_label["label"] == want.label and abs(got_label["score"] - want.score) < ATOL
        assert http.post("/v2/models/nope/infer", json={}).status_code == 404

    requests = [token_rows(200 + k, 1, 4 + k % 9) for k in range(24)]

    def call(arrays):
        response = httpx.post(f"{url}/v2/models/tiny/infer", json=v2_body(arrays), timeout=30)
        return logits_of(response), response.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, requests))
    for arrays, (got, _) in zip(requests, answers, strict=True):
        np.testing.assert_allclose(got, model(**arrays)["logits"], atol=ATOL, rtol=0)
    assert len({replica for _, replica in answers}) == 2, "the proxy used one replica only"


def test_openai_streams_through_the_proxy_equal_the_bundle_called_directly(url, llm):
    """The `openai` client streams chat and text completions (server-sent events) through Ray's
    proxy and the front: the text adds up to the whole answer and to the bundle's own greedy
    generation here, and arrives as many events; a bad streamed request gets its 400 with the
    message."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = llm.chat(messages, max_new_tokens=24, temperature=0)
    whole = client.chat.completions.create(
        model="llm", messages=messages, max_tokens=24, temperature=0
    )
    assert whole.choices[0].message.content == expected.text
    chunks = list(
        client.chat.completions.create(
            model="llm",
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta]
    assert "".join(p or "" for p in pieces) == expected.text
    assert sum(1 for p in pieces if p) > 5, "the stream came as one piece"
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason

    prompt = "The bundle holds"
    expected = llm.generate(prompt, max_new_tokens=32, temperature=0)
    stream = client.completions.create(
        model="llm", prompt=prompt, max_tokens=32, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected.text
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="llm", prompt=prompt, n=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="not a text-generation model"):
        client.chat.completions.create(model="tiny", messages=messages, stream=True)


def _stream_counts(url: str) -> tuple[str, float, float]:
    """One replica's streams of the tiny Llama, from its /metrics (each GET goes to the replica
    Ray's router picks): (replica, streams left by their clients, generations finished)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    return response.headers[REPLICA_HEADER], *stream_counts(response.text)


def test_a_client_leaving_a_stream_through_the_proxy_frees_its_sequence(url, llm):
    """Clients that leave after the third event: Ray's proxy cancels the front's call, the front
    the replica's, and the replica's app closes the stream (which frees its sequence). Each
    replica counts those streams (`tvmdeploy_streams_abandoned_total`) apart from the ones that
    ended on their own: had the front buffered the answer or not passed the cancel on, every
    stream would have run to its end and none would count as left. The tiny Llama generates
    its 240 tokens in about 0.1 s, so a stream may end before the cancel reaches it: at least
    half must count as left (a front that held the stream back after its first chunk cut none:
    checked by hand). More streams are left
    than both replicas hold sequences, then one more request is answered in full. Bounded: 10
    streams, 20 s of polling."""
    before: dict[str, float] = {}  # finished generations per replica, before
    deadline = time.monotonic() + 20
    while len(before) < 2 and time.monotonic() < deadline:
        replica, abandoned, finished = _stream_counts(url)
        assert abandoned == 0
        before[replica] = finished
    # Greedy: the tiny Llama's greedy continuation of this prompt runs all 240 tokens (sampled,
    # as OpenAI's default temperature 1 would, it can end within the three events read).
    body = {
        "model": "llm",
        "prompt": "The bundle holds",
        "max_tokens": 240,
        "temperature": 0,
        "stream": True,
    }
    left = 10
    for _ in range(left):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):  # three events, then leave: the front must not hold the rest
                assert next(events).startswith("data: {")
    counts: dict[str, tuple[float, float]] = {}  # the last (left, ended) read from each replica
    while time.monotonic() < deadline:
        replica, abandoned, finished = _stream_counts(url)
        counts[replica] = (abandoned, finished - before[replica])
        if sum(a + f for a, f in counts.values()) >= left:
            break
        time.sleep(0.05)
    abandoned, ended = (sum(c) for c in zip(*counts.values(), strict=True))
    assert abandoned + ended == left, counts
    assert abandoned >= left / 2, f"only {abandoned:.0f} of {left} streams were cut: {counts}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    done = client.completions.create(model="llm", prompt="The bundle", max_tokens=8, temperature=0)
    assert done.choices[0].text == llm.generate("The bundle", max_new_tokens=8, temperature=0).text


def test_a_replica_killed_under_load_loses_no_request(url, model):
    """Two clients send one row at a time; a replica's batcher holds a lone row for a second one
    (up to the 400 ms delay), so with both clients waiting past 250 ms each replica holds one
    request. Then one replica's actor is killed: Ray would answer the request it held with a
    500; the front sends it again to the other replica (`x-tvmdeploy-retried`), and no request
    fails. Bounded: 10 s of requests."""
    inputs = [token_rows(300 + k, 1, 6 + k) for k in range(2)]
    expected = [model(**arrays)["logits"] for arrays in inputs]
    stop_at = time.monotonic() + 10
    failures, retried, answered_by = [], [], []
    waiting_since: list[float | None] = [None, None]

    def client(k: int):
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < stop_at:
                waiting_since[k] = time.monotonic()
                response = http.post("/v2/models/tiny/infer", json=v2_body(inputs[k]))
                waiting_since[k] = None
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:300]))
                    continue
                np.testing.assert_allclose(logits_of(response), expected[k], atol=ATOL, rtol=0)
                answered_by.append(response.headers[REPLICA_HEADER])
                if response.headers.get(RETRIED_HEADER):
                    retried.append(k)

    def both_held() -> bool:
        now = time.monotonic()
        return all(t is not None and now - t > 0.25 for t in waiting_since)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(client, k) for k in range(2)]
        while time.monotonic() < stop_at - 5 and (len(set(answered_by)) < 2 or not both_held()):
            time.sleep(0.01)
        victim = min(answered_by)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_after = len(answered_by)
        for future in running:
            future.result(timeout=60)
    assert not failures, failures[:3]
    assert retried, "no request was in flight on the killed replica"
    assert victim not in answered_by[killed_after + 1 :]
    assert len(answered_by) - killed_after > 10, "too few requests after the kill"


def test_the_app_refuses_bad_arguments_before_any_replica_starts(tiny_bundle, tmp_path):
    assert isinstance(app_builder({"bundles": f"tiny={tiny_bundle}", "replicas": "3"}), Application)
    with pytest.raises(OptionError, match="replica_count"):
        app_builder({"bundles": str(tiny_bundle), "replica_count": "3"})
    with pytest.raises(OptionError, match="no bundle at"):
        application([str(tmp_path / "missing.tvmd")])
    with pytest.raises(OptionError, match="--replicas"):
        application([str(tiny_bundle)], replicas=0)
    keys = generate_keypair(tmp_path / "k.key")
    with pytest.raises(SignatureError):
        application([str(tiny_bundle)], trusted_keys=[keys.public])
    result = CliRunner().invoke(cli, ["serve", "--ray", "local", "x.tvmd"])
    assert result.exit_code != 0 and "no bundle at" in result.output
