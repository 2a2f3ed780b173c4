"""One model shared by threads (a server's pool) or inherited across fork: same outputs, no crash.

Before the VM pool, 8 threads calling one model crashed the process (SIGSEGV in
`StorageObj::AllocTensor`); here every threaded output must equal the single-threaded one.
Risky calls run in a child process, so a crash fails the test instead of killing the session.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tvmdeploy.runtime import Bundle, load

SHAPES = [(1, 5), (2, 16), (1, 32), (2, 9), (1, 16), (2, 30)]

THREADED = textwrap.dedent("""
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from tvmdeploy.runtime import load

    bundle, artifact, threads, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    shapes = [(1, 5), (2, 16), (1, 32), (2, 9), (1, 16), (2, 30)]
    rng = np.random.default_rng(1)
    cases = []
    for k in range(calls):
        batch, seq = shapes[k % len(shapes)]
        mask = np.ones((batch, seq), np.int64)
        mask[:, seq - k % 3:] = 0 if seq > 3 else 1
        cases.append({"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": mask})
    model = load(bundle, artifact=artifact)
    expected = [model(**c)["logits"] for c in cases]  # single-threaded, first
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda c: model(**c)["logits"], cases))
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    shapes_ok = all(g.shape == e.shape for g, e in zip(got, expected))
    print(json.dumps({"worst": worst, "shapes_ok": shapes_ok, "calls": len(got),
                      "vms": getattr(model.engine, "_created", None)}))
""")


def run_child(script: str, *args, timeout: int = 600) -> dict:
    """Run `script` in a new process group; on a hang, kill the group (forked grandchildren too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_USE_RUNTIME_LIB")}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"child hung for {timeout} s (killed with its process group)")
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def profile(tiny_bundle):
    return Bundle(tiny_bundle).artifacts[0].profile


def test_eight_threads_mixed_shapes_match_single_threaded(tiny_bundle, profile):
    result = run_child(THREADED, tiny_bundle, profile, 8, 400)
    assert result["calls"] == 400 and result["shapes_ok"]
    assert result["worst"] <= 1e-6  # the same kernels on the same inputs
    assert 1 <= result["vms"] <= os.cpu_count()  # bounded pool


def test_onnxruntime_engine_is_shared_by_threads_too(tiny_bundle):
    result = run_child(THREADED, tiny_bundle, "onnxruntime", 8, 120)
    assert result["calls"] == 120 and result["shapes_ok"] and result["worst"] <= 1e-6


def test_concurrency_bound_is_respected(tiny_bundle, profile):
    from concurrent.futures import ThreadPoolExecutor

    model = load(tiny_bundle, artifact=profile, max_concurrency=2)
    ids = np.arange(64, dtype=np.int64).reshape(2, 32)
    expected = model(input_ids=ids)["logits"]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: model(input_ids=ids)["logits"], range(60)))
    assert model.engine._created <= 2
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    assert model.last_latency_ms is not None  # this thread's own last call


FORKED = textwrap.dedent("""
    import json, os, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from tvmdeploy.runtime import load

    model = load(sys.argv[1], artifact=sys.argv[2])
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    parent = model(input_ids=ids)["logits"]
    read, write = os.pipe()
    pid = os.fork()
    # the child, as a gunicorn --preload worker: the inherited model, threads, a new load
    if pid == 0:
        os.close(read)
        outcome = {"inherited": float(np.abs(model(input_ids=ids)["logits"] - parent).max())}
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda _: model(input_ids=ids)["logits"], range(40)))
        outcome["threads"] = max(float(np.abs(o - parent).max()) for o in outs)
        fresh = load(sys.argv[1], artifact=sys.argv[2])
        outcome["fresh"] = float(np.abs(fresh(input_ids=ids)["logits"] - parent).max())
        os.write(write, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    _, status = os.waitpid(pid, 0)
    after = float(np.abs(model(input_ids=ids)["logits"] - parent).max())  # the parent still works
    print(json.dumps({"child": json.loads(data or b"{}"), "status": status, "parent_after": after}))
""")


def test_a_model_loaded_before_fork_works_in_the_child(tiny_bundle, profile):
    """TVM's kernels hang on the forking thread's stale thread pool unless the engine avoids it."""
    result = run_child(FORKED, tiny_bundle, profile, timeout=120)
    assert result["status"] == 0
    assert result["child"] == {"inherited": 0.0, "threads": 0.0, "fresh": 0.0}
    assert result["parent_after"] == 0.0


MEMORY = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from tvmdeploy.runtime import load

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    model = load(sys.argv[1], artifact=sys.argv[2])
    shapes = [(1, 5), (2, 16), (1, 32), (2, 30)]
    inputs = [np.ones(s, np.int64) for s in shapes]
    for k in range(500):
        model(input_ids=inputs[k % 4])
    start = rss_mib()
    samples = []
    for k in range(10_000):
        model(input_ids=inputs[k % 4])
        if k % 1000 == 999:
            samples.append(rss_mib())
    print(json.dumps({"start": start, "samples": samples}))
""")


@pytest.mark.slow
def test_resident_memory_stays_flat_over_ten_thousand_calls(tiny_bundle, profile):
    result = run_child(MEMORY, tiny_bundle, profile, timeout=900)
    growth = max(result["samples"]) - result["start"]
    assert growth < 8, f"RSS grew {growth:.1f} MiB over 10,000 calls: {result}"
