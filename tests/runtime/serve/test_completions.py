"""OpenAI's generation routes over real sockets, with the `openai` client, on the tiny Llama
generation bundle: completions and chat completions equal the Generator called directly, streams
(server-sent events) add up to the same text, concurrent requests each get their own text, a
client that leaves mid-stream frees its sequence, and bad requests get 4xx bodies that name the
problem."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from tvmdeploy.runtime import load
from tvmdeploy.runtime.serve import create_app

from tests.runtime.serve.test_server import running

PROMPT = "The bundle holds"


@pytest.fixture(scope="module")
def llm(tiny_llm_bundle):
    return load(tiny_llm_bundle)


@pytest.fixture(scope="module")
def url(llm, tiny_bundle):
    with running(create_app({"llm": llm, "tiny": load(tiny_bundle)})) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_completion_equals_the_generator_called_directly(client, llm):
    expected = llm.generate(PROMPT, max_new_tokens=16, temperature=0)
    done = client.completions.create(model="llm", prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == expected.finish_reason
    assert done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == expected.completion_tokens
    seeded = [
        client.completions.create(model="llm", prompt=PROMPT, max_tokens=12, seed=4).choices[0].text
        for _ in range(2)
    ]
    assert (
        seeded[0]
        == seeded[1]
        == llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=4).text
    )


def test_chat_completion_whole_and_streamed(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = llm.chat(messages, max_new_tokens=20, temperature=0)
    done = client.chat.completions.create(
        model="llm", messages=messages, max_tokens=20, temperature=0
    )
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model="llm",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_concurrent_requests_get_their_own_text(client, llm):
    prompts = [f"{PROMPT} {w}" for w in ("one", "two", "three", "four", "five")]
    expected = [llm.generate(p, max_new_tokens=12).text for p in prompts]
    found: list = [None] * len(prompts)

    def run(k: int) -> None:
        found[k] = (
            client.completions.create(model="llm", prompt=prompts[k], max_tokens=12, temperature=0)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == expected


def stream_counts(metrics: str) -> tuple[float, float]:
    """(streams left by their clients, generations run to their end) of the llm, from the text
    of a /metrics answer."""
    counts = {"tvmdeploy_streams_abandoned_total": 0.0, "tvmdeploy_generations_total": 0.0}
    for line in metrics.splitlines():
        name, _, value = line.partition('{model="llm"} ')
        if name in counts:
            counts[name] = float(value)
    return counts["tvmdeploy_streams_abandoned_total"], counts["tvmdeploy_generations_total"]


def _stream_counts(url: str) -> tuple[float, float]:
    return stream_counts(httpx.get(f"{url}/metrics", timeout=10).text)


def test_a_client_leaving_mid_stream_frees_its_sequence(url, client, llm):
    # More abandoned streams than the Generator has sequences: each must be freed, or the
    # requests after them would wait forever. The server counts the streams it cut: the tiny
    # Llama's 200 tokens take ~0.1 s, so a stream may end first, but most must be cut.
    abandoned_before, ended_before = _stream_counts(url)
    left = 6
    for _ in range(left):
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            # greedy: its continuation of PROMPT runs all 200 tokens (sampled, it can end early)
            json={
                "model": "llm",
                "prompt": PROMPT,
                "max_tokens": 200,
                "temperature": 0,
                "stream": True,
            },
            timeout=30,
        ) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        abandoned, ended = _stream_counts(url)
        if abandoned - abandoned_before + ended - ended_before >= left:
            break
        time.sleep(0.05)
    assert abandoned - abandoned_before + ended - ended_before == left
    assert abandoned - abandoned_before >= left / 2
    done = client.completions.create(model="llm", prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.choices[0].text == llm.generate(PROMPT, max_new_tokens=8).text


def test_bad_requests_get_bodies_that_name_the_problem(url, client):
    with pytest.raises(openai.BadRequestError, match="not a text-generation model"):
        client.completions.create(model="tiny", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        client.completions.create(model="llm", prompt=list(range(3, 300)))
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="llm", prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="llm", prompt=PROMPT, top_p=0)
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        client.completions.create(model="llm", prompt=PROMPT, logprobs=2)
    response = httpx.post(f"{url}/v2/models/llm/infer", json={"inputs": []})
    assert response.status_code == 400
    assert "/v1/completions" in response.json()["error"]
    models = {m.id for m in client.models.list()}
    assert models == {"llm", "tiny"}


def test_a_chats_next_turn_reuses_its_history_as_served(tiny_llm_bundle, llm):
    """`serve` loads generation bundles with the prefix cache (serve.load_models): the second
    turn of a chat reports the history's tokens as cached and answers as the Generator without
    a cache does."""
    from tvmdeploy.runtime.serve import load_models

    models = load_models([f"chat={tiny_llm_bundle}"])
    with running(create_app(models)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = client.chat.completions.create(
            model="chat", messages=messages, max_tokens=12, temperature=0
        )
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And of Italy?"},
        ]
        second = client.chat.completions.create(
            model="chat", messages=messages, max_tokens=12, temperature=0
        )
        metrics = httpx.get(f"{base}/metrics").text
    expected = llm.chat(messages, max_new_tokens=12, temperature=0)
    assert second.choices[0].message.content == expected.text
    assert second.usage.prompt_tokens == expected.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < expected.prompt_tokens
    prompts = first.usage.prompt_tokens + second.usage.prompt_tokens
    assert f'tvmdeploy_prompt_tokens_total{{model="chat",source="cached"}} {cached:.1f}' in metrics
    assert (
        f'tvmdeploy_prompt_tokens_total{{model="chat",source="computed"}} {prompts - cached:.1f}'
        in metrics
    )
