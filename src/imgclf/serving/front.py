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

HTTP/1.1 framing is h11's (the sans-IO parser under httpcore and uvicorn), with the checks it
leaves to the application made here: only HTTP/1.0 and 1.1, Content-Length and
Transfer-Encoding never together, no folded header lines, one Content-Type; anything odd is a
400 that closes the connection, never a guess.

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

import h11

from imgclf.serving.protocol import (
    JSON_TYPE,
    MB,
    Limits,
    RequestError,
    answer_type,
    reason_phrase,
    request_type,
)

log = logging.getLogger("imgclf.serve")

FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_INVOCATIONS = re.compile(r"/endpoints/[^/?#]{1,63}/invocations")
_READ = 64 * 1024
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Each header passed on to the model server at most this long: MMS's Netty decoder refuses a
# head over 8 KB, which would fail the request there for a reason that is the client's.
MAX_FORWARDED_HEADER = 2048


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
    length: int | None  # Content-Length, or None for a chunked body

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def protocol_error(exc: h11.RemoteProtocolError) -> HttpError:
    """h11's refusal as our 4xx (a client's mistake is a 4xx, whatever h11 hints)."""
    if exc.error_status_hint == 431:
        return HttpError(431, "request headers are too large", "send fewer or shorter headers")
    if exc.error_status_hint == 501:  # a Transfer-Encoding other than chunked
        return HttpError(400, "this Transfer-Encoding is not supported", "use chunked")
    return HttpError(400, f"malformed request: {exc}"[:120], "send a valid HTTP/1.1 request")


def request_head(event: h11.Request, raw_head: bytes = b"") -> RequestHead:
    """The checks h11 leaves to the application, on its parsed request (and the head's raw
    bytes, where h11 has already unfolded folded lines)."""
    version = "HTTP/" + event.http_version.decode("ascii")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        # 400 rather than 505: a client's mistake is a 4xx, whatever it is.
        raise HttpError(
            400, f"{ascii(version[:20])} is not supported", "send HTTP/1.1 (HTTP/2 is not served)"
        )
    if b"\n " in raw_head or b"\n\t" in raw_head:
        raise HttpError(400, "folded header line", "send each header on one line")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("ascii"), value.decode("latin-1")
        if key in headers and key == "content-type" and headers[key] != text:
            raise HttpError(400, f"header {key} is given twice", "send it once")
        headers[key] = text
    te, cl = headers.get("transfer-encoding"), headers.get("content-length")
    if te is not None and cl is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding", "send one of them")
    length = None if te is not None else int(cl or 0)
    target = event.target.decode("latin-1")
    return RequestHead(
        event.method.decode("ascii"), target.split("?", 1)[0], version, headers, length
    )


def parse_request_head(raw: bytes) -> RequestHead:
    """A complete request head (without its final blank line) as the server reads it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise protocol_error(exc) from None
    if not isinstance(event, h11.Request):
        raise HttpError(400, "incomplete request", "send it whole")
    return request_head(event, raw + b"\r\n\r\n")


def too_large(length: int | None, limits: Limits) -> HttpError:
    shown = "a chunked body" if length is None else f"a body of {length} bytes"
    return HttpError(
        413,
        f"{shown} is over the limit of {limits.max_body_bytes} bytes "
        f"({limits.max_body_bytes / MB:g} MB)",
        "send a smaller image (resize or recompress it) or fewer images per request",
    )


def response_events(
    status: int,
    body: bytes,
    *,
    content_type: str = JSON_TYPE,
    keep_alive: bool = True,
    extra: dict[str, str] | None = None,
    head_only: bool = False,
) -> list:
    """One whole response as h11 events; the reason phrase is fixed ASCII."""
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "keep-alive" if keep_alive else "close"),
        *(extra or {}).items(),
    ]
    reason = reason_phrase(status).encode("ascii")
    events: list = [h11.Response(status_code=status, headers=headers, reason=reason)]
    if body and not head_only:
        events.append(h11.Data(data=body))
    return [*events, h11.EndOfMessage()]


def render_response(status: int, body: bytes, **kwargs) -> bytes:
    """A complete response's bytes, as the server writes it (for a fresh connection)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    return b"".join(conn.send(e) for e in response_events(status, body, **kwargs))


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


class _Client:
    """One client connection: h11's state over the asyncio streams."""

    def __init__(self, reader, writer, limits: Limits) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.head_bytes = bytearray()  # the raw bytes of the head being read (see request_head)
        self.max_head = limits.max_header_bytes
        self.head_only = False  # the request being answered is a HEAD: answers carry no body

    async def event(self):
        """h11's next event, reading as needed (the caller bounds the time)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(_READ)
            if self.h11.their_state is h11.IDLE and len(self.head_bytes) <= self.max_head:
                self.head_bytes += data
            self.h11.receive_data(data)

    def raw_head(self) -> bytes:
        """The head as it arrived (h11 also ends a head at a bare-LF blank line)."""
        return _HEAD_END.split(bytes(self.head_bytes), 1)[0]

    async def send(self, events: list) -> None:
        for event in events:
            self.writer.write(self.h11.send(event))
        await self.writer.drain()

    def next_cycle(self) -> bool:
        """Ready for the next request on this connection (False: close it)."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        self.head_bytes = bytearray(self.h11.trailing_data[0][: self.max_head + 1])
        return True


class Front:
    """The public HTTP server over a Backend."""

    def __init__(
        self, limits: Limits, backend: Backend, *, execution_parameters: dict | None = None
    ) -> None:
        self.limits, self.backend = limits, backend
        self.execution_parameters = execution_parameters  # GET /execution-parameters
        self.budget = ByteBudget(limits.body_budget_bytes)
        self.counters = Counters()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._idle_event = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=_READ, reuse_address=True, backlog=1024
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
        client = _Client(reader, writer, self.limits)
        try:
            if self.counters.connections > self.limits.max_connections or self.draining:
                error = HttpError(
                    503,
                    "too many connections" if not self.draining else "shutting down",
                    "retry shortly",
                )
                writer.write(
                    render_response(503, error.body(), keep_alive=False, extra={"Retry-After": "1"})
                )
                await _close(writer)
                return
            first = True
            while not self.draining:
                timeout = self.limits.header_timeout_s if first else self.limits.idle_timeout_s
                if not await self._one_request(client, timeout) or not client.next_cycle():
                    break
                first = False
        except (ConnectionError, OSError):
            pass
        except Exception:  # our bug: in the log with its traceback, a bare 500 to the client
            log.exception("front: unexpected error")
            await self._send(client, HttpError(500, "internal error", "the log has the details"))
        finally:
            self.counters.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _one_request(self, client: _Client, timeout: float) -> bool:
        """Read, answer; False when the connection is to close."""
        try:
            async with asyncio.timeout(timeout):
                event = await client.event()
        except h11.RemoteProtocolError as exc:
            if client.h11.their_state is h11.ERROR and client.head_bytes.strip():
                await self._send(client, protocol_error(exc))
            return False
        except TimeoutError:
            if timeout == self.limits.header_timeout_s:
                await self._send(
                    client, HttpError(408, "the request headers took too long", "send faster")
                )
            return False
        if not isinstance(event, h11.Request):  # the client closed between requests
            return False
        arrived = time.monotonic()
        client.head_only = event.method == b"HEAD"
        try:
            if len(client.raw_head()) > self.limits.max_header_bytes:
                raise HttpError(
                    431, "request headers are too large", "send fewer or shorter headers"
                )
            head = request_head(event, client.raw_head())
        except HttpError as exc:
            await self._send(client, exc)
            return False
        try:
            status, keep = await self._route(client, head, arrived)
        except RequestError as exc:
            await self._send(client, exc, keep_alive=head.keep_alive and not exc.close)
            return not exc.close and head.keep_alive
        self.counters.answered[status] = self.counters.answered.get(status, 0) + 1
        return keep and head.keep_alive and not self.draining

    async def _route(self, client: _Client, head: RequestHead, arrived: float):
        """Answer one request: (status, whether the connection may stay open)."""
        if head.path == "/ping":
            await self._discard_small_body(client, head)
            if head.method not in ("GET", "HEAD"):
                raise HttpError(405, "use GET /ping", "GET /ping", close=False)
            ok, why = (False, "shutting down") if self.draining else await self.backend.ready()
            body = json.dumps({"status": "Healthy"} if ok else {"status": "Unhealthy", "why": why})
            status = 200 if ok else 503
            await client.send(
                response_events(
                    status,
                    body.encode(),
                    keep_alive=head.keep_alive,
                    head_only=head.method == "HEAD",
                )
            )
            return status, True
        if head.path == "/execution-parameters" and self.execution_parameters is not None:
            await self._discard_small_body(client, head)
            if head.method not in ("GET", "HEAD"):
                raise HttpError(405, "use GET /execution-parameters", "GET it", close=False)
            body = json.dumps(self.execution_parameters).encode()
            await client.send(
                response_events(200, body, keep_alive=head.keep_alive, head_only=client.head_only)
            )
            return 200, True
        if head.path == "/invocations" or _INVOCATIONS.fullmatch(head.path):
            if head.method != "POST":
                await self._discard_small_body(client, head)
                raise HttpError(405, f"use POST {head.path}", "POST the image", close=False)
            return await self._invocation(client, head, arrived)
        await self._discard_small_body(client, head)
        raise HttpError(
            404,
            f"no such path {ascii(head.path[:80])}",
            "POST /invocations or GET /ping",
            close=False,
        )

    async def _invocation(self, client: _Client, head: RequestHead, arrived) -> tuple[int, bool]:
        limits, length = self.limits, head.length
        if self.draining:
            raise HttpError(503, "the endpoint is shutting down", "retry on another instance")
        if length is not None and length > limits.max_body_bytes:
            await self._refuse_body(client, head, too_large(length, limits))
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
                if client.h11.client_is_waiting_for_100_continue:
                    await client.send([h11.InformationalResponse(status_code=100, headers=[])])
                try:
                    async with asyncio.timeout(limits.body_timeout_s):
                        body = await self._read_body(client)
                except TimeoutError:
                    raise HttpError(408, "the request body took too long", "send faster") from None
                except h11.RemoteProtocolError as exc:
                    if client.reader.at_eof():  # h11 raises on EOF inside a body
                        raise HttpError(400, "the body ended early", "send all of it") from None
                    raise protocol_error(exc) from None
                if body is None:  # a chunked body over the limit
                    await self._refuse_body(client, head, too_large(None, limits))
                    return 413, False
                # A 415 here keeps the connection: the body was read whole.
                media = request_type(head.headers.get("content-type"), body)
                headers = {k: head.headers[k] for k in FORWARDED_HEADERS if k in head.headers}
                headers["content-type"] = media
                for name, value in headers.items():
                    if len(value) > MAX_FORWARDED_HEADER:
                        raise HttpError(
                            431,
                            f"header {name} is {len(value)} bytes long",
                            f"send at most {MAX_FORWARDED_HEADER} bytes in it",
                            close=False,
                        )
                status, ctype, payload = await self.backend.post(headers, body, deadline)
                if status == 200:  # the answer's type follows the request's Accept
                    ctype = answer_type(head.headers.get("accept"))
            finally:
                await self.budget.give(reserve)
            keep = head.keep_alive and not self.draining
            await client.send(response_events(status, payload, content_type=ctype, keep_alive=keep))
            return status, keep
        finally:
            self.counters.in_flight -= 1
            if not self.counters.in_flight:
                self._idle_event.set()

    async def _read_body(self, client: _Client) -> bytes | None:
        """The whole body (h11 undoes the chunking); None once it is over the limit."""
        chunks, size = [], 0
        while True:
            event = await client.event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            size += len(event.data)
            if size > self.limits.max_body_bytes:
                return None
            chunks.append(event.data)

    async def _discard_small_body(self, client: _Client, head: RequestHead) -> None:
        if head.length is None or head.length > 64 * 1024:
            raise HttpError(400, "unexpected request body", "send no body here")
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while not isinstance(await client.event(), h11.EndOfMessage):
                    pass
        except TimeoutError:
            raise HttpError(408, "the request body took too long", "send faster") from None
        except h11.RemoteProtocolError as exc:
            raise protocol_error(exc) from None

    async def _refuse_body(self, client: _Client, head: RequestHead, error: HttpError) -> None:
        """A JSON 413, then read and drop what the client still sends (up to linger_bytes,
        within the body timeout) so it can read the answer, then close."""
        waiting = client.h11.client_is_waiting_for_100_continue
        with contextlib.suppress(Exception):
            await client.send(response_events(error.status, error.body(), keep_alive=False))
        if waiting:
            return  # the client has not sent the body: nothing to drop
        linger = self.limits.linger_bytes
        left = linger if head.length is None else min(head.length, linger)
        left -= len(client.h11.trailing_data[0])  # already read, in h11's buffer
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.body_timeout_s):
                while left > 0:
                    chunk = await client.reader.read(min(left, 256 * 1024))
                    if not chunk:
                        break
                    left -= len(chunk)
        with contextlib.suppress(Exception):
            client.writer.transport.write_eof()

    async def _send(self, client: _Client, error: RequestError, *, keep_alive: bool = False):
        self.counters.answered[error.status] = self.counters.answered.get(error.status, 0) + 1
        with contextlib.suppress(Exception):
            if client.h11.our_state is h11.IDLE and client.h11.their_state is h11.IDLE:
                # No request to answer in h11's eyes (a head that never came whole): the
                # answer is written as on a fresh connection, which then closes.
                client.writer.write(render_response(error.status, error.body(), keep_alive=False))
                await client.writer.drain()
                return
            events = response_events(
                error.status, error.body(), keep_alive=keep_alive, head_only=client.head_only
            )
            await client.send(events)


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
    writer.close()
