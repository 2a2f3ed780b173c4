"""The model session: validated numpy inputs in, numpy outputs out, on the chosen engine.

Inputs of any batch and sequence length up to the largest bucket are padded to the smallest
bucket that fits (padding masked out) and outputs are sliced back; batches larger than the
largest bucket run in chunks. Token ids are range-checked here because TVM's embedding `take`
is compiled without bounds checks and would read out of bounds (or segfault) on a bad id.

A `Model` may be called from any number of threads at once (the engine keeps one VM per
concurrent caller, engine.py); `last_latency_ms` is per thread.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bucket, Bundle
from .engine import Arrays, Engine, OnnxRuntimeEngine, TvmEngine
from .errors import BundleError, InputError, OptionError
from .generate import TEXT_GENERATION, Generator
from .inputs import synthetic_inputs
from .precision import admits_fp32
from .probe import DeviceInfo, probe
from .select import ONNXRUNTIME, Choice, cached_latencies, remember_latencies, select
from .tasks import (
    CLASSIFICATION,
    EMBEDDING,
    TOKEN_CLASSIFICATION,
    Entity,
    Prediction,
    entities,
    labels,
    task_of,
    vectors,
)

__all__ = ["Entity", "Model", "Prediction", "load"]


class Model:
    """A loaded bundle: call it with token arrays, or `predict` with texts."""

    def __init__(self, bundle: Bundle, engine: Engine, choice: Choice):
        self.bundle = bundle
        self.engine = engine
        self.choice = choice
        self._per_thread = threading.local()
        model = bundle.model
        self.vocab_size = int(model["vocab_size"])
        self.type_vocab_size = int(model.get("type_vocab_size", 1))
        self.pad_token_id = int(model.get("pad_token_id", 0) or 0)
        self.input_names = [i["name"] for i in bundle.inputs]
        self.max_batch = max(b.batch for b in bundle.buckets)
        self.max_seq = max(b.seq for b in bundle.buckets)
        #: The function for inputs longer than the largest bucket (batch 1, symbolic length),
        #: where the chosen artifact holds one; ONNX Runtime takes any length itself.
        artifact = getattr(engine, "artifact", None)
        self.fallback = bundle.fallback if artifact is not None and artifact.fallback else None
        limit = bundle.model.get("max_position_embeddings")
        if self.fallback is not None:
            self.max_input_seq = self.fallback.seq
        elif not engine.fixed_shapes and isinstance(limit, int) and limit > self.max_seq:
            self.max_input_seq = limit
        else:
            self.max_input_seq = self.max_seq
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"Model({self.bundle.name!r}, engine={self.choice.artifact!r})"

    @property
    def last_latency_ms(self) -> float | None:
        """Wall time of this thread's last call (ms), or None before its first call."""
        return getattr(self._per_thread, "latency_ms", None)

    # -- inputs -----------------------------------------------------------------------------
    def validate(self, inputs: dict[str, Any]) -> Arrays:
        """Checked int64 arrays by input name, with defaults for the optional inputs; raises
        InputError (naming the input and what to do) before anything reaches TVM."""
        unknown = set(inputs) - set(self.input_names)
        if unknown:
            raise InputError(
                f"unknown input(s) {sorted(unknown)}; this model takes {self.input_names}"
            )
        if "input_ids" not in inputs:
            raise InputError("input_ids is required")
        arrays: Arrays = {}
        for name, value in inputs.items():
            array = np.asarray(value)
            if array.dtype.kind not in "iu":
                raise InputError(
                    f"{name} must hold integers (token ids or mask), got dtype {array.dtype}"
                )
            if array.ndim != 2:
                raise InputError(
                    f"{name} must be 2-D [batch, sequence], got shape {array.shape}"
                    + (" (add a batch axis: x[None, :])" if array.ndim == 1 else "")
                )
            arrays[name] = array.astype(np.int64, copy=False)
        shape = arrays["input_ids"].shape
        for name, array in arrays.items():
            if array.shape != shape:
                raise InputError(
                    f"{name} has shape {array.shape} but input_ids has {shape}; they must match"
                )
        if shape[0] == 0 or shape[1] == 0:
            raise InputError(f"empty input: input_ids has shape {shape}")
        if shape[1] > self.max_input_seq:
            if self.max_input_seq > self.max_seq:
                raise InputError(
                    f"sequence length {shape[1]} exceeds this model's limit of "
                    f"{self.max_input_seq} tokens; truncate the input"
                )
            raise InputError(
                f"sequence length {shape[1]} exceeds the largest bucket ({self.max_seq}) of this "
                f"bundle; truncate the input or recompile with a larger --buckets seq"
            )
        ids = arrays["input_ids"]
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            raise InputError(f"input_ids must lie in [0, {self.vocab_size}); found {bad.flat[0]}")
        mask = arrays.get("attention_mask")
        if mask is not None and (mask.min() < 0 or mask.max() > 1):
            raise InputError("attention_mask must hold only 0 and 1")
        if "token_type_ids" in arrays:
            types = arrays["token_type_ids"]
            if types.min() < 0 or types.max() >= self.type_vocab_size:
                raise InputError(f"token_type_ids must lie in [0, {self.type_vocab_size})")
        for name in self.input_names:  # defaults for the optional inputs
            if name not in arrays:
                if name == "attention_mask":
                    arrays[name] = np.ones(shape, np.int64)
                elif name == "token_type_ids":
                    arrays[name] = np.zeros(shape, np.int64)
                else:
                    raise InputError(f"input {name} is required by this model")
        return arrays

    def bucket_for(self, batch: int, seq: int) -> Bucket:
        """The smallest bucket (fewest padded tokens) that holds batch x seq."""
        fits = [b for b in self.bundle.buckets if b.batch >= batch and b.seq >= seq]
        if not fits:
            raise InputError(
                f"no bucket holds batch {batch} x seq {seq} (largest seq is {self.max_seq})"
            )
        return min(fits, key=lambda b: (b.batch * b.seq, b.seq))

    def pad(self, arrays: Arrays, bucket: Bucket) -> Arrays:
        """Arrays padded to the bucket's shape: pad tokens masked out, padding rows kept finite."""
        batch, seq = arrays["input_ids"].shape
        if (batch, seq) == (bucket.batch, bucket.seq):
            return arrays  # an exact fit (the common case when buckets match the traffic)
        padded = {}
        for name, array in arrays.items():
            fill = self.pad_token_id if name == "input_ids" else 0
            out = np.full((bucket.batch, bucket.seq), fill, np.int64)
            out[:batch, :seq] = array
            if name == "attention_mask" and bucket.batch > batch:
                out[batch:, 0] = 1  # padding rows attend to one token: no all-masked softmax rows
            padded[name] = out
        return padded

    def _slice(self, outputs: list[np.ndarray], batch: int, seq: int) -> list[np.ndarray]:
        sliced = []
        for spec, array in zip(self.bundle.outputs, outputs, strict=True):
            index = tuple(
                slice(0, batch)
                if axis == "batch"
                else slice(0, seq)
                if axis == "seq"
                else slice(None)
                for axis in spec.get("axes", [])
            )
            sliced.append(array[index] if index else array)
        return sliced

    # -- running ----------------------------------------------------------------------------
    def run_bucket(self, arrays: Arrays) -> list[np.ndarray]:
        """Run validated arrays of at most the largest bucket's batch; pad and slice as needed."""
        batch, seq = arrays["input_ids"].shape
        if not self.engine.fixed_shapes:
            return self.engine.run(None, arrays)
        bucket = self.bucket_for(batch, seq)
        return self._slice(self.engine.run(bucket, self.pad(arrays, bucket)), batch, seq)

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        """Run the model. Takes `input_ids` [batch, seq] and optionally `attention_mask`,
        `token_type_ids`; returns the model's outputs by name (e.g. `logits`)."""
        arrays = self.validate(inputs)
        start = time.perf_counter()
        batch, seq = arrays["input_ids"].shape
        if seq > self.max_seq:
            outputs = self._run_long(arrays)
            self._per_thread.latency_ms = (time.perf_counter() - start) * 1e3
            return outputs
        chunk = max(b.batch for b in self.bundle.buckets if b.seq >= seq)
        parts = [
            self.run_bucket({n: a[i : i + chunk] for n, a in arrays.items()})
            for i in range(0, batch, chunk)
        ]
        self._per_thread.latency_ms = (time.perf_counter() - start) * 1e3
        names = [o["name"] for o in self.bundle.outputs]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}

    def _run_long(self, arrays: Arrays) -> dict[str, np.ndarray]:
        """Inputs longer than every bucket: ONNX Runtime as they are, or the artifact's
        symbolic-length function one row at a time (it is compiled for batch 1)."""
        names = [o["name"] for o in self.bundle.outputs]
        if not self.engine.fixed_shapes:
            return dict(zip(names, self.engine.run(None, arrays), strict=True))
        seq = arrays["input_ids"].shape[1]
        bucket = Bucket(self.fallback.function, 1, seq)
        rows = [
            self.engine.run(bucket, {n: a[i : i + 1] for n, a in arrays.items()})
            for i in range(arrays["input_ids"].shape[0])
        ]
        return {name: np.concatenate([r[k] for r in rows]) for k, name in enumerate(names)}

    # -- text -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The bundle's fast tokenizer (`tokenizers` library), truncating to the longest input
        this model takes."""
        if self._tokenizer is None:
            if "tokenizer/tokenizer.json" not in self.bundle.manifest.get("files", {}):
                raise BundleError(
                    f"{self.bundle.path}: this bundle has no tokenizer; pass token ids instead"
                )
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.bundle.file("tokenizer/tokenizer.json")))
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=self.max_input_seq)
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode(self, texts: list[str], encodings=None) -> Arrays:
        """Token arrays for `texts`, padded to the longest one (`encodings`: the tokenizer's,
        where the caller has them already)."""
        if encodings is None:
            encodings = self.tokenizer.encode_batch(list(texts))
        longest = max(len(e.ids) for e in encodings)
        arrays = {name: np.zeros((len(texts), longest), np.int64) for name in self.input_names}
        if "input_ids" in arrays:
            arrays["input_ids"][:] = self.pad_token_id
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            arrays["input_ids"][row, :n] = encoding.ids
            if "attention_mask" in arrays:
                arrays["attention_mask"][row, :n] = encoding.attention_mask
            if "token_type_ids" in arrays:
                arrays["token_type_ids"][row, :n] = encoding.type_ids
        return arrays

    @property
    def task(self) -> str:
        """The model's task (runtime/tasks.py): text-classification, token-classification,
        feature-extraction, question-answering, or unknown."""
        return task_of(self.bundle.model, self.bundle.outputs)

    def predict(self, texts: list[str] | str) -> list[Prediction] | list[list[Entity]] | np.ndarray:
        """What the task calls for, per text: the top label and its softmax score
        (classification), the entities found (token classification), or one vector
        (embedding models: [len(texts), dim])."""
        if isinstance(texts, str):
            texts = [texts]
        task = self.task
        if task not in (CLASSIFICATION, TOKEN_CLASSIFICATION, EMBEDDING):
            raise InputError(
                f"predict() covers classification, token classification and embeddings; this "
                f"model's task is {task}: call the model with token arrays instead"
            )
        if not texts:
            return np.zeros((0, 0), np.float32) if task == EMBEDDING else []
        encodings = self.tokenizer.encode_batch(list(texts))
        arrays = self.encode(texts, encodings)
        outputs = self(**arrays)
        id2label = {int(k): v for k, v in self.bundle.model.get("id2label", {}).items()}
        if task == EMBEDDING:
            mask = arrays.get("attention_mask", np.ones_like(arrays["input_ids"]))
            return vectors(outputs, mask)
        logits = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
        if task == TOKEN_CLASSIFICATION:
            return entities(logits, id2label, list(texts), encodings)
        return labels(logits, id2label)


def make_engine(
    bundle: Bundle, name: str, device: DeviceInfo, max_concurrency: int | None = None
) -> Engine:
    """The engine for a choice: ONNX Runtime, or the named artifact on TVM."""
    if name == ONNXRUNTIME:
        return OnnxRuntimeEngine(bundle)
    return TvmEngine(bundle, name, device, max_concurrency)


def measure_candidates(
    bundle: Bundle, device: DeviceInfo, candidates: list[str], runs: int = 10
) -> dict[str, float]:
    """Time each candidate briefly (median ms) on a mid-sized bucket of batch 1."""
    batch_one = [b for b in bundle.buckets if b.batch == min(x.batch for x in bundle.buckets)]
    bucket = batch_one[len(batch_one) // 2]
    names = [i["name"] for i in bundle.inputs]
    arrays = synthetic_inputs(names, int(bundle.model["vocab_size"]), bucket.batch, bucket.seq)
    latencies = {}
    for name in candidates:
        model = Model(bundle, make_engine(bundle, name, device), Choice(name, "measuring"))
        times = []
        for k in range(runs + 2):
            start = time.perf_counter()
            model.run_bucket(arrays)
            if k >= 2:
                times.append((time.perf_counter() - start) * 1e3)
        latencies[name] = float(np.median(times))
    return latencies


def load(
    bundle_dir: str | Path,
    artifact: str | None = None,
    policy: str = "auto",
    verify: bool = False,
    max_concurrency: int | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
    precision: str = "auto",
    prefix_cache: bool = False,
) -> Model | Generator:
    """Load a bundle and pick the engine for this device.

    A generation bundle (a compiled causal LM) loads as a `Generator` (runtime/generate.py);
    there `max_concurrency` is how many requests decode together, and `prefix_cache=True` keeps
    finished sequences in the KV cache so that a prompt sharing their first tokens (a chat's
    history) prefills only the rest (a compiled artifact; ONNX Runtime keeps none).

    `precision` ("auto", "fp32", "int8", "bf16", "fp16") restricts the choice to artifacts of
    that precision; "auto" takes a reduced precision only where the bundle records its task
    accuracy within the bundle's accuracy gate of fp32 (`model.choice` says which and why).
    `artifact` forces a profile (or "onnxruntime"); one this device cannot run is refused before
    anything is loaded. `policy="measure"` times every compatible candidate once per device and
    caches the winner; `policy="auto"` uses measurements where they exist, else the rule.
    `verify=True` checks every file's checksum up front (the files used are always checked).
    `max_concurrency` bounds how many threads run the model at once (default: one per core);
    more callers wait for a free slot. `trusted_keys` (public key files or hex; default
    `$TVMDEPLOY_TRUSTED_KEYS`) makes the load refuse, before any library is opened, a bundle that
    is unsigned, signed by another key, or changed after signing.
    """
    if policy not in ("auto", "measure"):
        raise OptionError(f"policy must be 'auto' or 'measure', not {policy!r}")
    bundle = Bundle(bundle_dir, trusted_keys=trusted_keys)
    if verify:
        bundle.verify()
    device = probe()
    has_ort = importlib.util.find_spec(
        "onnxruntime"
    ) is not None and "model.onnx" in bundle.manifest.get("files", {})
    if bundle.model.get("task") == TEXT_GENERATION:
        if artifact == ONNXRUNTIME and not has_ort:
            raise BundleError(_no_onnx_engine(bundle))
        choice = select(
            bundle, device, artifact=artifact, onnxruntime_available=has_ort, precision=precision
        )
        return Generator(
            bundle, choice, device, max_sequences=max_concurrency or 4, prefix_cache=prefix_cache
        )
    if policy == "measure" and artifact is None:
        first = select(bundle, device, onnxruntime_available=has_ort, precision=precision)
        eligible = [n for n in first.compatible if n not in first.rejected]
        candidates = eligible + ([ONNXRUNTIME] if has_ort and admits_fp32(precision) else [])
        if set(candidates) - set(cached_latencies(bundle, device)):
            remember_latencies(bundle, device, measure_candidates(bundle, device, candidates))
    choice = select(
        bundle, device, artifact=artifact, onnxruntime_available=has_ort, precision=precision
    )
    return Model(bundle, make_engine(bundle, choice.artifact, device, max_concurrency), choice)


def _no_onnx_engine(bundle: Bundle) -> str:
    """Why `artifact="onnxruntime"` cannot run this generation bundle."""
    if "model.onnx" not in bundle.manifest.get("files", {}):
        why = (bundle.model.get("onnx_export") or {}).get("detail") or "compiled without it"
        return f"{bundle.path}: this bundle holds no ONNX export ({why}); load a compiled artifact"
    return f"{bundle.path}: onnxruntime is not installed; `pip install onnxruntime` to run it"
