"""The batcher on its own (no HTTP): every batch holds the oldest request waiting, requests of one
length class run in arrival order, no batch is larger than the largest bucket, and every caller
gets the rows the model gives for its input alone.

The model is the tiny compiled BERT; the recording subclass only notes which rows each call got
(and can hold the first call, so that a queue builds up behind it) before running for real.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from tvmdeploy.runtime import Model, load
from tvmdeploy.runtime.serve.batcher import Batcher
from tvmdeploy.runtime.serve.metrics import Metrics

ATOL = 1e-5
TAG_COLUMN = 1  # each request's token id here says which request a row came from


class _Recording(Model):
    """The tiny model, noting the request tags of every call's rows; the first call waits for
    `release` so that the requests sent meanwhile queue up."""

    def __init__(self, model: Model):
        super().__init__(model.bundle, model.engine, model.choice)
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, **inputs):
        self.started.set()
        assert self.release.wait(30), "the test never released the first batch"
        self.calls.append([int(t) for t in inputs["input_ids"][:, TAG_COLUMN]])
        return super().__call__(**inputs)


@pytest.fixture(scope="module")
def model(tiny_bundle) -> Model:
    return load(tiny_bundle)


def tagged(tag: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(tag)
    ids = rng.integers(1000, 30000, (1, seq), dtype=np.int64)
    ids[0, 0], ids[0, TAG_COLUMN] = 101, 20000 + tag
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


async def _send_behind_a_held_batch(
    batcher: Batcher, recording: _Recording, requests, plan: bool = True
):
    """The first request starts a batch that is held; the rest queue in order behind it.
    Without `plan`, the measured bucket times are dropped: batches are never cut for cost."""
    first = asyncio.ensure_future(batcher.run(requests[0]))
    while not recording.started.is_set():
        await asyncio.sleep(0.005)
    if not plan:
        batcher._bucket_s.clear()
    rest = [asyncio.ensure_future(batcher.run(r)) for r in requests[1:]]
    await asyncio.sleep(0.05)  # every task has queued its rows
    recording.release.set()
    return await asyncio.gather(first, *rest)


def test_batches_take_the_oldest_request_and_its_length_class_in_order(model):
    recording = _Recording(model)
    batcher = Batcher("tiny", recording, Metrics(), max_batch_delay_ms=50)
    # Lengths vary (one past the largest bucket's 32, which runs alone) so padding is exercised.
    requests = [
        tagged(k, 4 + (k * 7) % 29 if k != 5 else 40) for k in range(3 * model.max_batch + 4)
    ]
    batcher.start()
    try:
        answers = asyncio.run(_send_behind_a_held_batch(batcher, recording, requests))
    finally:
        batcher.stop()
    runs = [[tag - 20000 for tag in call] for call in recording.calls]
    assert sorted(k for run in runs for k in run) == list(range(len(requests)))
    waiting = list(range(len(requests)))
    for run in runs:  # each batch holds the oldest request left
        assert run[0] == waiting[0], f"batch {run} skipped the oldest request {waiting[0]}"
        waiting = [k for k in waiting if k not in run]
    seq_class = [16 if r["input_ids"].shape[1] <= 16 else 32 for r in requests]
    for cls in (16, 32):  # within one length class, first come first served
        served = [k for run in runs for k in run if seq_class[k] == cls and k != 5]
        assert served == sorted(served), f"class {cls} served out of order: {runs}"
    assert all(len(run) <= model.max_batch for run in runs)
    assert [5] in runs, "the over-long request did not run alone"
    assert any(len(run) == model.max_batch for run in runs), runs
    for arrays, got in zip(requests, answers, strict=True):
        want = model(**arrays)["logits"]
        np.testing.assert_allclose(got["logits"], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("classes", "expected"), [(True, [[0], [1, 3], [2, 4]]), (False, [[0], [1, 2], [3, 4]])]
)
def test_short_rows_batch_with_short_rows_not_padded_into_long_batches(model, classes, expected):
    recording = _Recording(model)
    batcher = Batcher("tiny", recording, Metrics(), max_batch_delay_ms=50, length_classes=classes)
    lengths = [10, 10, 20, 10, 20]  # classes 16, 16, 32, 16, 32 (buckets of seq 16 and 32)
    requests = [tagged(k, n) for k, n in enumerate(lengths)]
    batcher.start()
    try:
        answers = asyncio.run(_send_behind_a_held_batch(batcher, recording, requests, plan=False))
    finally:
        batcher.stop()
    runs = [[tag - 20000 for tag in call] for call in recording.calls]
    # By class, 2 waits one batch for 4; first come first served (length_classes=False) pads
    # 1 and 3 to 32 beside 2 and 4.
    assert runs == expected, runs
    for arrays, got in zip(requests, answers, strict=True):
        np.testing.assert_allclose(got["logits"], model(**arrays)["logits"], atol=ATOL, rtol=0)


def test_a_batch_is_cut_where_padding_would_cost_more_than_it_saves(model):
    """With batch 2 measured as dearer per row than batch 1 (5% is allowed), two queued rows
    run as two calls; with batch 2 cheaper per row they run as one. FIFO either way."""
    batcher = Batcher("tiny", model, Metrics(), max_batch_delay_ms=0)
    short = [tagged(k, 10) for k in range(2)]
    pending = [_pending(arrays) for arrays in short]
    batcher._bucket_s = {(1, 16): 1.0, (2, 16): 2.3, (1, 32): 1.5, (2, 32): 3.5}
    assert batcher._plan(pending) == 1
    batcher._bucket_s = {(1, 16): 1.0, (2, 16): 1.2, (1, 32): 1.5, (2, 32): 3.5}
    assert batcher._plan(pending) == 2
    # A longer second row moves the pair to the seq-32 bucket: 3.5 / 2 per row against 1.0.
    pending[1] = _pending(tagged(9, 20))
    assert batcher._plan(pending) == 1


def _pending(arrays):
    from tvmdeploy.runtime.serve.batcher import _Pending

    rows, seq = arrays["input_ids"].shape
    return _Pending(arrays, rows, seq, None, None, 0.0)
