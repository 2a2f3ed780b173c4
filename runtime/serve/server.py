"""`serve(bundles)`: check and load the bundles, then run the app on uvicorn until SIGTERM.

Every bundle's signature is checked against the trusted keys before any bundle is loaded, so a
refused bundle costs nothing. On SIGTERM or Ctrl-C uvicorn stops accepting connections and
answers every request in flight before the process exits, with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import OptionError
from ..model import Model, load
from ..signing import trusted_keys_from_env, verify_signature
from .app import create_app

log = logging.getLogger("tvmdeploy.serve")
#: Where `serve` reads the api key when none is given.
API_KEY_ENV = "TVMDEPLOY_API_KEY"


def model_names(bundles: Sequence[str | Path]) -> dict[str, Path]:
    """Bundle paths by the name they are served as: NAME=BUNDLE, or the file name without
    `.tvmd`."""
    named: dict[str, Path] = {}
    for given in bundles:
        text = str(given)
        name, sep, path = text.partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(text.rstrip("/")).name.removesuffix(".tvmd"), text
        if name in named:
            raise OptionError(f"two bundles would be served as {name!r}; name one: NAME=BUNDLE")
        named[name] = Path(path)
    if not named:
        raise OptionError("give at least one bundle to serve")
    return named


def load_models(
    bundles: Sequence[str | Path],
    precision: str = "auto",
    trusted_keys: Sequence[str | Path] | None = None,
    prefix_cache: bool = True,
) -> dict[str, Model]:
    """The models by name; with trusted keys (or `$TVMDEPLOY_TRUSTED_KEYS`) every signature is
    checked first, and a SignatureError stops everything before any bundle is loaded. A
    generation bundle keeps finished sequences for a shared prompt prefix (`prefix_cache`: a
    chat client re-sends its whole history each turn)."""
    named = model_names(bundles)
    keys = list(trusted_keys) if trusted_keys else trusted_keys_from_env()
    for path in named.values():
        if keys:
            verify_signature(path, keys)
    models = {}
    for name, path in named.items():
        models[name] = load(
            path, precision=precision, trusted_keys=keys or None, prefix_cache=prefix_cache
        )
        log.info("model %s: %s (%s)", name, path, models[name].choice.artifact)
    return models


class _Server:
    """uvicorn's server, exiting quietly (status 0) once a SIGTERM or SIGINT has drained it;
    uvicorn itself re-raises the signal afterwards, which would end the process with -15."""

    def __init__(self, config):
        import uvicorn

        self.server = uvicorn.Server(config)
        self.server.capture_signals = self._capture_signals

    @contextlib.contextmanager
    def _capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.server.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> None:
        self.server.run()


def uvicorn_config(app, host: str, port: int):
    """uvicorn's settings for `serve`: uvloop and httptools where they are installed (the
    `serve` extra lists them; the event loop's CPU time per request fell by a third with them,
    docs/design.md § Serving), asyncio and h11 otherwise; no access log of uvicorn's own (the
    app writes one per request)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, loop="auto", http="auto"
    )


def serve(
    bundles: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    precision: str = "auto",
    max_batch_delay_ms: float = 2.0,
    max_queue: int = 256,
    api_key: str | None = None,
    trusted_keys: Sequence[str | Path] | None = None,
    prefix_cache: bool = True,
) -> None:
    """Serve the bundles over HTTP until SIGTERM (docs/design.md § Serving). Each is served as
    NAME=BUNDLE's NAME or its file name without `.tvmd`; `api_key` defaults to
    `$TVMDEPLOY_API_KEY`."""
    import os

    if max_queue < 1:
        raise OptionError(f"--max-queue must be at least 1, not {max_queue}")
    if max_batch_delay_ms < 0:
        raise OptionError(f"--max-batch-delay-ms must be >= 0, not {max_batch_delay_ms}")
    models = load_models(bundles, precision, trusted_keys, prefix_cache)
    app = create_app(
        models,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
    )
    config = uvicorn_config(app, host, port)
    log.info("serving %s on http://%s:%d", ", ".join(models), host, port)
    _Server(config).run()
