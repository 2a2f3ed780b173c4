"""Text generation with a decoder bundle: prompt or chat in, text out, whole or streamed.

The logits come from a step engine (`StepEngine`): a compiled artifact on TVM with its paged KV
cache (decode_tvm.py), or the bundle's ONNX export on ONNX Runtime (decode_onnx.py). Everything
else is shared by both: one stepping thread owns the engine (a Relax VM must never be called from
two threads at once), and a single owner lets every running request share each decode step
(continuous batching: one `decode` call advances all of them). A new prompt is prefilled one
chunk at a time between those steps, so a long one pauses the running streams for a chunk at a
time rather than for its whole prefill. Callers, on any thread, submit a
request and read its tokens from a queue; closing a stream, or a stop string, frees the
request's sequence at the next step. Sampling is runtime/sampling.py's, whatever the engine.

With `prefix_cache` (a compiled engine), a finished request's sequence stays in the KV cache: a
later prompt that begins with the same tokens (a chat's history, a shared system prompt) takes
that sequence, pops what differs and prefills only the rest. Kept sequences hold the slots that
`max_sequences` gives (so the cache never runs out of pages) and the oldest is dropped when a
new request needs its slot.

Limits are checked before anything reaches TVM: token ids in the vocabulary (TVM's `take` has no
bounds check), a prompt shorter than the context, `max_new_tokens` cut to the room left.
One module, though long: the stepping thread, the request and its stream share private state
(the request's queue and cancel event) that no other module should reach into.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np

from .bundle import Bundle
from .chat import ChatTemplate
from .decode_tvm import PAGE_SIZE, TvmDecoder
from .errors import BundleError, InputError, OptionError
from .probe import DeviceInfo
from .sampling import Sampler, SamplingParams
from .select import ONNXRUNTIME, Choice

__all__ = ["PAGE_SIZE", "GenerationResult", "GenerationStream", "Generator", "StepEngine"]

TEXT_GENERATION = "text-generation"
#: The fewest prompt tokens worth taking from a kept sequence (one KV page; fewer save nothing).
MIN_REUSED_TOKENS = 16


@dataclass
class GenerationResult:
    """One finished request: the text, its tokens and where the time went."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token or a stop string) or "length"
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # from the call to the first token (queueing included)
    cached_tokens: int = 0  # prompt tokens whose keys came from a kept sequence (prefix_cache)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (those taken from the cache apart) per second of prefill."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (the first comes from prefill)."""
        steps = len(self.token_ids) - 1
        return steps / (self.decode_ms / 1e3) if steps > 0 and self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "time_to_first_token_ms": round(self.time_to_first_token_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


@dataclass
class _Request:
    """A request as the stepping thread sees it."""

    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    eos: frozenset[int]
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then a _Done
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    seq_id: int = -1
    keep_logits: bool = False  # keep the prefill's logits row (Generator.prefill_logits)
    # Tokens are read once, at the end (a call that neither streams nor stops at a string): the
    # stepping thread then queues only the end. Waking the caller for every token cost 0.1-0.25
    # ms of a ~4.5 ms SmolLM2 step on 2 cores (the caller's thread and the kernels' share them).
    quiet: bool = False
    logits: np.ndarray | None = None
    prefill_ms: float = 0.0
    cached: int = 0  # prompt tokens taken from a kept sequence
    filled: int = 0  # prompt tokens in its sequence so far
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when the first token was out


@dataclass
class _Done:
    finish_reason: str
    prefill_ms: float
    decode_ms: float
    error: BaseException | None = None
    first_token_ms: float = 0.0
    cached_tokens: int = 0


class StepEngine(Protocol):
    """What produces a generation's logits: the compiled artifact with its paged KV cache
    (decode_tvm.TvmDecoder) or the ONNX export on ONNX Runtime (decode_onnx.OnnxDecoder). Only
    the stepping thread calls it; everything else (queues, sampling, stop rules) is shared."""

    max_sequences: int  # sequences it holds at once
    prefill_chunk: int  # prompt tokens per prefill call

    def open(self) -> None:
        """Make the (empty) cache; called on the stepping thread before its first request."""

    def add_sequence(self, seq_id: int) -> None: ...

    def remove_sequence(self, seq_id: int) -> None: ...

    # A compiled engine also has `popn(seq_id, n)` (drop a sequence's last n tokens), which
    # prefix_cache needs; the ONNX one has none, and keeps no prefix.

    def prefill(self, seq_id: int, tokens: np.ndarray) -> np.ndarray:
        """Logits [vocab] after `tokens` [n] are appended to the sequence."""
        ...

    def decode(self, seq_ids: list[int], tokens: np.ndarray) -> np.ndarray:
        """Logits [len(seq_ids), vocab] after one more token for each sequence (valid until the
        engine's next call: a compiled engine hands out its own buffer, uncopied)."""
        ...


class _Stepper:
    """The one thread that runs the engine: admits requests (prefill), then decodes all of them."""

    def __init__(self, engine: StepEngine, prefix_cache: bool = False):
        self.engine = engine
        self.max_sequences, self.prefill_chunk = engine.max_sequences, engine.prefill_chunk
        self.prefix_cache = prefix_cache and hasattr(engine, "popn")
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()  # seq id -> its tokens, LRU
        self._pending: queue.Queue[_Request] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def submit(self, request: _Request) -> None:
        with self._lock:
            if (
                self._thread is None
                or self._pid != os.getpid()  # a forked child
                or not self._thread.is_alive()  # the engine could not open: try again
            ):
                self._pid = os.getpid()
                self._pending = queue.Queue()
                self._thread = threading.Thread(
                    target=self._run, name="tvmdeploy-generate", daemon=True
                )
                self._thread.start()
            self._pending.put(request)

    def _run(self) -> None:
        try:
            self.engine.open()
        except Exception as err:  # noqa: BLE001 - the engine's: fail what waits, end this thread
            self._fail_waiting(err)
            return
        self._kept.clear()  # a new, empty cache
        active: list[_Request] = []  # decoding
        filling: list[_Request] = []  # prompts being prefilled, first come first served
        while True:
            while len(active) + len(filling) < self.max_sequences:
                try:
                    request = self._pending.get(block=not (active or filling), timeout=None)
                except queue.Empty:
                    break
                if self._begin(request, len(active) + len(filling)):
                    filling.append(request)
            if filling:
                # A chunk of the first prompt, then a decode step: a long prompt pauses the
                # running streams for one chunk at a time, not for its whole prefill. With
                # nothing decoding it runs to its end.
                while (started := self._fill(filling[0])) is None and not active:
                    pass
                if started is not None:
                    request = filling.pop(0)
                    if started:
                        active.append(request)
            active = [r for r in active if not self._finish_if_done(r)]
            if not active:
                continue
            try:
                rows = self.engine.decode(
                    [r.seq_id for r in active], np.array([r.generated[-1] for r in active])
                )
            except Exception as err:  # noqa: BLE001 - the engine's; fail these requests only
                for r in active:
                    self._end(r, "error", err)
                active = []
                continue
            failed = set()
            for r, row in zip(active, rows, strict=True):
                try:
                    r.generated.append(r.sampler.pick(row, lambda r=r: _history(r)))
                except Exception as err:  # noqa: BLE001 - this request fails, the thread lives
                    self._end(r, "error", err)
                    failed.add(id(r))
                    continue
                if not r.quiet:
                    r.out.put(r.generated[-1])
            active = [r for r in active if id(r) not in failed and not self._finish_if_done(r)]

    def _fail_waiting(self, err: BaseException) -> None:
        """End every submitted request with `err` (the engine did not open). Under the lock, so a
        request submitted meanwhile starts a new thread instead of waiting on this one."""
        with self._lock:
            self._thread = None
            while True:
                try:
                    self._end(self._pending.get_nowait(), "error", err)
                except queue.Empty:
                    return

    def _begin(self, request: _Request, held: int) -> bool:
        """Give the request its sequence (with a kept prefix where one matches); False if it
        ended here. `held`: the sequences running and filling requests hold."""
        if request.cancelled.is_set():
            request.out.put(_Done("stop", 0.0, 0.0))
            return False
        start = time.perf_counter()
        try:
            request.cached = self._sequence_for(request, np.array(request.prompt), held)
        except Exception as err:  # noqa: BLE001 - the engine's: this one fails
            self._end(request, "error", err)
            return False
        request.filled = request.cached
        request.prefill_ms = (time.perf_counter() - start) * 1e3
        return True

    def _fill(self, request: _Request) -> bool | None:
        """Prefill the request's next chunk, and after its last sample its first token. None:
        chunks are left; True: the request decodes on; False: it ended (its first token ended
        it, or it was cancelled, or it failed)."""
        if request.cancelled.is_set():
            self._end(request, "stop")
            return False
        start = time.perf_counter()
        try:
            end = min(request.filled + self.prefill_chunk, len(request.prompt))
            chunk = np.array(request.prompt[request.filled : end])
            row = self.engine.prefill(request.seq_id, chunk)
            request.filled = end
            if end < len(request.prompt):
                request.prefill_ms += (time.perf_counter() - start) * 1e3
                return None
            if request.keep_logits:
                request.logits = np.array(row, copy=True)  # the engine's row may be reused
            request.generated.append(request.sampler(row, np.array(request.prompt)))
        except Exception as err:  # noqa: BLE001 - the engine's or the sampler's: this one fails
            self._end(request, "error", err)
            return False
        request.prefill_ms += (time.perf_counter() - start) * 1e3
        request.started = time.perf_counter()
        if not request.quiet:
            request.out.put(request.generated[-1])
        return not self._finish_if_done(request)

    def _sequence_for(self, request: _Request, prompt: np.ndarray, held: int) -> int:
        """Give `request` a sequence: the kept one sharing the longest prefix with its prompt
        (at least MIN_REUSED_TOKENS, and never the last token, whose logits are needed), the
        tokens after that prefix popped; else a new one, dropping the oldest kept sequences
        while the slots are full (`held`: the sequences other requests hold). Returns the prompt
        tokens the sequence already holds."""
        best, shared = -1, 0
        for seq_id, tokens in self._kept.items():
            n = min(tokens.size, prompt.size - 1)
            differ = np.flatnonzero(tokens[:n] != prompt[:n])
            same = int(differ[0]) if differ.size else n
            if same > shared:
                best, shared = seq_id, same
        if shared >= MIN_REUSED_TOKENS:
            held = self._kept.pop(best).size
            request.seq_id = best  # set first: a failed pop removes the sequence (_end)
            if held > shared:
                self.engine.popn(best, held - shared)  # type: ignore[attr-defined]
            return shared
        while self._kept and held + len(self._kept) >= self.max_sequences:
            oldest, _ = self._kept.popitem(last=False)
            self.engine.remove_sequence(oldest)
        request.seq_id = next(self._ids)
        self.engine.add_sequence(request.seq_id)
        return 0

    def _finish_if_done(self, r: _Request) -> bool:
        if r.cancelled.is_set() or (r.generated and r.generated[-1] in r.eos):
            self._end(r, "stop")
        elif len(r.generated) >= r.max_new_tokens:
            self._end(r, "length")
        else:
            return False
        return True

    def _end(self, r: _Request, reason: str, error: BaseException | None = None) -> None:
        if r.seq_id >= 0 and self.prefix_cache and error is None and r.generated:
            # kept: the cache holds the prompt and every generated token but the last (unfed)
            self._kept[r.seq_id] = np.array(r.prompt + r.generated[:-1], dtype=np.int64)
        elif r.seq_id >= 0:
            with contextlib.suppress(Exception):  # a sequence the failed step never added
                self.engine.remove_sequence(r.seq_id)
        decode_ms = (time.perf_counter() - r.started) * 1e3 if r.started else 0.0
        first = (r.started - r.submitted) * 1e3 if r.started else 0.0
        r.out.put(_Done(reason, r.prefill_ms, decode_ms, error, first, r.cached))


def _history(r: _Request) -> np.ndarray:
    """The ids a repetition penalty applies to: the prompt and what was generated so far."""
    return np.array(r.prompt + r.generated)


class _ForcedTokens:
    """A sampler that records each logits row and answers the next token of a fixed
    continuation (teacher forcing, `Generator.forced_logits`)."""

    def __init__(self, continuation: list[int]):
        self.rows: list[np.ndarray] = []
        self._tokens = iter(continuation)

    def __call__(self, row: np.ndarray, _history=None) -> int:
        self.rows.append(np.array(row, dtype=np.float32, copy=True))  # the engine reuses rows
        return next(self._tokens, 0)  # the last one is never fed

    pick = __call__


class GenerationStream:
    """The text of one request as it is generated: iterate for text pieces; `result` once done.

    Closing it (or leaving a `with` block) before the end frees the request's sequence."""

    def __init__(self, generator: Generator, request: _Request, stop: list[str], skip_eos: bool):
        self._generator = generator
        self._request = request
        self._stop = stop
        self._skip_eos = skip_eos
        self._ids: list[int] = []
        self._text = ""  # decoded so far, stop strings cut off
        self._sent = 0  # characters of _text already yielded
        self.result: GenerationResult | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._request.cancelled.set()

    @property
    def text_so_far(self) -> str:
        """The text yielded so far (for a stream stopped before its end)."""
        return self._text[: self._sent]

    def __iter__(self) -> Iterator[str]:
        stopped = False
        while self.result is None:
            item = self._request.out.get()
            if isinstance(item, _Done):
                if item.error is not None:
                    raise BundleError(
                        f"generation failed in {self._generator.choice.artifact}: {item.error}"
                    )
                if self._request.quiet:
                    self._read_all()
                held = self._text[self._sent :]
                if held:
                    self._sent = len(self._text)
                    yield held
                reason = "stop" if stopped else item.finish_reason
                self.result = GenerationResult(
                    self._text,
                    self._ids,
                    len(self._request.prompt),
                    reason,
                    item.prefill_ms,
                    item.decode_ms,
                    item.first_token_ms,
                    item.cached_tokens,
                )
                break
            if stopped or (self._skip_eos and item in self._request.eos):
                continue
            self._ids.append(item)
            piece = self._advance()
            if piece is None:
                stopped = True
                self.close()
                piece = self._text[self._sent :]
                self._sent = len(self._text)
            if piece:
                yield piece

    def _read_all(self) -> None:
        """A quiet request's tokens and text, read once at its end."""
        skip = self._request.eos if self._skip_eos else frozenset()
        self._ids = [t for t in self._request.generated if t not in skip]
        if self._generator.has_tokenizer:  # a half character at the end is left out, as it is
            text = self._generator.tokenizer.decode(self._ids, skip_special_tokens=True)
            self._text = text.rstrip("\ufffd")  # when streamed

    def _advance(self) -> str | None:
        """The new text safe to show; None when a stop string ended the request."""
        if not self._generator.has_tokenizer:
            return ""  # token ids only (GenerationResult.token_ids)
        text = self._generator.tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stop:
            at = text.find(stop, max(0, len(self._text) - len(stop)))
            if at >= 0:
                self._text = text[:at]
                return None
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the next token
            return ""
        self._text = text
        hold = max((_prefix_overlap(text, s) for s in self._stop), default=0)
        end = len(text) - hold
        piece = text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece


def _prefix_overlap(text: str, stop: str) -> int:
    """How many trailing characters of `text` begin `stop` (held back: they may become it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class Generator:
    """A loaded generation bundle. `generate` / `chat` may be called from any number of threads;
    up to `max_sequences` requests decode together, the rest wait their turn. With
    `prefix_cache`, a compiled engine keeps finished sequences to reuse a shared prompt prefix
    (see the module's docstring; off by default, so that timings and runs are independent)."""

    def __init__(
        self,
        bundle: Bundle,
        choice: Choice,
        device: DeviceInfo,
        max_sequences: int = 4,
        prefix_cache: bool = False,
    ):
        if max_sequences < 1:
            raise OptionError(f"max_sequences must be >= 1, not {max_sequences}")
        self.bundle, self.choice = bundle, choice
        model = bundle.model
        generation = model.get("generation") or {}
        self.vocab_size = int(model["vocab_size"])
        self.context_length = int(generation.get("context_length") or 0)
        if self.context_length < 2:
            raise BundleError(f"{bundle.path}: the manifest gives no generation.context_length")
        self.eos_token_ids = frozenset(int(t) for t in model.get("eos_token_ids") or [])
        if choice.artifact == ONNXRUNTIME:
            from .decode_onnx import OnnxDecoder

            for name in (model.get("onnx_export") or {}).get("external_data") or []:
                bundle.file(name)  # the weights of a 2 GB+ export, checked like model.onnx
            engine: StepEngine = OnnxDecoder(
                bundle.file("model.onnx"), self.context_length, max_sequences
            )
        else:
            engine = TvmDecoder(bundle, choice.artifact, device, max_sequences)
        self._stepper = _Stepper(engine, prefix_cache)
        self._tokenizer = None
        self._template: ChatTemplate | None = None

    def __repr__(self) -> str:
        return f"Generator({self.bundle.name!r}, engine={self.choice.artifact!r})"

    @property
    def task(self) -> str:
        return TEXT_GENERATION

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer/tokenizer.json" in self.bundle.manifest.get("files", {})

    @property
    def tokenizer(self):
        """The bundle's fast tokenizer (`tokenizers` library)."""
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise BundleError(
                    f"{self.bundle.path}: this bundle has no tokenizer; pass token ids instead"
                )
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.bundle.file("tokenizer/tokenizer.json")))
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._tokenizer = tokenizer
        return self._tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model's own chat template makes of `messages`."""
        if self._template is None:
            files = self.bundle.manifest.get("files", {})
            if "tokenizer/tokenizer_config.json" not in files:
                raise InputError(
                    f"{self.bundle.path}: this bundle has no tokenizer config, so no chat "
                    "template; pass a prompt instead of messages"
                )
            jinja = "tokenizer/chat_template.jinja"
            self._template = ChatTemplate(
                self.bundle.file("tokenizer/tokenizer_config.json"),
                self.bundle.file(jinja) if jinja in files else None,
            )
        return self._template.render(messages)

    def prompt_ids(self, prompt: str | list[int] | None, messages=None) -> list[int]:
        """Token ids for a prompt string, token ids as given, or chat messages."""
        if (prompt is None) == (messages is None):
            raise InputError("give either a prompt or chat messages")
        if messages is not None:
            text = self.apply_chat_template(messages)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)] if len(prompt) else []
        if not ids:
            raise InputError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"prompt token ids must lie in [0, {self.vocab_size}); found {bad[0]}")
        if len(ids) >= self.context_length:
            raise InputError(
                f"the prompt has {len(ids)} tokens; this bundle's context is "
                f"{self.context_length} tokens (prompt and completion together): shorten it"
            )
        return ids

    def generate(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        ignore_eos: bool = False,
    ) -> GenerationResult | GenerationStream:
        """Generate from a prompt (text or token ids) or chat `messages`.

        Greedy by default (`temperature=0`). Ends at an end-of-sequence token (unless
        `ignore_eos`), a `stop` string (not included in the text), `max_new_tokens`, or the
        context's end (`finish_reason="length"`). `stream=True` returns a GenerationStream that
        yields the text as it comes."""
        if max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise InputError("stop strings must be non-empty strings")
        ids = self.prompt_ids(prompt, messages)
        room = self.context_length - len(ids)
        request = _Request(
            ids,
            min(max_new_tokens, room),
            Sampler(params),
            frozenset() if ignore_eos else self.eos_token_ids,
        )
        request.quiet = not stream and not stops
        result_stream = GenerationStream(self, request, stops, skip_eos=not ignore_eos)
        self._stepper.submit(request)
        if stream:
            return result_stream
        for _ in result_stream:
            pass
        assert result_stream.result is not None
        return result_stream.result

    def prefill_logits(self, prompt: list[int]) -> np.ndarray:
        """The logits [vocab] after `prompt` (token ids): what the compile's parity gate checks
        against the reference, through the same path as `generate`."""
        request = _Request(self.prompt_ids(prompt), 1, Sampler(SamplingParams()), frozenset())
        request.keep_logits = True
        self._stepper.submit(request)
        while not isinstance(item := request.out.get(), _Done):
            pass
        if item.error is not None:
            raise BundleError(f"prefill failed in {self.choice.artifact}: {item.error}")
        assert request.logits is not None
        return request.logits

    def forced_logits(self, prompt: list[int], continuation: list[int]) -> np.ndarray:
        """Logits [1 + len(continuation), vocab] after `prompt` (ids), then after each token of
        `continuation` fed in turn (teacher forcing: the quantized gate, decoder/quality.py),
        through the prefill and one decode step per token, as `generate` runs them."""
        feed = _ForcedTokens(continuation)
        ids = self.prompt_ids(prompt)
        if len(ids) + len(continuation) >= self.context_length:
            raise InputError(
                f"prompt and forced tokens exceed the {self.context_length}-token context"
            )
        request = _Request(ids, len(continuation) + 1, feed, frozenset())  # type: ignore[arg-type]
        self._stepper.submit(request)
        while not isinstance(item := request.out.get(), _Done):
            pass
        if item.error is not None:
            raise BundleError(f"generation failed in the compiled model: {item.error}")
        return np.stack(feed.rows)

    def chat(
        self, messages: list[dict[str, str]], **options
    ) -> GenerationResult | GenerationStream:
        """`generate(messages=messages, ...)`."""
        return self.generate(messages=messages, **options)
