"""Generation speed of a generation bundle against PyTorch (transformers, eager fp32) and, where
`llama-cpp-python` is installed, llama.cpp on a GGUF file: prefill tokens/s on a long prompt and
decode tokens/s over new tokens, greedy, in one process, each engine alternated `--rounds` times
(best round kept), as ratios to tvmdeploy.

    python bench/generate.py BUNDLE --hf HF_FOLDER [--gguf FILE] [--prompt-tokens 128]
        [--new-tokens 64] [--rounds 2] [--json bench/results/generate.json]

The HF folder is the model the bundle was compiled from (for a GGUF bundle: the folder
transformers makes of it, `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` saved).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from x86_latency import machine_class


def prompt_of(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(10, min(vocab, 30000), size=n).tolist()


def tvmdeploy_rates(generator, prompt, new):
    result = generator.generate(prompt, max_new_tokens=new, ignore_eos=True)
    return len(prompt) / (result.prefill_ms / 1e3), result.decode_tokens_per_s


def torch_rates(model, prompt, new):
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(new - 1):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        decode = time.perf_counter() - start
    return len(prompt) / prefill, (new - 1) / decode


def llama_cpp_rates(llm, prompt, new):
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new - 1):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, (new - 1) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--hf", required=True, help="the HF folder the bundle was compiled from")
    parser.add_argument("--gguf", help="a GGUF file for llama.cpp (llama-cpp-python)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from tvmdeploy.runtime import load

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    generator = load(args.bundle, max_concurrency=1)
    engines = {"tvmdeploy": lambda p, n: tvmdeploy_rates(generator, p, n)}
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    engines["pytorch-fp32"] = lambda p, n: torch_rates(model, p, n)
    if args.gguf:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp left out", file=sys.stderr)
        else:
            llm = Llama(args.gguf, n_ctx=2048, n_threads=threads, verbose=False)
            engines["llama.cpp"] = lambda p, n: llama_cpp_rates(llm, p, n)
    prompt = prompt_of(generator.vocab_size, args.prompt_tokens)
    best: dict[str, list[float]] = {name: [0.0, 0.0] for name in engines}
    for _ in range(args.rounds):
        for name, rates in engines.items():
            prefill, decode = rates(prompt, args.new_tokens)
            best[name] = [max(best[name][0], prefill), max(best[name][1], decode)]
    base = best["tvmdeploy"]
    rows = [
        {
            "engine": name,
            "prefill_tokens_per_s": round(p, 1),
            "decode_tokens_per_s": round(d, 2),
            "prefill_vs_tvmdeploy": round(p / base[0], 2),
            "decode_vs_tvmdeploy": round(d / base[1], 2),
        }
        for name, (p, d) in best.items()
    ]
    for row in rows:
        print(
            f"{row['engine']:14s} prefill {row['prefill_tokens_per_s']:8.1f} tok/s "
            f"({row['prefill_vs_tvmdeploy']:.2f}x)  decode {row['decode_tokens_per_s']:7.2f} "
            f"tok/s ({row['decode_vs_tvmdeploy']:.2f}x)"
        )
    if args.json:
        report = {
            "bundle": str(Path(args.bundle).name),
            "artifact": generator.choice.artifact,
            "machine": machine_class()[0],
            "threads": threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
