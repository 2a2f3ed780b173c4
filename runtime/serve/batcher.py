"""Dynamic batching: concurrent requests for one model coalesced into one call of the model.

One queue per model. A request's validated rows wait up to `max_batch_delay_ms` for others to
join, up to the largest bucket's batch (`Model.max_batch`, or `max_batch` rows if fewer: 1 turns
coalescing off); the batch runs on the model in the batcher's worker thread, never on the event
loop, and each caller gets back exactly its own rows. Sequences of different lengths are padded
to the longest in the batch with the pad token and a zero attention mask, which leaves every
row's outputs as they would be alone (outputs with a sequence axis are cut back to the caller's
length). Inputs longer than the largest bucket run alone (they take the model's batch-1
symbolic-length path anyway), and without an attention mask only rows of one length share a
batch.

Which rows share a batch: the oldest request and those after it, first come first served (with
`length_classes`, the others of its length class first, then shorter ones only where they fill
rows the bucket pads anyway: `_candidates`); that list is cut where a smaller bucket costs less
per row (`_plan`), by each bucket's time, measured once before serving and then followed as
batches run. The oldest always runs.

Past `max_queue` waiting rows a request is refused at once with 429 and `Retry-After`. An error
in a batch goes to that batch's callers only; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..model import Model
from .errors import QueueFull, ServeError
from .metrics import Metrics

Arrays = dict[str, np.ndarray]
log = logging.getLogger("tvmdeploy.serve")


@dataclass
class _Pending:
    arrays: Arrays
    rows: int
    seq: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


class Batcher:
    """The queue and worker thread of one model."""

    def __init__(
        self,
        name: str,
        model: Model,
        metrics: Metrics,
        max_batch_delay_ms: float = 2.0,
        max_queue: int = 256,
        max_batch: int | None = None,
        length_classes: bool = False,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.name = name
        self.model = model
        self.metrics = metrics
        self.delay_s = max(0.0, max_batch_delay_ms) / 1e3
        self.max_queue = max_queue
        # At most the largest bucket's batch; 1 turns coalescing off (each request runs alone).
        self.max_batch = min(model.max_batch, max_batch or model.max_batch)
        self._masked = "attention_mask" in model.input_names
        self._length_classes = length_classes  # False: one class, first come first served
        self._seq_axes = [
            "seq" in (spec.get("axes") or []) for spec in model.bundle.outputs
        ]  # per output, in the model's order
        self._output_names = [spec["name"] for spec in model.bundle.outputs]
        self._queue: deque[_Pending] = deque()
        self._waiting_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_s = 0.01  # running mean of a batch's time, for Retry-After
        self._bucket_s: dict[tuple[int, int], float] = {}  # running mean time of each bucket
        #: Set once the buckets are timed (and warm): the app is ready from then on.
        self.warmed = threading.Event()

    # -- the event loop's side ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"tvmdeploy-batcher-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def run(self, arrays: Arrays) -> Arrays:
        """The model's outputs for these validated arrays (one request's rows)."""
        rows, seq = arrays["input_ids"].shape
        if rows > self.max_queue:
            raise ServeError(
                413,
                f"the request holds {rows} rows, more than this server queues ({self.max_queue}, "
                "--max-queue); split it",
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(arrays, rows, seq, loop.create_future(), loop, time.monotonic())
        with self._cond:
            if self._stopping or self._thread is None:
                raise ServeError(503, f"model {self.name!r} is not serving (shutting down)")
            if self._waiting_rows + rows > self.max_queue:
                batches = math.ceil((self._waiting_rows + rows) / self.max_batch)
                retry = max(1, math.ceil(batches * self._batch_s + self.delay_s))
                raise QueueFull(
                    f"model {self.name!r} has {self._waiting_rows} rows waiting, the most this "
                    f"server queues is {self.max_queue} (--max-queue); retry in {retry} s",
                    retry,
                )
            self._queue.append(pending)
            self._waiting_rows += rows
            self.metrics.queue_rows.labels(self.name).set(self._waiting_rows)
            self._cond.notify()
        return await pending.future

    # -- the worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._measure_buckets()
        finally:
            self.warmed.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.delay_s
            while self._waiting_rows < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            candidates = self._candidates()
            batch = candidates[: self._plan(candidates)]
            taken = {id(p) for p in batch}
            self._queue = deque(p for p in self._queue if id(p) not in taken)
            self._waiting_rows -= sum(p.rows for p in batch)
            self.metrics.queue_rows.labels(self.name).set(self._waiting_rows)
            return batch

    def _candidates(self) -> list[_Pending]:
        """The requests that may share the oldest one's batch, in the order they may be cut:
        the oldest, the others of its length class (the bucket seq it pads to) oldest first,
        then shorter ones where they fill rows that the bucket would pad anyway. A row of 16
        tokens padded to 32 costs as much as one of 32 (MiniLM, bench/serve.py), so lengths are
        not mixed for nothing. The oldest request always runs and none is passed by a younger
        one of its own class, so a request waits at most for those older than it."""
        head = self._queue[0]
        chosen, rows = [head], head.rows
        if head.seq > self.model.max_seq:
            return chosen  # the symbolic-length path, alone
        cls = self._class_seq(head.seq)
        shorter = []
        for candidate in itertools.islice(self._queue, 1, None):
            if rows >= self.max_batch:
                break
            if not self._joins(chosen, candidate, rows):
                continue
            if self._class_seq(candidate.seq) == cls:
                chosen.append(candidate)
                rows += candidate.rows
            elif candidate.seq < cls:
                shorter.append(candidate)
        key = self._bucket_key(rows, cls)
        room = min(key[0] if key else rows, self.max_batch) - rows
        for candidate in shorter:
            if candidate.rows > room:
                break
            chosen.append(candidate)
            room -= candidate.rows
        return chosen

    def _class_seq(self, seq: int) -> int:
        """The sequence length rows of `seq` tokens run at: the smallest bucket seq holding
        them; engines that take any shape have one class (the largest)."""
        if not self.model.engine.fixed_shapes or not self._length_classes:
            return self.model.max_seq
        return min(b.seq for b in self.model.bundle.buckets if b.seq >= seq)

    def _plan(self, candidates: list[_Pending]) -> int:
        """How many of the candidates (`_candidates`' order) to run now: the prefix whose
        bucket costs least per row, by the bucket times measured (a bigger batch wins unless a
        smaller one is 5% cheaper per row). Padding 4 rows to an 8-row bucket can cost more than
        4 calls of batch 1; the rows left run next, first in line."""
        if not self._bucket_s or len(candidates) == 1:
            return len(candidates)
        best_k, best = len(candidates), math.inf
        rows = seq = 0
        for k, pending in enumerate(candidates, 1):
            rows, seq = rows + pending.rows, max(seq, pending.seq)
            seconds = self._bucket_s.get(self._bucket_key(rows, seq))
            if seconds is None:
                continue
            if seconds / rows <= best * 1.05:
                best_k, best = k, min(best, seconds / rows)
        return best_k

    def _bucket_key(self, rows: int, seq: int) -> tuple[int, int] | None:
        """The (batch, seq) of the bucket these rows run in as one call, or None (no bucket
        holds them: the model runs them in chunks, or takes any shape)."""
        fits = [
            b
            for b in self.model.bundle.buckets
            if b.batch >= rows and b.seq >= seq and self.model.engine.fixed_shapes
        ]
        if not fits:
            return None
        bucket = self.model.bucket_for(rows, seq)
        return (bucket.batch, bucket.seq)

    def _measure_buckets(self) -> None:
        """Each bucket's time, once, before serving (it also warms the code): what `_plan`
        weighs batch sizes by until the batches' own times refine it. Engines that take any
        shape (ONNX Runtime) are not planned: every joining request runs in the batch."""
        if not self.model.engine.fixed_shapes:
            return
        batches = [b.batch for b in self.model.bundle.buckets]
        largest = min(b for b in batches if b >= self.max_batch)  # max_batch rows pad to it
        for bucket in self.model.bundle.buckets:
            if bucket.batch > largest:
                continue  # never run: batches stay within max_batch rows
            shape = (bucket.batch, bucket.seq)
            arrays = {n: np.zeros(shape, np.int64) for n in self.model.input_names}
            arrays["input_ids"][:] = self.model.pad_token_id
            if "attention_mask" in arrays:
                arrays["attention_mask"][:] = 1
            try:
                self.model.engine.run(bucket, arrays)  # the first call pays one-time costs
                seconds = math.inf
                for _ in range(3):  # the least of 3: one preempted call does not decide
                    start = time.perf_counter()
                    self.model.engine.run(bucket, arrays)
                    seconds = min(seconds, time.perf_counter() - start)
            except Exception:  # a model that cannot run here fails its requests, not the worker
                log.exception("measuring bucket %s of model %s failed", shape, self.name)
                self._bucket_s.clear()
                return
            self._bucket_s[shape] = seconds

    def _joins(self, batch: list[_Pending], candidate: _Pending, rows: int) -> bool:
        if rows + candidate.rows > self.max_batch or candidate.seq > self.model.max_seq:
            return False
        return self._masked or candidate.seq == batch[0].seq

    def _run(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            outputs = self.model(**self._merge(batch))
        except Exception as error:  # back to this batch's callers only
            if not isinstance(error, ServeError | ValueError):
                log.exception("batch of %d requests failed on model %s", len(batch), self.name)
            for pending in batch:
                _resolve(pending, error=error)
            return
        seconds = time.perf_counter() - start
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        rows = sum(p.rows for p in batch)
        key = self._bucket_key(rows, max(p.seq for p in batch))
        if key in self._bucket_s:
            self._bucket_s[key] = 0.8 * self._bucket_s[key] + 0.2 * seconds
        self.metrics.batch_rows.labels(self.name).observe(rows)
        self.metrics.batch_latency.labels(self.name).observe(seconds)
        row = 0
        for pending in batch:
            own = {}
            for name, has_seq in zip(self._output_names, self._seq_axes, strict=True):
                part = outputs[name][row : row + pending.rows]
                own[name] = part[:, : pending.seq] if has_seq else part
            row += pending.rows
            _resolve(pending, result=own)

    def _merge(self, batch: list[_Pending]) -> Arrays:
        if len(batch) == 1:
            return batch[0].arrays
        seq = max(p.seq for p in batch)
        merged = {}
        for name in batch[0].arrays:
            fill = self.model.pad_token_id if name == "input_ids" else 0
            parts = [
                np.pad(p.arrays[name], ((0, 0), (0, seq - p.seq)), constant_values=fill)
                for p in batch
            ]
            merged[name] = np.concatenate(parts)
        return merged


def _resolve(pending: _Pending, result: Arrays | None = None, error: Exception | None = None):
    """Hand a result to its caller on the caller's event loop (a gone caller is skipped)."""

    def deliver() -> None:
        if pending.future.done():  # the client went away and its handler was cancelled
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    try:
        pending.loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop has closed
        pass
