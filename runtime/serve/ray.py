"""Scale-out on Ray Serve: N replicas of the server's own app behind Ray Serve's HTTP proxy.

Two deployments, so that a replica's death costs no request:
- `BundleReplica` loads the bundles once per replica, on its own node, so `load()` picks the
  artifact of that node's device (one bundle serves a mixed x86/ARM/GPU cluster). Its ASGI ingress
  is `create_app` itself: the same routes, batching and metrics as `tvmdeploy serve`, with the
  lifespan (batchers started, drained) run by Ray. Each response carries the replica's id in
  `x-tvmdeploy-replica`.
- `Front` is what Ray's proxy calls: it forwards each HTTP request whole to a replica through a
  deployment handle. Ray answers a request in flight on a replica that dies with a 500 (its
  router only retries requests no replica had accepted yet), so the front sends such a request
  once more, to another replica, when nothing of the answer has reached the client yet; a model
  call has no side effect, so running it twice is safe. The retried answer says so in
  `x-tvmdeploy-retried: 1`.

Needs the `serve-ray` extra. Nothing else in the runtime imports this module; it never imports the
compiler. Bundle paths must be readable on every node (a shared file system or the same path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError

from ..errors import OptionError
from ..signing import trusted_keys_from_env, verify_signature
from .app import create_app
from .server import API_KEY_ENV, load_models, model_names

log = logging.getLogger("tvmdeploy.serve")
#: The Ray Serve application's name.
APP_NAME = "tvmdeploy"
REPLICA_HEADER = "x-tvmdeploy-replica"
RETRIED_HEADER = "x-tvmdeploy-retried"


class BundleReplica:
    """One replica: the bundles loaded here, served by `create_app`, whose lifespan (batchers
    started, then drained) this replica runs. Ray allows one ASGI ingress per application (the
    `Front`), so this one drives its app itself."""

    async def __init__(self, bundles: list[str], options: dict[str, Any]):
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        self.models = load_models(
            bundles, options["precision"], options["trusted_keys"], options["prefix_cache"]
        )
        self.app = create_app(
            self.models,
            max_batch_delay_ms=options["max_batch_delay_ms"],
            max_queue=options["max_queue"],
            api_key=options["api_key"],
            max_body_bytes=options["max_body_bytes"],
        )
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise RuntimeError("the app's lifespan startup failed (see the replica's log)")
        # The replica's actor name: `ray.get_actor(name, namespace="serve")` finds it.
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        log.info("replica %s serves %s", self.replica_id, ", ".join(self.models))

    async def __del__(self):
        # Ray calls this once the replica's requests are answered (graceful shutdown).
        await self.lifespan.shutdown()

    async def forward(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Runs one HTTP request (method, path, query, headers, body) through this replica's app.

        Yields the response start with its first body chunk, then each further chunk (a
        streamed answer). If the caller goes away, the app sees `http.disconnect`."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request["method"],
            "scheme": "http",
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query_string"],
            "headers": request["headers"],
            "client": request["client"],
            "server": None,
        }
        sent = asyncio.Queue()
        gone = asyncio.Event()
        body = [request["body"]]

        async def receive():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await sent.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            start = await sent.get()
            if start is None:
                task.result()  # the app ended without answering: its error, if any
                raise RuntimeError("the app ended without answering")
            headers = list(start.get("headers", [])) + [
                (REPLICA_HEADER.encode(), self.replica_id.encode())
            ]
            first = await sent.get()
            more = first is not None and first.get("more_body", False)
            yield {
                "status": start["status"],
                "headers": headers,
                "body": first.get("body", b"") if first else b"",
                "more_body": more,
            }
            while more:
                message = await sent.get()
                if message is None:
                    break
                more = message.get("more_body", False)
                yield {"body": message.get("body", b""), "more_body": more}
        finally:
            gone.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)


@serve.ingress()
class Front:
    """Ray's proxy calls this: every request goes whole to a `BundleReplica`, and once more to
    another if its replica dies before answering."""

    def __init__(self, replicas: serve.handle.DeploymentHandle, max_body_bytes: int):
        self.forwarder = _Forwarder(replicas.options(stream=True, method_name="forward"))
        self.forwarder.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return self.forwarder


class _Forwarder:
    """The front's ASGI app: requests read whole, sent to a replica, answers streamed back."""

    max_body_bytes = 64 << 20

    def __init__(self, replicas: serve.handle.DeploymentHandle):
        self.replicas = replicas

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to start: startup, then shutdown
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _answer(
                    send, 413, b'{"error": "request body over %d bytes"}' % (self.max_body_bytes)
                )
                return
            if not message.get("more_body", False):
                break
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": [tuple(h) for h in scope["headers"]],
            "body": bytes(body),
            "client": scope.get("client"),
        }
        for attempt in range(2):
            chunks = self.replicas.remote(request)
            try:
                start = await chunks.__anext__()
            except RayActorError as error:
                if attempt:
                    log.warning("replica died before answering %s, twice: %s", scope["path"], error)
                    body = b'{"error": "the replicas died before answering; try again"}'
                    await _answer(send, 503, body, [(b"retry-after", b"1")])
                    return
                log.warning(
                    "replica died before answering %s; sent again: %s", scope["path"], error
                )
                continue
            if attempt:
                start["headers"].append((RETRIED_HEADER.encode(), b"1"))
            break
        # A streamed answer (server-sent events) goes on chunk by chunk as the replica yields
        # it. If the client leaves, Ray's proxy cancels this call; the replica's call is
        # cancelled with it, so its app sees `http.disconnect` and frees what the stream held.
        ended = not start["more_body"]
        try:
            status, headers = start["status"], start["headers"]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send(
                {"type": "http.response.body", "body": start["body"], "more_body": not ended}
            )
            while not ended:  # a whole answer came in one piece: no wait for the call's end
                chunk = await anext(chunks, None)
                if chunk is None:  # the replica's app ended the body without saying so
                    await send({"type": "http.response.body", "body": b""})
                    ended = True
                    break
                await send({"type": "http.response.body", **chunk})
                ended = not chunk["more_body"]
        finally:
            if not ended:
                chunks.cancel()


async def _answer(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def application(
    bundles: Sequence[str | Path],
    *,
    replicas: int = 2,
    precision: str = "auto",
    max_batch_delay_ms: float = 2.0,
    max_queue: int = 256,
    api_key: str | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
    replica_cpus: float = 1.0,
    max_body_bytes: int = 64 << 20,
    prefix_cache: bool = True,
) -> serve.Application:
    """The Ray Serve application: `replicas` replicas of the bundles, each using `replica_cpus`
    CPUs (and as many TVM threads), behind one `Front`. With trusted keys (or
    `$TVMDEPLOY_TRUSTED_KEYS`) every signature is checked here, before any replica starts."""
    if replicas < 1:
        raise OptionError(f"--replicas must be at least 1, not {replicas}")
    if max_queue < 1:
        raise OptionError(f"--max-queue must be at least 1, not {max_queue}")
    named = model_names(bundles)
    keys = [str(k) for k in trusted_keys] if trusted_keys else trusted_keys_from_env()
    for path in named.values():
        if not path.exists():
            raise OptionError(f"no bundle at {path}")
        if keys:
            verify_signature(path, keys)
    # Absolute paths: a replica's working directory is not the driver's.
    given = [f"{name}={path.resolve()}" for name, path in named.items()]
    options = {
        "precision": precision,
        "max_batch_delay_ms": max_batch_delay_ms,
        "max_queue": max_queue,
        "api_key": api_key or os.environ.get(API_KEY_ENV) or None,
        "trusted_keys": [str(k) for k in keys] or None,
        "max_body_bytes": max_body_bytes,
        "prefix_cache": prefix_cache,
    }
    threads = str(max(1, int(replica_cpus)))
    replica = serve.deployment(BundleReplica).options(
        num_replicas=replicas,
        # The batcher coalesces what is in flight: let a replica hold its queue's worth.
        max_ongoing_requests=max_queue,
        ray_actor_options={
            "num_cpus": replica_cpus,
            "runtime_env": {"env_vars": {"TVM_NUM_THREADS": threads}},
        },
    )
    front = serve.deployment(Front).options(
        num_replicas=1,
        max_ongoing_requests=replicas * max_queue,
        ray_actor_options={"num_cpus": 0},
    )
    return front.bind(replica.bind(given, options), max_body_bytes)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run tvmdeploy.runtime.serve.ray:app_builder bundles=a.tvmd,b=b.tvmd replicas=2`
    (or the same keys under `args:` in a Serve config file)."""
    args = dict(args)
    bundles = args.pop("bundles", None)
    if not bundles:
        raise OptionError("give bundles=BUNDLE[,NAME=BUNDLE...]")
    if isinstance(bundles, str):
        bundles = [b for b in bundles.split(",") if b]
    casts = {
        "replicas": int,
        "max_queue": int,
        "max_batch_delay_ms": float,
        "replica_cpus": float,
        "max_body_bytes": int,
        "prefix_cache": lambda value: str(value).lower() not in ("0", "false", "no", "off"),
    }
    unknown = sorted(set(args) - set(casts) - {"precision", "api_key", "trusted_keys"})
    if unknown:
        raise OptionError(f"unknown argument(s) {', '.join(unknown)} for the tvmdeploy app")
    for key, cast in casts.items():
        if key in args:
            args[key] = cast(args[key])
    if isinstance(args.get("trusted_keys"), str):
        args["trusted_keys"] = args["trusted_keys"].split(",")
    return application(bundles, **args)


def serve_on_ray(
    bundles: Sequence[str | Path],
    *,
    address: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    **options: Any,
) -> str:
    """Run the application on the Ray cluster at `address` ("local" starts one here), behind Ray
    Serve's proxy on `host`:`port`; returns the URL. With `blocking`, waits for SIGTERM or
    Ctrl-C, then deletes the application (each replica drains its requests first)."""
    import ray

    app = application(bundles, **options)
    ray.init(address=address, log_to_driver=False)  # "local": a new instance, never another
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log.info("serving %s on Ray Serve at %s", ", ".join(model_names(bundles)), url)
    if not blocking:
        return url
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: deleting the Ray Serve application %s", APP_NAME)
    serve.delete(APP_NAME)
    return url
