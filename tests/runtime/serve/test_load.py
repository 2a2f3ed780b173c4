"""A bounded load test of `tvmdeploy serve`: 64 concurrent clients on loopback for a fixed few
seconds against the tiny compiled BERT, each sending v2 `infer` (and some `predict`) requests
with its own random inputs.

Checked: no request fails with the queue above the load; every answer equals the model called
alone on that request's input; the process's resident memory stays flat once warm; and the
server did batch (batches of more than one row). Inputs are drawn from a per-request seed, so
only the seed and the answer are kept while the load runs, and the answers are checked after.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import numpy as np
from tvmdeploy.runtime import load
from tvmdeploy.runtime.serve import create_app

from tests.runtime.serve.test_server import running, v2_body

CLIENTS = 64
WARMUP_S = 3.0
RUN_S = 5.0
ATOL = 1e-5
RSS_GROWTH_MIB = 16  # allowed growth from the warm point (3 s in) to the end (8 s); ~5 seen
WORDS = ("a", "moving", "beautifully", "acted", "film", "dull", "and", "far", "too", "long")


def vm_rss_mib() -> float:
    """This process's resident set (server and clients alike), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def infer_input(seed: int) -> dict[str, np.ndarray]:
    """One request's rows: batch 1 or 2, length 3..32, the second row padded at random."""
    rng = np.random.default_rng(seed)
    rows, seq = int(rng.integers(1, 3)), int(rng.integers(3, 33))
    ids = rng.integers(1000, 30000, (rows, seq), dtype=np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    if rows == 2:
        mask[1, int(rng.integers(2, seq + 1)) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def predict_input(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(rng.integers(1, 3))
    ]


async def client(base: str, number: int, stop: float, answers: list, errors: list) -> None:
    # Plain http on loopback: verify=False spares each client loading a TLS context (~70 ms).
    async with httpx.AsyncClient(base_url=base, timeout=30, verify=False) as http:
        k = 0
        while time.monotonic() < stop:
            seed = number * 1_000_000 + k
            k += 1
            predict = k % 5 == 0  # every fifth request of a client is a text request
            try:
                if predict:
                    r = await http.post(
                        "/v2/models/tiny/predict", json={"text": predict_input(seed)}
                    )
                else:
                    r = await http.post("/v2/models/tiny/infer", json=v2_body(infer_input(seed)))
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            body = r.json()
            if predict:
                answers.append(
                    ("predict", seed, [(p["label"], p["score"]) for p in body["labels"]])
                )
            else:
                (out,) = body["outputs"]
                got = np.asarray(out["data"], np.float32).reshape(out["shape"])
                answers.append(("infer", seed, got))


async def load_run(base: str) -> tuple[list, list, list[float]]:
    answers: list = []
    errors: list = []
    rss: list[float] = []
    stop = time.monotonic() + WARMUP_S + RUN_S
    tasks = [asyncio.create_task(client(base, n, stop, answers, errors)) for n in range(CLIENTS)]
    await asyncio.sleep(WARMUP_S)
    while time.monotonic() < stop:
        rss.append(vm_rss_mib())
        await asyncio.sleep(0.25)
    await asyncio.gather(*tasks)
    rss.append(vm_rss_mib())
    return answers, errors, rss


def metric(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, f"no {pattern!r} in /metrics"
    return float(found[1])


def test_64_clients_for_seconds_no_errors_exact_answers_flat_memory(tiny_bundle):
    served = load(tiny_bundle)
    app = create_app({"tiny": served}, max_batch_delay_ms=2, max_queue=4 * CLIENTS)
    with running(app) as base:
        answers, errors, rss = asyncio.run(load_run(base))
        text = httpx.get(f"{base}/metrics").text

    assert errors == [], f"{len(errors)} of {len(errors) + len(answers)} failed: {errors[:5]}"
    infers = sum(kind == "infer" for kind, *_ in answers)
    assert infers >= 4 * CLIENTS and len(answers) - infers >= CLIENTS, len(answers)

    reference = load(tiny_bundle)  # a model of its own, called alone on each request's input
    for kind, seed, got in answers:
        if kind == "infer":
            want = reference(**infer_input(seed))["logits"]
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"seed {seed}")
        else:
            want = reference.predict(predict_input(seed))
            assert [label for label, _ in got] == [p.label for p in want], seed
            np.testing.assert_allclose([s for _, s in got], [p.score for p in want], atol=ATOL)

    growth = rss[-1] - rss[0]
    assert growth < RSS_GROWTH_MIB, f"RSS grew {growth:.1f} MiB under load: {rss}"

    batches = metric(text, r'tvmdeploy_batch_rows_count\{model="tiny"\} (\S+)')
    one_row = metric(text, r'tvmdeploy_batch_rows_bucket\{le="1.0",model="tiny"\} (\S+)')
    assert batches > one_row, "no batch held more than one row"
    served_ok = metric(
        text, r'tvmdeploy_requests_total\{model="tiny",route="infer",status="200"\} (\S+)'
    )
    assert served_ok == infers
