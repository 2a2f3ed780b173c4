"""Tuning throughput: measured trials per minute, stock MetaSchedule vs tvmdeploy's tuner.

Both tune the same task set: every fused kernel of a DistilBERT-base-size classifier (random
weights from `DistilBertConfig()`) at batch 1 x seq 128 with more than 1 MFLOP (the matmuls,
softmax and layer norm), for the same trial budget, starting from an empty database.

    python bench/tune_throughput.py --mode stock --trials 128
    python bench/tune_throughput.py --mode tvmdeploy --trials 128
    python bench/tune_throughput.py --mode stock --trials 128 --build-timeout 600

`stock` is `ms.tune_tasks` with its defaults (LocalBuilder: a new process pool per batch, 30 s
build timeout; LocalRunner; 64 candidates per batch; gradient task scheduler). Each mode runs in
its own process; results are appended to bench/results/tune_throughput.json with the load
average, because the machine this was written on is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "tune_throughput.json"


def distilbert_module(work: Path):
    """The imported Relax module of a random-weight DistilBERT-base classifier, b1 x s128."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    from tvmdeploy.compiler.frontend import export, importer
    from tvmdeploy.compiler.options import parse_buckets

    model_dir = work / "distilbert"
    torch.manual_seed(0)
    DistilBertForSequenceClassification(DistilBertConfig(num_labels=2)).eval().save_pretrained(
        model_dir
    )
    exported = export.export_model(model_dir, work / "onnx")
    return importer.import_onnx(exported.onnx_path, parse_buckets("1x128")).mod


def in_task_set(task) -> bool:
    return task.flop > 1e6


def run_stock(mod, trials: int, build_timeout: float, work: Path) -> dict:
    from tvm.s_tir import meta_schedule as ms
    from tvmdeploy.compiler import build, tuning
    from tvmdeploy.targets import get

    target = build.tvm_target(get("x86-64-v4"), num_cores=tuning.num_cores())
    fused = tuning.fused_module(mod, target)
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(fused, target)
        if estimate_tir_flops(t.dispatched[0]) > 1e6
    ]
    start = time.perf_counter()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work / "ms"), num_threads=tuning.num_cores()
    )
    builder = ms.builder.LocalBuilder(timeout_sec=build_timeout)
    database = ms.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work / "ms"),
        max_trials_global=trials,
        builder=builder,
    )
    seconds = time.perf_counter() - start
    records = database.get_all_tuning_records()
    valid = [r for r in records if r.run_secs and float(r.run_secs[0]) < 1e9]
    return {
        "tasks": len(tasks),
        "trials": len(records),
        "valid_trials": len(valid),
        "seconds": seconds,
    }


def run_tvmdeploy(mod, trials: int, work: Path) -> dict:
    from tvmdeploy.compiler import tuning
    from tvmdeploy.targets import get

    os.environ["TVMDEPLOY_CACHE_DIR"] = str(work / "cache")  # start empty, like stock
    start = time.perf_counter()
    result = tuning.tune(mod, get("x86-64-v4"), trials, work / "out", task_filter=in_task_set)
    seconds = time.perf_counter() - start
    store = tuning.RecordStore(tuning.cache_path("x86-64-v4"))
    valid = sum(
        1
        for key in store.workload_keys()
        for r in store.records(key)
        if r.secs < tuning.ERROR_SECS / 10
    )
    return {
        "tasks": result.summary["tuned_kernels"],
        "trials": result.summary["new_trials"],
        "valid_trials": valid,
        "seconds": seconds,
        "phase_seconds": result.summary["phase_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["stock", "tvmdeploy"], required=True)
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument(
        "--build-timeout", type=float, default=30.0, help="stock LocalBuilder timeout (s)"
    )
    args = parser.parse_args()
    import tvmdeploy.compiler  # noqa: F401 - sets TVM_NUM_THREADS before TVM loads

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tune-throughput-") as tmp:
        work = Path(tmp)
        mod = distilbert_module(work)
        if args.mode == "stock":
            row = run_stock(mod, args.trials, args.build_timeout, work)
            row["build_timeout_s"] = args.build_timeout
        else:
            row = run_tvmdeploy(mod, args.trials, work)
    row.update(
        {
            "mode": args.mode,
            "budget": args.trials,
            "trials_per_min": round(row["trials"] / row["seconds"] * 60, 2),
            "valid_trials_per_min": round(row["valid_trials"] / row["seconds"] * 60, 2),
            "seconds": round(row["seconds"], 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": len(os.sched_getaffinity(0)),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows.append(row)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    json.dump(row, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
