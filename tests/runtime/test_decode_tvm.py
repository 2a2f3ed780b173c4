"""runtime/decode_tvm.py on the tiny Llama bundle: the static batch-1 entry `decode1` gives the
logits the batched `decode` gives, an artifact without `decode1` (compiled before it existed)
decodes through `decode`, a batch of two sequences of different lengths matches each one
decoded alone, and a prompt fed in chunks (the later ones attend to earlier keys in the cache's
pages, kernels/cpu_prefill_attention.paged_prefill) gives transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest
from tvmdeploy.runtime.decode_tvm import TvmDecoder
from tvmdeploy.runtime.probe import probe

PROMPT = np.array([1, 5, 7, 9, 23, 100, 42, 17, 3, 8, 250, 11, 60, 2, 19, 33, 70, 4])  # > 1 page
STEPS = 6


@pytest.fixture(scope="module")
def engines(tiny_llm_bundle):
    from tvmdeploy.runtime import load

    generator = load(tiny_llm_bundle)
    static = TvmDecoder(generator.bundle, generator.choice.artifact, probe(), 2)
    batched = TvmDecoder(generator.bundle, generator.choice.artifact, probe(), 2)
    batched._decode1 = False  # what an artifact without `decode1` looks like to the runtime
    return static, batched


def greedy_rows(engine: TvmDecoder, prompt: np.ndarray) -> np.ndarray:
    engine.open()
    engine.add_sequence(0)
    rows = [np.array(engine.prefill(0, prompt), copy=True)]
    for _ in range(STEPS):
        token = np.array([int(rows[-1].argmax())])
        rows.append(np.array(engine.decode([0], token)[0], copy=True))
    engine.remove_sequence(0)
    return np.stack(rows)


def test_decode1_gives_the_logits_of_decode(engines):
    static, batched = engines
    assert static.step_function(1) == "decode1" and static.step_function(2) == "decode"
    assert batched.step_function(1) == "decode"
    rows = greedy_rows(static, PROMPT)
    np.testing.assert_allclose(rows, greedy_rows(batched, PROMPT), atol=1e-5, rtol=1e-5)
    assert len({int(r.argmax()) for r in rows}) > 1  # the steps differ, so the check can fail


def test_a_batch_of_two_lengths_matches_each_alone(engines):
    static, _ = engines
    short = PROMPT[:5]
    alone = [greedy_rows(static, PROMPT), greedy_rows(static, short)]
    static.open()
    tokens = []
    for seq, prompt in enumerate((PROMPT, short)):
        static.add_sequence(seq)
        tokens.append(int(static.prefill(seq, prompt).argmax()))
    for step in range(1, STEPS + 1):
        rows = static.decode([0, 1], np.array(tokens))
        for seq in (0, 1):
            np.testing.assert_allclose(rows[seq], alone[seq][step], atol=1e-4, rtol=1e-4)
        tokens = [int(r.argmax()) for r in rows]


def test_a_prompt_in_chunks_gives_the_logits_of_the_whole_prompt(engines, tiny_llm_dir):
    """Chunks that start and end inside pages, over more than one page of earlier keys, and a
    one-token chunk: each last row against transformers' logits at that position."""
    import torch
    from transformers import AutoModelForCausalLM

    static, _ = engines
    prompt = np.random.default_rng(3).integers(3, 300, 53)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = model(torch.tensor(prompt[None])).logits[0].numpy()
    static.open()
    for seq, chunks in enumerate(([53], [20, 17, 1, 15], [5, 40, 8])):
        static.add_sequence(seq)
        end = 0
        for size in chunks:
            row = static.prefill(seq, prompt[end : end + size])
            end += size
            np.testing.assert_allclose(row, want[end - 1], atol=2e-4, rtol=1e-4)
        static.remove_sequence(seq)


def test_a_prefill_call_longer_than_the_chunk_is_refused_by_name(engines):
    """TVM would fail deep in a tensor view; the engine names the limit first."""
    from tvmdeploy.runtime.errors import InputError

    static, _ = engines
    static.open()
    static.add_sequence(0)
    with pytest.raises(InputError, match="prefill_chunk"):
        static.prefill(0, np.ones(static.prefill_chunk + 1, np.int64))
    np.testing.assert_array_equal(static.prefill(0, PROMPT).shape, (300,))  # the sequence lives
