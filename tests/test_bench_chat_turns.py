"""bench/chat_turns.py on the tiny Llama bundle, llama.cpp left out (CI has no llama-cpp-python):
every turn of the conversation is timed with the prefix cache on and off, the cache-on engine
reports the history as cached from the second turn on, and both give transformers' answers."""

from __future__ import annotations

import json

from bench import chat_turns
from tests.conftest import hf_greedy


def test_each_turn_is_timed_with_the_cache_on_and_off(tiny_llm_bundle, tmp_path):
    out = tmp_path / "turns.json"
    chat_turns.main(
        [
            "--bundle", str(tiny_llm_bundle), "--precision", "fp32", "--llama-variant", "",
            "--turns", "3", "--system", "20", "--user", "6", "--answer", "5",
            "--rounds", "1", "--output", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    on, off = (
        report["engines"][name]
        for name in sorted(report["engines"], key=lambda n: "off" in n)  # on first
    )
    assert [t["prompt_tokens"] for t in on] == [26, 37, 48] == [t["prompt_tokens"] for t in off]
    assert [t["cached_tokens"] for t in off] == [0, 0, 0]
    assert [t["cached_tokens"] for t in on] == [0, 30, 41]  # the history, the last answer token
    assert all(t["ttft_s"] > 0 for t in on + off)


def test_the_conversation_is_transformers_greedy_turns(tiny_llm_bundle, tiny_llm_reference):
    """The history each turn sends is what transformers would answer, turn after turn."""
    _, model = tiny_llm_reference
    system, users = chat_turns.conversation(300, 20, 6, 2)
    _, run = chat_turns.tvmdeploy_engine(tiny_llm_bundle, "fp32", prefix_cache=True)
    history = list(system)
    for user in users:
        history += user
        _, answer, _ = run(history, 5)
        assert answer == hf_greedy(model, history, 5)
        history += answer
