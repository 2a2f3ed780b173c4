"""The memory-bandwidth limit of batch-1 decode: every new token reads every weight once, so
tokens/s can be at most bandwidth ÷ bytes read per token. This module measures the bandwidth (a
STREAM-like copy) and counts the bytes each engine's model file makes a token read;
bench/generate.py reports each engine's decode as a fraction of that ceiling.

Bytes per token are the weights' bytes in the engine's own format, less an embedding table that
a separate LM head does not share (a token reads one row of it), plus the KV cache read at the
run's average context (stated apart: small at these lengths, not zero for 4-bit weights).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def copy_bandwidth_gbs(
    megabytes: int = 512, threads: int = 1, repeats: int = 5, clock=time.perf_counter
) -> float:
    """Best-of-`repeats` GB/s of a numpy copy of `megabytes` (≫ any cache), counted as STREAM
    counts its Copy kernel: bytes read plus bytes written. `threads` > 1 copies one slice per
    thread (numpy releases the GIL while copying). `clock=time.process_time` (one thread) gives
    what a core moves while it runs: on a shared machine, wall time also counts the waits."""
    n = megabytes * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def copy(part: slice) -> None:
        np.copyto(dst[part], src[part])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = clock()
            list(pool.map(copy, slices))
            best = min(best, clock() - start)
    return 2 * src.nbytes / best / 1e9


def ceiling_tokens_per_s(bytes_per_token: float, bandwidth_gbs: float) -> float:
    """The most decode tokens/s that `bandwidth_gbs` allows when a token reads that many bytes."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes per token must be positive, not {bytes_per_token}")
    return bandwidth_gbs * 1e9 / bytes_per_token


def kv_bytes_per_token(config: dict, dtype_bytes: int, context: float) -> float:
    """KV-cache bytes one decode step reads at `context` tokens of history (keys and values of
    every layer), from a transformers config.json dict."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes * context


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes a token reads from a GGUF file's tensors (their stored block types). With a separate
    `output.weight`, the `token_embd` table is left out (a token reads one row of it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes a token reads from an ONNX file's initializers (external data included); a table
    read only by Gather (the embedding lookup, one row per token) is left out."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return sum(
        numpy_helper.to_array(tensor).nbytes
        for tensor in model.graph.initializer
        if consumers.get(tensor.name) != {"Gather"}
    )


def bundle_weight_bytes(bundle_dir: str | Path, artifact: str) -> int:
    """Bytes a token reads from one artifact of a tvmdeploy generation bundle: its weight file as
    stored. A tied embedding is the LM head's matrix and counts."""
    from tvmdeploy.runtime.bundle import Bundle

    bundle = Bundle(bundle_dir)
    entry = bundle.weights_entry(bundle.artifact(artifact).weights)
    return bundle.file(entry["file"]).stat().st_size


def torch_weight_bytes(model) -> int:
    """Bytes a token reads from a PyTorch model's parameters (a tied LM head counted once; an
    untied input embedding left out)."""
    seen: dict[int, int] = {}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    for param in model.parameters():
        if param is embedding and not tied:
            continue
        seen[param.data_ptr()] = param.numel() * param.element_size()
    return sum(seen.values())


def path_size(path: str | Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
