"""The runtime's Generator on a real generation bundle (a tiny Llama compiled for the host),
checked against transformers: greedy text and tokens, the chat template, streaming, stop
strings, sampling, concurrent requests sharing decode steps, limits refused by name, and the
prefix cache (a kept sequence's tokens reused, popped where a prompt diverges, evicted)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tvmdeploy.runtime import GenerationResult, Generator, load
from tvmdeploy.runtime.errors import InputError, OptionError

from tests.conftest import hf_greedy

PROMPT = "The bundle holds"


@pytest.fixture(scope="module")
def generator(tiny_llm_bundle) -> Generator:
    return load(tiny_llm_bundle)


@pytest.fixture(scope="module")
def reference(tiny_llm_reference):
    return tiny_llm_reference


def test_load_gives_a_generator_with_the_bundles_limits(generator):
    assert isinstance(generator, Generator)
    assert generator.task == "text-generation"
    assert generator.context_length == 256  # the tiny model's own limit (below the default cap)
    assert generator.eos_token_ids == frozenset({2})


def test_greedy_text_and_tokens_match_transformers(generator, reference):
    tokenizer, _ = reference
    ids = tokenizer(PROMPT).input_ids
    result = generator.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert isinstance(result, GenerationResult)
    expected = hf_greedy(reference[1], ids, 24)
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.prompt_tokens == len(ids)
    assert result.finish_reason == "length"


def test_chat_template_renders_as_transformers_does(generator, reference):
    tokenizer, _ = reference
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generator.apply_chat_template(messages) == expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    result = generator.chat(messages, max_new_tokens=12, ignore_eos=True)
    assert result.prompt_tokens == len(ids)
    assert result.token_ids == hf_greedy(reference[1], list(ids), 12)


def test_the_stream_yields_the_same_text_and_closing_it_frees_the_sequence(generator):
    whole = generator.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    stream = generator.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == whole.text
    assert stream.result.token_ids == whole.token_ids
    with generator.generate(PROMPT, max_new_tokens=200, ignore_eos=True, stream=True) as early:
        next(iter(early))
    # The closed request's sequence is gone: as many new requests as the cache holds still run.
    results = [generator.generate(PROMPT, max_new_tokens=5) for _ in range(6)]
    assert all(r.completion_tokens >= 1 for r in results)


def test_a_stop_string_ends_the_text_before_it(generator):
    whole = generator.generate(PROMPT, max_new_tokens=40, ignore_eos=True).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop, whole
    cut = generator.generate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=stop)
    assert cut.text == whole[: whole.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = generator.generate(
        PROMPT, max_new_tokens=40, ignore_eos=True, stop=stop, stream=True
    )
    assert "".join(streamed) == cut.text


def test_sampling_is_reproducible_by_seed_and_follows_its_controls(generator):
    a = generator.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    b = generator.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    c = generator.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = generator.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    top1 = generator.generate(
        PROMPT, max_new_tokens=16, temperature=1.0, top_k=1, seed=3, ignore_eos=True
    )
    assert top1.token_ids == greedy.token_ids  # top-k 1 leaves only the argmax


def test_concurrent_requests_share_decode_steps_and_get_their_own_tokens(generator):
    prompts = [f"{PROMPT} {word}" for word in ("one", "two", "three", "four", "five", "six")]
    alone = [generator.generate(p, max_new_tokens=20, ignore_eos=True).token_ids for p in prompts]
    together: list = [None] * len(prompts)

    def run(k: int) -> None:
        together[k] = generator.generate(prompts[k], max_new_tokens=20, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_prefill_logits_match_transformers(generator, reference):
    import torch

    tokenizer, model = reference
    ids = tokenizer(PROMPT).input_ids
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(generator.prefill_logits(ids), expected, atol=1e-4)


def test_forced_logits_are_transformers_logits_at_every_position(generator, reference):
    import torch

    tokenizer, model = reference
    ids = tokenizer(PROMPT).input_ids
    continuation = [17, 250, 3, 99, 42]  # fed in turn, whatever the model would pick
    with torch.inference_mode():
        expected = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1 :].numpy()
    rows = generator.forced_logits(ids, continuation)
    assert rows.shape == expected.shape == (len(continuation) + 1, generator.vocab_size)
    np.testing.assert_allclose(rows, expected, atol=1e-4)
    with pytest.raises(InputError, match="context"):
        generator.forced_logits(ids, [5] * generator.context_length)


def test_limits_and_bad_requests_are_refused_by_name(generator):
    with pytest.raises(InputError, match="context is 256 tokens"):
        generator.generate(list(range(3, 259)))
    with pytest.raises(InputError, match=r"lie in \[0, 300\); found 300"):
        generator.generate([5, 300])
    with pytest.raises(InputError, match="empty"):
        generator.generate([])
    with pytest.raises(InputError, match="either a prompt or chat messages"):
        generator.generate()
    with pytest.raises(InputError, match=r"messages\[0\]\.content must be a string"):
        generator.chat([{"role": "user", "content": 3}])
    with pytest.raises(OptionError, match="top_p"):
        generator.generate(PROMPT, top_p=0)
    with pytest.raises(OptionError, match="max_new_tokens"):
        generator.generate(PROMPT, max_new_tokens=0)
    # The room left in the context caps a long request: it ends with finish_reason "length".
    long = generator.generate(list(range(3, 250)), max_new_tokens=50, ignore_eos=True)
    assert long.completion_tokens == 256 - 247
    assert long.finish_reason == "length"


def test_stream_deltas_never_split_a_multibyte_character(generator):
    """Byte-level BPE spells "é" and "☕" (not in the tiny tokenizer's training text) as one token
    per UTF-8 byte; the stream holds a partial character back until its last byte arrives."""
    from tvmdeploy.runtime.generate import GenerationStream, _Done, _Request
    from tvmdeploy.runtime.sampling import Sampler, SamplingParams

    text = "café ☕ done"
    ids = generator.tokenizer.encode(text, add_special_tokens=False).ids
    pieces_of_char = [generator.tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_of_char)  # some token is half a character
    request = _Request([1], len(ids), Sampler(SamplingParams()), frozenset())
    for token in ids:
        request.out.put(token)
    request.out.put(_Done("length", 1.0, 1.0))
    stream = GenerationStream(generator, request, stop=[], skip_eos=True)
    deltas = list(stream)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text == stream.result.text


def test_a_quiet_request_reads_the_same_tokens_and_text_as_a_streamed_one(generator):
    """A call that neither streams nor stops at a string reads its tokens once, at the end: the
    same ids (an end-of-sequence token left out) and text (a half character at the end left out)
    as the token-by-token stream of the same tokens."""
    from tvmdeploy.runtime.generate import GenerationStream, _Done, _Request
    from tvmdeploy.runtime.sampling import Sampler, SamplingParams

    ids = generator.tokenizer.encode("café ☕ done", add_special_tokens=False).ids
    cut = max(k for k in range(len(ids)) if generator.tokenizer.decode(ids[:k]).endswith("\ufffd"))
    tokens = ids[:cut]  # ends inside the cup's bytes
    tokens += [2]  # and then the end of the sequence

    def read(quiet: bool):
        request = _Request([1], 64, Sampler(SamplingParams()), frozenset({2}), quiet=quiet)
        request.generated.extend(tokens)
        for token in [] if quiet else tokens:
            request.out.put(token)
        request.out.put(_Done("stop", 1.0, 1.0))
        stream = GenerationStream(generator, request, stop=[], skip_eos=True)
        return "".join(stream), stream.result

    quiet_text, quiet = read(True)
    streamed_text, streamed = read(False)
    assert quiet.token_ids == streamed.token_ids == tokens[:-1]
    assert quiet.text == streamed.text == quiet_text == streamed_text
    assert quiet.text.startswith("café") and "\ufffd" not in quiet.text


def test_a_failing_sampler_fails_its_request_and_the_generator_keeps_serving(
    generator, monkeypatch
):
    from tvmdeploy.runtime import sampling
    from tvmdeploy.runtime.errors import BundleError

    calls = {"n": 0}
    real_pick = sampling.Sampler.pick

    def pick_fails_once(self, logits, history):
        calls["n"] += 1
        if calls["n"] == 2:  # the second decode step (the prefill samples through __call__)
            raise ValueError("a sampler bug")
        return real_pick(self, logits, history)

    monkeypatch.setattr(sampling.Sampler, "pick", pick_fails_once)
    with pytest.raises(BundleError, match="a sampler bug"):
        generator.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    monkeypatch.undo()
    result = generator.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    assert result.completion_tokens == 4


def test_an_engine_that_cannot_open_fails_the_request_and_the_next_one_retries(
    tiny_llm_bundle, monkeypatch
):
    """A cache that cannot be made (a refused allocation, simulated) fails the waiting request
    with the engine's error instead of leaving it waiting on a dead thread; the next request
    opens the engine again."""
    from tvmdeploy.runtime.errors import BundleError

    fresh = load(tiny_llm_bundle)
    engine = fresh._stepper.engine
    real_open = type(engine).open
    calls = {"n": 0}

    def open_fails_once(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("the KV cache could not be allocated")
        return real_open(self)

    monkeypatch.setattr(type(engine), "open", open_fails_once)
    with pytest.raises(BundleError, match="could not be allocated"):
        fresh.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    result = fresh.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    assert result.completion_tokens == 3 and calls["n"] == 2


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


def test_a_kept_prefix_is_reused_and_gives_transformers_tokens(tiny_llm_bundle, reference):
    """prefix_cache: the next turn of a conversation (the history, the answer, a new message)
    prefills only what the kept sequence lacks; a prompt that diverges from it pops the rest;
    either way the greedy tokens and the prompt's logits are transformers'."""
    import torch

    _, model = reference
    cached = load(tiny_llm_bundle, prefix_cache=True, max_concurrency=2)
    first = _ids(1, 40)
    one = cached.generate(first, max_new_tokens=10, ignore_eos=True)
    assert one.cached_tokens == 0
    turn = first + one.token_ids + _ids(2, 12)  # the history with the answer, a new message
    two = cached.generate(turn, max_new_tokens=12, ignore_eos=True)
    assert two.cached_tokens == len(first) + len(one.token_ids) - 1  # all the cache was fed
    assert two.token_ids == hf_greedy(model, turn, 12)
    assert two.to_dict()["cached_tokens"] == two.cached_tokens

    branch = turn[:30] + _ids(3, 20)  # shares 30 tokens with the kept sequence of `turn`
    with torch.inference_mode():
        want = model(torch.tensor([branch])).logits[0, -1].numpy()
    np.testing.assert_allclose(cached.prefill_logits(branch), want, atol=1e-4)
    three = cached.generate(branch, max_new_tokens=12, ignore_eos=True)
    assert three.cached_tokens == len(branch) - 1  # what prefill_logits left kept: all but one
    assert three.token_ids == hf_greedy(model, branch, 12)


def test_kept_sequences_fill_the_free_slots_and_the_oldest_goes(tiny_llm_bundle):
    """Two slots: three prompts keep the last two; the first comes back with nothing cached. A
    prompt sharing fewer than a page of tokens, or a generator without prefix_cache, reuses
    nothing."""
    from tvmdeploy.runtime.generate import MIN_REUSED_TOKENS

    cached = load(tiny_llm_bundle, prefix_cache=True, max_concurrency=2)
    prompts = [_ids(10 + k, 30) for k in range(3)]
    for p in prompts:
        assert cached.generate(p, max_new_tokens=4).cached_tokens == 0
    assert cached.generate(prompts[0], max_new_tokens=4).cached_tokens == 0  # evicted
    assert cached.generate(prompts[2], max_new_tokens=4).cached_tokens == 29
    short = prompts[2][: MIN_REUSED_TOKENS - 1] + _ids(20, 20)
    assert cached.generate(short, max_new_tokens=4).cached_tokens == 0
    plain = load(tiny_llm_bundle)
    plain.generate(prompts[1], max_new_tokens=4)
    assert plain.generate(prompts[1], max_new_tokens=4).cached_tokens == 0
    onnx = load(tiny_llm_bundle, artifact="onnxruntime", prefix_cache=True)  # keeps no prefix
    onnx.generate(prompts[1], max_new_tokens=4)
    assert onnx.generate(prompts[1], max_new_tokens=4).cached_tokens == 0


def test_concurrent_requests_with_kept_prefixes_get_their_own_tokens(tiny_llm_bundle, generator):
    """Four threads on two slots, sharing a system prompt: each gets what it gets alone."""
    cached = load(tiny_llm_bundle, prefix_cache=True, max_concurrency=2)
    system = _ids(30, 24)
    prompts = [system + _ids(31 + k, 8) for k in range(4)]
    alone = [generator.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in prompts]
    together: list = [None] * len(prompts)

    def run(k: int) -> None:
        together[k] = cached.generate(prompts[k], max_new_tokens=10, ignore_eos=True)

    for _ in range(2):  # the second round finds the prefix kept
        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.token_ids for r in together] == alone
    assert any(r.cached_tokens >= len(system) for r in together)


class _CallLog:
    """The real engine, its prefill and decode calls noted in order (the stepping thread's)."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, seq_id, tokens):
        self.calls.append(("prefill", seq_id, len(tokens)))
        return self._engine.prefill(seq_id, tokens)

    def decode(self, seq_ids, tokens):
        self.calls.append(("decode", tuple(seq_ids)))
        return self._engine.decode(seq_ids, tokens)


def test_a_long_prompt_is_prefilled_between_the_running_streams_steps(tiny_llm_bundle, generator):
    """Chunks of 16: a 100-token prompt arriving while another request decodes is prefilled a
    chunk per decode step, so the running stream keeps getting tokens; both get their tokens."""
    fresh = load(tiny_llm_bundle)
    stepper = fresh._stepper
    log = stepper.engine = _CallLog(stepper.engine)
    stepper.prefill_chunk = 16
    running, long = _ids(40, 8), _ids(41, 100)
    got: dict = {}
    # 200 steps to decode: the long prompt arrives long before the running request ends
    with fresh.generate(running, max_new_tokens=200, ignore_eos=True, stream=True) as stream:
        pieces = iter(stream)
        next(pieces)  # the first request decodes now
        done = threading.Thread(
            target=lambda: got.update(long=fresh.generate(long, max_new_tokens=8, ignore_eos=True))
        )
        done.start()
        list(pieces)
        done.join()
    first = log.calls[0][1]  # the running request's sequence
    chunks = [k for k, c in enumerate(log.calls) if c[0] == "prefill" and c[1] != first]
    assert [log.calls[k][2] for k in chunks] == [16] * 6 + [4]  # 100 tokens, 7 chunks
    between = [c for c in log.calls[chunks[0] : chunks[-1]] if c[0] == "decode"]
    assert between == [("decode", (first,))] * (len(chunks) - 1)  # one step after each chunk
    alone = generator.generate(long, max_new_tokens=8, ignore_eos=True)
    assert got["long"].token_ids == alone.token_ids
    want = generator.generate(running, max_new_tokens=200, ignore_eos=True).token_ids
    assert stream.result.token_ids == want
