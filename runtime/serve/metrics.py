"""The server's Prometheus metrics, in a registry of each app's own.

One registry per app (never prometheus_client's global one), so a process that creates several
apps, as the tests do, registers no metric twice and each `/metrics` shows only its own app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from ..generate import GenerationResult

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests, errors and latency per route and model; queue depth and batch sizes per model;
    generated tokens, decode rates and streams left by their clients per generation model."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "model", "status")
        self.requests = Counter(
            "tvmdeploy_requests", "HTTP requests answered", labels, registry=self.registry
        )
        self.errors = Counter(
            "tvmdeploy_request_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "tvmdeploy_request_latency_seconds",
            "Time from a request's arrival to its response",
            ("route", "model"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_rows = Gauge(
            "tvmdeploy_queue_rows",
            "Rows waiting for a batch",
            ("model",),
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "tvmdeploy_batch_rows",
            "Rows per batch run on the model",
            ("model",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "tvmdeploy_batch_latency_seconds",
            "Model time per batch",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.generated_tokens = Counter(
            "tvmdeploy_generated_tokens",
            "Tokens generated (completion tokens)",
            ("model",),
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tvmdeploy_prompt_tokens",
            "Prompt tokens of generation requests, and of those the ones a kept sequence held "
            "(the prefix cache: not prefilled again)",
            ("model", "source"),
            registry=self.registry,
        )
        self.decode_rate = Histogram(
            "tvmdeploy_decode_tokens_per_second",
            "Decode speed per generation request (tokens after the first, per second)",
            ("model",),
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.generations = Counter(
            "tvmdeploy_generations",
            "Generation requests that ran to their end (whole, or streamed to the last event)",
            ("model",),
            registry=self.registry,
        )
        self.streams_abandoned = Counter(
            "tvmdeploy_streams_abandoned",
            "Streamed generation requests whose client left before the end (their streams "
            "closed, which frees their sequences at the next decode step)",
            ("model",),
            registry=self.registry,
        )

    def generated(self, model: str, result: GenerationResult) -> None:
        """A finished generation request (a GenerationResult): its tokens, prompt tokens
        (computed, or from the prefix cache) and decode rate."""
        tokens, decode_seconds = result.completion_tokens, result.decode_ms / 1e3
        self.generations.labels(model).inc()
        self.generated_tokens.labels(model).inc(tokens)
        self.prompt_tokens.labels(model, "cached").inc(result.cached_tokens)
        self.prompt_tokens.labels(model, "computed").inc(
            result.prompt_tokens - result.cached_tokens
        )
        if tokens > 1 and decode_seconds > 0:
            self.decode_rate.labels(model).observe((tokens - 1) / decode_seconds)

    def observe(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
