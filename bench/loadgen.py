"""A light closed-loop HTTP/1.1 load generator for `bench/serve.py`, run as a process of its own.

Why not httpx clients in the bench process: 64 asyncio + httpx clients cost several ms of Python
per request on the same 2 cores as the server, so the benchmark measured the load generator as
much as the server. Here every request is serialized once before the run; a client only writes
those bytes on its keep-alive connection and reads the answer (status line, headers,
Content-Length bytes) with asyncio streams, on uvloop where it is installed. The first answer to
each distinct request is kept so that the caller can check it against the model called directly.

    generate(host, port, requests, clients, seconds, warmup) -> {"latencies": [...], ...}
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time


def http_post(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 POST request as bytes, keep-alive."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ValueError(f"answer without Content-Length (status {status})")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def _run(host, port, requests, clients, seconds, warmup) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    answers: dict[int, tuple[dict[str, str], bytes]] = {}
    begin = time.monotonic()
    measure_from, stop = begin + warmup, begin + warmup + seconds

    async def client(number: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        k = 0
        try:
            while (sent := time.monotonic()) < stop:
                index = (number + k * clients) % len(requests)
                k += 1
                writer.write(requests[index])
                status, headers, body = await _read_response(reader)
                done = time.monotonic()
                if status != 200:
                    errors.append(f"{status} {body[:200]!r}")
                    if headers.get("connection") == "close":
                        return
                    continue
                if measure_from <= done <= stop:  # answered in the measured window
                    latencies.append(done - sent)
                answers.setdefault(index, (headers, body))
        finally:
            writer.close()

    results = await asyncio.gather(*(client(n) for n in range(clients)), return_exceptions=True)
    errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {"latencies": latencies, "errors": errors, "answers": answers}


def _child(connection, *args) -> None:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # asyncio's own loop, a little slower
        run = asyncio.run
    connection.send(run(_run(*args)))
    connection.close()


def generate(
    host: str, port: int, requests: list[bytes], clients: int, seconds: float, warmup: float
) -> dict:
    """Closed-loop load from a child process: `clients` connections, each sending the next of
    `requests` as soon as its last one was answered, for `warmup` + `seconds` seconds.

    Returns the latencies (s) of the answers that arrived in the measured window, the errors,
    and the first answer (headers, body) to each request index."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(send, host, port, requests, clients, seconds, warmup), daemon=True
    )
    process.start()
    send.close()
    try:
        if not receive.poll(warmup + seconds + 120):
            raise RuntimeError("the load generator gave no result")
        return receive.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
