"""The ONNX compatibility table: every corpus file (bench/onnx_corpus.py) through `tvmdeploy
compile` and `load()`, against ONNX Runtime on the original file, in one process.

    python bench/compatibility.py              # all entries, writes the docs table
    python bench/compatibility.py bert-ort-o2  # some entries (the docs table is left alone)

For each entry: whether it compiles, the largest difference from ONNX Runtime on the original
file (batch 2 x 12 tokens padded into a 16-token bucket, one row half masked), compile seconds,
and p50 latency at batch 1 x 16 of tvmdeploy and ONNX Runtime. Writes
bench/results/compatibility.json and the table in docs/compatibility.md (between the markers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.onnx_corpus import ENTRIES, make
from bench.precision import cpu_description, log

RESULTS = ROOT / "bench" / "results" / "compatibility.json"
DOCS = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- compatibility:begin -->", "<!-- compatibility:end -->"


def p50(fn, runs: int = 50) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_entry(name: str, work: Path) -> dict:
    import numpy as np
    import onnxruntime
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import load

    from bench.onnx_corpus import inputs_for, reference

    entry = ENTRIES[name]
    row = {"name": name, "exporter": entry.exporter, "family": entry.family, "task": entry.task}
    path = make(entry, work / name)
    start = time.perf_counter()
    try:
        bundle = compile_model(
            CompileOptions(model=str(path), output=str(work / f"{name}.tvmd"), buckets="1,2x16")
        )
    except Exception as err:  # noqa: BLE001 - the table records why
        row.update(result="fails", error=f"{type(err).__name__}: {str(err)[:200]}")
        return row
    row["compile_s"] = round(time.perf_counter() - start, 1)
    model = load(bundle, precision="fp32")
    feed = inputs_for(path)
    got, expected = model(**feed), reference(path, feed)
    row["max_abs_diff"] = max(
        float(np.abs(np.asarray(got[k], np.float64) - v.astype(np.float64)).max())
        for k, v in expected.items()
    )
    row["artifact"] = model.choice.artifact
    one = inputs_for(path, batch=1, seq=16)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = {
        i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in session.get_inputs()
    }
    ort_feed = {n: one[n].astype(dtypes[n]) for n in dtypes}
    row["tvmdeploy_ms"] = round(p50(lambda: model(**one)), 3)
    row["onnxruntime_ms"] = round(p50(lambda: session.run(None, ort_feed)), 3)
    row["result"] = "parity"
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| file | exporter | family | task | result | max abs diff vs ORT | compile "
        + "| 1x16 p50 tvmdeploy / ORT |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["result"] != "parity":
            lines.append(
                f"| {r['name']} | {r['exporter']} | {r['family']} | {r['task']} | "
                f"fails: {r['error']} | | | |"
            )
            continue
        ratio = r["tvmdeploy_ms"] / r["onnxruntime_ms"]
        lines.append(
            f"| {r['name']} | {r['exporter']} | {r['family']} | {r['task']} | parity | "
            f"{r['max_abs_diff']:.1e} | {r['compile_s']:.0f} s | "
            f"{r['tvmdeploy_ms']:.3f} / {r['onnxruntime_ms']:.3f} ms ({ratio:.2f}x) |"
        )
    return "\n".join(lines)


def update_docs(text: str) -> None:
    doc = DOCS.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="*", help="corpus entries (default: all)")
    args = parser.parse_args()
    names = args.entries or sorted(ENTRIES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-compat-") as work:
        for name in names:
            log(f"{name} …")
            rows.append(run_entry(name, Path(work)))
            log(f"{name}: {rows[-1]['result']}")
    cpu = cpu_description()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"cpu": cpu, "python": platform.python_version(), "rows": rows}, indent=2) + "\n"
    )
    text = table(rows)
    print(text)
    if not args.entries:
        stamp = time.strftime("%Y-%m-%d")
        update_docs(f"Measured {stamp} on {cpu}; `python bench/compatibility.py`.\n\n{text}")


if __name__ == "__main__":
    main()
