"""Precision benchmark, one process: what a user gets from `tvmdeploy compile` + `load()` at fp32,
int8 and (on a CPU with AVX512-BF16 or AMX) bf16, against PyTorch fp32, ONNX Runtime fp32 and ONNX
Runtime dynamic int8 (the user's usual alternative on a CPU), PyTorch bf16 where tvmdeploy bf16
runs, and OpenVINO where it is installed (its default hint, bf16 on an AMX CPU; the f32 hint; and
ORT's int8 file), at batch 1 x seq 32 and 128 and batch 8 x seq 128. On an AMX CPU `-t host` is
x86-amx, so the tvmdeploy int8 and bf16 rows are the AMX tile kernels.

    python bench/precision.py                       # DistilBERT-base size + the demo MiniLM
    python bench/precision.py --models minilm-sentiment --runs 20

tvmdeploy rows come from the same path as the CLI: `compile_model` (-t host, default options,
an empty tuning cache so only shipped records apply) and `tvmdeploy.runtime.load(bundle,
precision=...)`, timed through `Model.__call__` (input checks and padding included). ONNX Runtime
int8 is `onnxruntime.quantization.quantize_dynamic` (QInt8 weights) on the same exported graph.
Accuracy: the demo MiniLM (fine-tuned by `make demo`, else the base model with a random head) on
the demo's held-out split when that data is cached; always the label agreement with ORT fp32 and
the max logit difference on random token ids.
Writes bench/results/precision.json and the precision section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from x86_latency import best_of_rounds, machine_class, make_models, update_docs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "precision.json"
SHAPES = ((1, 32), (1, 128), (8, 128))
BEGIN, END = "<!-- precision:begin -->", "<!-- precision:end -->"
DEMO_DIR = ROOT / "build" / "demo"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def held_out_examples():
    """The demo's held-out split when its data is cached (no download from a benchmark)."""
    from tvmdeploy.compiler.demo.sentiment_data import load_split

    data = DEMO_DIR / "data"
    if not any(data.glob("vaderSentiment-*.tar.gz")):
        return None
    return load_split(data)[1]


def bench_model(name: str, model_dir: Path, work: Path, args, threads: int) -> dict:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import load
    from tvmdeploy.targets.resolve import runs_bf16

    os.environ["TVMDEPLOY_CACHE_DIR"] = str(work / "empty-cache")
    bundle_dir = work / f"{name}.tvmd"
    precisions = ["fp32", "int8"] + (["bf16"] if runs_bf16() else [])
    log(f"{name}: tvmdeploy compile -t host --precision {','.join(precisions)}")
    start = time.perf_counter()
    compile_model(
        CompileOptions(
            model=str(model_dir),
            output=str(bundle_dir),
            profiles=["host"],
            buckets="1,8x32,128",
            precisions=precisions,
        )
    )
    compile_s = time.perf_counter() - start
    models = {p: load(bundle_dir, precision=p) for p in precisions}
    fp32 = models["fp32"]
    onnx_path = bundle_dir / "model.onnx"
    quantized = work / f"{name}-ort-int8.onnx"
    quantize_dynamic(str(onnx_path), str(quantized), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {
        "onnxruntime fp32": ort.InferenceSession(str(onnx_path), options, ["CPUExecutionProvider"]),
        "onnxruntime int8 (dynamic)": ort.InferenceSession(
            str(quantized), options, ["CPUExecutionProvider"]
        ),
    }
    torch.set_num_threads(threads)
    torch_model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    torch_bf16 = None
    if "bf16" in models:  # PyTorch's own bf16 (oneDNN) on the same CPU
        torch_bf16 = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        torch_bf16 = torch_bf16.to(torch.bfloat16)
    openvino = openvino_engines(onnx_path, quantized, threads)
    accepted = set(torch_model.forward.__code__.co_varnames)
    input_names = [i["name"] for i in fp32.bundle.inputs]

    def runners(feeds: dict) -> dict:
        tin = {k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted}

        def run_torch():
            with torch.inference_mode():
                return torch_model(**tin).logits.numpy()

        def run_torch_bf16():
            with torch.inference_mode():
                return torch_bf16(**tin).logits.float().numpy()

        out = {"torch fp32": run_torch}
        if torch_bf16 is not None:
            out["torch bf16"] = run_torch_bf16
        for label, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            out[label] = lambda s=session, f={n: feeds[n] for n in names}: s.run(None, f)[0]
        for label, run in openvino.items():
            out[label] = lambda r=run: r(feeds)
        for precision, model in models.items():
            label = f"tvmdeploy {precision} ({model.choice.artifact})"
            out[label] = lambda m=model: m(**feeds)["logits"]
        return out

    rows = []
    for batch, seq in SHAPES:
        rng = np.random.default_rng(seq + batch)
        feeds = {
            "input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
        feeds = {k: v for k, v in feeds.items() if k in input_names}
        engines = runners(feeds)
        best = best_of_rounds(engines, args, f"{name} {batch}x{seq}")
        reference = np.asarray(engines["onnxruntime fp32"]())
        for engine, measured in best.items():
            logits = np.asarray(engines[engine]())
            rows.append(
                {
                    "batch": batch,
                    "seq": seq,
                    "engine": engine,
                    "p50_ms": round(measured["p50_ms"], 3),
                    "p90_ms": round(measured["p90_ms"], 3),
                    "seq_per_s": round(batch * 1e3 / measured["p50_ms"], 1),
                    "max_abs_diff_vs_ort_fp32": float(np.abs(logits - reference).max()),
                }
            )
    accuracy = (
        accuracy_rows(name, models, sessions, openvino) if name == "minilm-sentiment" else None
    )
    return {"rows": rows, "compile_s": round(compile_s, 1), "accuracy": accuracy}


def openvino_engines(onnx_path: Path, quantized: Path, threads: int) -> dict:
    """OpenVINO on the same exported graph (default hint: bf16 where the CPU has AMX; the f32
    hint) and on ORT's int8 file, as callables feeds -> logits; none when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        log("openvino not installed (pip install openvino): no OpenVINO rows")
        return {}
    core = ov.Core()
    configs = {
        "openvino (default hint)": (onnx_path, {}),
        "openvino (f32 hint)": (onnx_path, {"INFERENCE_PRECISION_HINT": "f32"}),
        "openvino on ORT int8 file": (quantized, {}),
    }
    engines = {}
    for label, (path, config) in configs.items():
        try:
            compiled = core.compile_model(
                core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads, **config}
            )
        except RuntimeError as err:  # e.g. an op of the int8 file it does not take
            log(f"{label}: not compiled by OpenVINO ({str(err)[:200]})")
            continue
        names = [p.get_any_name() for p in compiled.inputs]
        log(f"{label}: inference precision {compiled.get_property('INFERENCE_PRECISION_HINT')}")
        engines[label] = lambda feeds, c=compiled, n=names: c({k: feeds[k] for k in n})[0]
    return engines


def accuracy_rows(name: str, models: dict, sessions, openvino: dict) -> dict | None:
    """Held-out accuracy of every engine and its label agreement with ORT fp32."""
    examples = held_out_examples()
    if examples is None:
        log(f"{name}: demo data not cached (run `make demo`): no accuracy rows")
        return None
    labels: dict[str, np.ndarray] = {}
    truth = np.array([e.label for e in examples])
    for start in range(0, len(examples), 8):
        chunk = examples[start : start + 8]
        feeds = models["fp32"].encode([e.text for e in chunk])
        outs = {f"tvmdeploy {p}": m(**feeds)["logits"] for p, m in models.items()}
        for label, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            outs[label] = session.run(None, {n: feeds[n] for n in names})[0]
        for label, run in openvino.items():
            outs[label] = run(feeds)
        for label, logits in outs.items():
            labels.setdefault(label, []).append(np.asarray(logits).argmax(-1))
    ref = np.concatenate(labels["onnxruntime fp32"])
    return {
        "examples": len(examples),
        "engines": {
            label: {
                "accuracy": round(100 * float((np.concatenate(v) == truth).mean()), 2),
                "agreement_with_ort_fp32": round(100 * float((np.concatenate(v) == ref).mean()), 2),
            }
            for label, v in labels.items()
        },
    }


def markdown(report: dict) -> str:
    lines = [
        BEGIN,
        "## Precision: tvmdeploy fp32, int8 and bf16 against ONNX Runtime fp32 and dynamic int8",
        "",
        (
            f"Measured {report['when']} on {report['cpu']}, {report['threads']} threads "
            f"(`-t host` → {report['host_profile']}). Best-of-{report['rounds']} p50 over "
            f"{report['runs']} runs; tvmdeploy timed through `load()` + `Model.__call__`, as a "
            "user calls it, with an empty tuning cache."
        ),
        "",
        (
            "| model | batch x seq | engine | p50 ms | seq/s | vs ORT fp32 | vs ORT int8 "
            "| max logit diff vs ORT fp32 |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in report["models"].items():
        by = {(r["batch"], r["seq"], r["engine"]): r for r in model["rows"]}
        for r in model["rows"]:
            ort32 = by[(r["batch"], r["seq"], "onnxruntime fp32")]["p50_ms"]
            ort8 = by[(r["batch"], r["seq"], "onnxruntime int8 (dynamic)")]["p50_ms"]
            lines.append(
                f"| {name} | {r['batch']}x{r['seq']} | {r['engine']} | {r['p50_ms']:.2f} | "
                f"{r['seq_per_s']:.0f} | {r['p50_ms'] / ort32:.2f}x | {r['p50_ms'] / ort8:.2f}x | "
                f"{r['max_abs_diff_vs_ort_fp32']:.1e} |"
            )
    for name, model in report["models"].items():
        acc = model.get("accuracy")
        if not acc:
            continue
        lines += [
            "",
            f"{name}, held-out accuracy on {acc['examples']} VADER movie-review snippets:",
            "",
            "| engine | accuracy | label agreement with ORT fp32 |",
            "|---|---:|---:|",
        ]
        for engine, a in acc["engines"].items():
            lines.append(
                f"| {engine} | {a['accuracy']:.2f}% | {a['agreement_with_ort_fp32']:.2f}% |"
            )
    lines += ["", f"Reproduce: `{report['command']}`.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="distilbert-base,minilm-sentiment")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    import tvmdeploy.compiler  # noqa: F401 - TVM_NUM_THREADS before TVM loads
    from tvmdeploy.targets.resolve import resolve_profile

    threads = len(os.sched_getaffinity(0))
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": machine_class()[0],
        "host_profile": resolve_profile("host").name,
        "threads": threads,
        "runs": args.runs,
        "rounds": args.rounds,
        "command": "python bench/precision.py " + " ".join(sys.argv[1:]),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        work = Path(tmp)
        for name, model_dir in make_models(work, tuple(wanted)).items():
            report["models"][name] = bench_model(name, model_dir, work, args, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.no_docs:
        update_docs(text, BEGIN, END)
    print(text)


if __name__ == "__main__":
    main()
