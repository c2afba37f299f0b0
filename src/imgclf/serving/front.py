"""The endpoint's front door: a small HTTP/1.1 server on the public port, in front of the model
server (`Backend`: MMS behind serving.mms; this module knows nothing of it).

Why it exists (the model server cannot be configured to do these; see serving/mms.py):
- `/ping` answers from the workers' real state, and says 503 while draining;
- header, body and idle timeouts and a connection cap (idle or slow clients would exhaust the
  model server's file descriptors and direct memory);
- a JSON 413 for any body over the limit, read and dropped up to a generous frame so the client
  sees the answer, then a clean close;
- the request's content type is decided here (protocol.request_type): unsupported types are a
  415 before anything reaches the model server, aliases and curl's default type are resolved;
- requests queue here, bounded in bytes, instead of meeting the model server's instant 503s;
- SIGTERM drains: no new requests, the ones in flight are answered, then the server stops.

Only `POST /invocations` (and the runtime API's `POST /endpoints/NAME/invocations`, so a boto3
sagemaker-runtime client pointed at a local endpoint works unchanged) and `GET /ping` exist.
Every error body is protocol.error_body's (`error`, `hint`, and `message` for botocore).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from imgclf.serving.protocol import (
    JSON_TYPE,
    Limits,
    RequestError,
    error_body,
    reason_phrase,
    request_type,
)

log = logging.getLogger("imgclf.serve")

FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(rb"[0-9]{1,15}")
_INVOCATIONS = re.compile(r"/endpoints/[^/?#]{1,63}/invocations")


class HttpError(RequestError):
    """An answer the front gives itself (protocol's error body); by default the connection
    closes afterwards."""

    def __init__(self, status: int, error: str, hint: str, *, close: bool = True) -> None:
        super().__init__(status, error, hint, close=close)


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    version: str
    headers: dict[str, str]  # lower-case names; values as latin-1 text

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def parse_request_head(raw: bytes) -> RequestHead:
    """The request line and headers (without the final blank line), strictly: anything odd is
    a 400 that closes the connection, never a guess."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpError(400, "malformed request line", "send an HTTP/1.1 request")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        # 400 rather than 505: a client's mistake is a 4xx, whatever it is.
        raise HttpError(
            400, f"{ascii(version[:20])} is not supported", "send HTTP/1.1 (HTTP/2 is not served)"
        )
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line", "send 'Name: value' header lines")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
            raise HttpError(400, f"header {key} holds control characters", "remove them")
        if key in headers and key in ("content-length", "transfer-encoding", "content-type"):
            if headers[key] != text:
                raise HttpError(400, f"header {key} is given twice", "send it once")
        headers[key] = text
    return RequestHead(method.upper(), target.split("?", 1)[0], version, headers)


def body_length(head: RequestHead) -> int | None:
    """Content-Length, or None for a chunked body; a 400 for anything ambiguous."""
    te = head.headers.get("transfer-encoding")
    cl = head.headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding", "send one of them")
        if te.strip().lower() != "chunked":
            raise HttpError(
                400, f"Transfer-Encoding {ascii(te[:30])} is not supported", "use chunked"
            )
        return None
    if cl is None:
        return 0
    if not _DIGITS.fullmatch(cl.strip().encode("latin-1")):
        raise HttpError(
            400, f"Content-Length {ascii(cl[:30])} is not a number", "send the body's byte count"
        )
    return int(cl)


def too_large(length: int | None, limits: Limits) -> HttpError:
    shown = "a chunked body" if length is None else f"a body of {length} bytes"
    return HttpError(
        413,
        f"{shown} is over the limit of {limits.max_body_bytes} bytes (6 MB)",
        "send a smaller image (resize or recompress it) or fewer images per request",
    )


def render_response(
    status: int,
    body: bytes,
    *,
    content_type: str = JSON_TYPE,
    keep_alive: bool = True,
    extra: dict[str, str] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response; the reason phrase is fixed ASCII."""
    lines = [
        f"HTTP/1.1 {status} {reason_phrase(status)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ByteBudget:
    """Bytes of request bodies held at once (here and in the model server), shared by all
    requests."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._freed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + n <= self.total)
            self.used += n

    async def give(self, n: int) -> None:
        async with self._freed:
            self.used -= n
            self._freed.notify_all()


# ---------------------------------------------------------------- the server


class Backend(Protocol):
    """The model server, as the front sees it."""

    async def post(
        self, headers: dict[str, str], body: bytes, deadline: float
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) by `deadline` (time.monotonic), errors in protocol's
        shape; raises RequestError for an answer of the server's own state (503, 504)."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """Whether a worker can answer now, and why not."""
        ...


@dataclass
class Counters:
    connections: int = 0
    in_flight: int = 0
    answered: dict[int, int] = field(default_factory=dict)


class Front:
    """The public HTTP server over a Backend."""

    def __init__(self, limits: Limits, backend: Backend) -> None:
        self.limits, self.backend = limits, backend
        self.budget = ByteBudget(limits.body_budget_bytes)
        self.counters = Counters()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._idle_event = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._connection,
            host,
            port,
            limit=self.limits.max_header_bytes,
            reuse_address=True,
            backlog=1024,
        )

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting, answer what is in flight (up to `grace_s`), close the rest. True
        when everything in flight was answered."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while self.counters.in_flight and time.monotonic() < deadline:
            self._idle_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle_event.wait(), deadline - time.monotonic())
        drained = self.counters.in_flight == 0
        for writer in list(self._writers):
            writer.close()
        return drained

    # -- one connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.counters.connections += 1
        self._writers.add(writer)
        try:
            if self.counters.connections > self.limits.max_connections or self.draining:
                writer.write(
                    render_response(
                        503,
                        error_body(
                            "too many connections" if not self.draining else "shutting down",
                            "retry shortly",
                        ),
                        keep_alive=False,
                        extra={"Retry-After": "1"},
                    )
                )
                await _close(writer)
                return
            first = True
            while not self.draining:
                timeout = self.limits.header_timeout_s if first else self.limits.idle_timeout_s
                if not await self._one_request(reader, writer, timeout):
                    break
                first = False
        except (ConnectionError, OSError):
            pass
        except Exception:  # our bug: in the log with its traceback, a bare 500 to the client
            log.exception("front: unexpected error")
            await self._send(writer, HttpError(500, "internal error", "the log has the details"))
        finally:
            self.counters.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _one_request(self, reader, writer, timeout: float) -> bool:
        """Read, answer; False when the connection is to close."""
        try:
            async with asyncio.timeout(timeout):
                raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._send(writer, HttpError(400, "incomplete request", "send it whole"))
            return False
        except TimeoutError:
            if timeout == self.limits.header_timeout_s:
                await self._send(
                    writer, HttpError(408, "the request headers took too long", "send faster")
                )
            return False
        except asyncio.LimitOverrunError:
            await self._send(
                writer,
                HttpError(431, "request headers are too large", "send fewer or shorter headers"),
            )
            return False
        arrived = time.monotonic()
        try:
            head = parse_request_head(raw[:-4].lstrip(b"\r\n"))
            length = body_length(head)
        except HttpError as exc:
            await self._send(writer, exc)
            return False
        try:
            status, keep = await self._route(reader, writer, head, length, arrived)
        except RequestError as exc:
            await self._send(writer, exc, keep_alive=head.keep_alive and not exc.close)
            return not exc.close and head.keep_alive
        self.counters.answered[status] = self.counters.answered.get(status, 0) + 1
        return keep and head.keep_alive and not self.draining

    async def _route(self, reader, writer, head: RequestHead, length, arrived):
        """Answer one request: (status, whether the connection may stay open)."""
        if head.path == "/ping":
            if head.method not in ("GET", "HEAD"):
                raise HttpError(405, "use GET /ping", "GET /ping", close=False)
            await self._discard_small_body(reader, length)
            ok, why = (False, "shutting down") if self.draining else await self.backend.ready()
            body = json.dumps({"status": "Healthy"} if ok else {"status": "Unhealthy", "why": why})
            status = 200 if ok else 503
            raw = render_response(status, body.encode(), keep_alive=head.keep_alive)
            if head.method == "HEAD":
                raw = raw[: raw.index(b"\r\n\r\n") + 4]
            writer.write(raw)
            await writer.drain()
            return status, True
        if head.path == "/invocations" or _INVOCATIONS.fullmatch(head.path):
            if head.method != "POST":
                await self._discard_small_body(reader, length)
                raise HttpError(405, f"use POST {head.path}", "POST the image", close=False)
            return await self._invocation(reader, writer, head, length, arrived)
        await self._discard_small_body(reader, length)
        raise HttpError(
            404,
            f"no such path {ascii(head.path[:80])}",
            "POST /invocations or GET /ping",
            close=False,
        )

    async def _invocation(self, reader, writer, head, length, arrived) -> tuple[int, bool]:
        limits = self.limits
        if self.draining:
            raise HttpError(503, "the endpoint is shutting down", "retry on another instance")
        if length is not None and length > limits.max_body_bytes:
            await self._refuse_body(reader, writer, head, length, too_large(length, limits))
            return 413, False
        reserve = length if length is not None else limits.max_body_bytes
        self.counters.in_flight += 1
        try:
            deadline = arrived + limits.request_timeout_s
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self.budget.take(reserve)
            except TimeoutError:
                raise HttpError(503, "the endpoint is busy", "retry shortly", close=True) from None
            try:
                if head.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    async with asyncio.timeout(limits.body_timeout_s):
                        body = await self._read_body(reader, length)
                except TimeoutError:
                    raise HttpError(408, "the request body took too long", "send faster") from None
                except asyncio.IncompleteReadError:
                    raise HttpError(400, "the body ended early", "send all of it") from None
                if body is None:  # a chunked body over the limit
                    await self._refuse_body(reader, writer, head, None, too_large(None, limits))
                    return 413, False
                # A 415 here keeps the connection: the body was read whole.
                media = request_type(head.headers.get("content-type"), body)
                headers = {k: head.headers[k] for k in FORWARDED_HEADERS if k in head.headers}
                headers["content-type"] = media
                status, ctype, payload = await self.backend.post(headers, body, deadline)
            finally:
                await self.budget.give(reserve)
            keep = head.keep_alive and not self.draining
            writer.write(render_response(status, payload, content_type=ctype, keep_alive=keep))
            await writer.drain()
            return status, keep
        finally:
            self.counters.in_flight -= 1
            if not self.counters.in_flight:
                self._idle_event.set()

    async def _read_body(self, reader: asyncio.StreamReader, length: int | None) -> bytes | None:
        if length is not None:
            return await reader.readexactly(length) if length else b""
        chunks, size = [], 0
        while True:
            line = await reader.readuntil(b"\r\n")
            token = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", token):
                raise HttpError(400, "malformed chunked body", "send valid chunks")
            n = int(token, 16)
            if n == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(chunks)
            size += n
            if size > self.limits.max_body_bytes:
                return None
            chunks.append(await reader.readexactly(n))
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "malformed chunked body", "send valid chunks")

    async def _discard_small_body(self, reader, length) -> None:
        if length is None or length > 64 * 1024:
            raise HttpError(400, "unexpected request body", "send no body here")
        if length:
            async with asyncio.timeout(self.limits.body_timeout_s):
                await reader.readexactly(length)

    async def _refuse_body(self, reader, writer, head, length, error: HttpError) -> None:
        """A JSON 413, then read and drop what the client still sends (up to linger_bytes,
        within the body timeout) so it can read the answer, then close."""
        writer.write(render_response(error.status, error.body(), keep_alive=False))
        with contextlib.suppress(Exception):
            await writer.drain()
        if head.headers.get("expect", "").lower() == "100-continue":
            return  # the client has not sent the body: nothing to drop
        left = self.limits.linger_bytes if length is None else min(length, self.limits.linger_bytes)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.body_timeout_s):
                while left > 0:
                    chunk = await reader.read(min(left, 256 * 1024))
                    if not chunk:
                        break
                    left -= len(chunk)
        with contextlib.suppress(Exception):
            writer.transport.write_eof()

    async def _send(self, writer, error: RequestError, *, keep_alive: bool = False) -> None:
        self.counters.answered[error.status] = self.counters.answered.get(error.status, 0) + 1
        with contextlib.suppress(Exception):
            writer.write(render_response(error.status, error.body(), keep_alive=keep_alive))
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
    writer.close()
