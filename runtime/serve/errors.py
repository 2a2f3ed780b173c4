"""Errors that become HTTP responses: each carries its status and a message naming the problem."""

from __future__ import annotations

from ..errors import TvmdeployError


class ServeError(TvmdeployError):
    """A request the server refuses: `status` is the HTTP status, the message its body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class QueueFull(ServeError):
    """More rows wait for a model than `--max-queue` allows: 429, with when to try again."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(429, message, {"Retry-After": str(retry_after_s)})
