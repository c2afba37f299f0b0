"""The endpoint's front door: a small HTTP/1.1 server on the public port, in front of
multi-model-server, which listens on a private loopback port.

Why it exists (MMS 1.1.11 cannot be configured to do these; see serve.py's docstring):
- `/ping` answers from the workers' real state (MMS's own /ping says 200 with an "Unhealthy"
  body when no worker can answer), and says 503 while draining;
- header, body and idle timeouts and a connection cap (MMS has none: idle or slow clients
  exhaust its file descriptors and direct memory);
- a JSON 413 for any body over 6 MB (MMS resets the connection or sends an empty 413), read and
  dropped up to a generous frame so the client sees the answer, then a clean close;
- requests queue here, bounded in bytes, instead of meeting MMS's instant 503s at its queue size;
- SIGTERM drains: no new requests, the ones in flight are answered, then the server stops;
- MMS's own errors are rewritten into our JSON (they name Java exception classes).

Only `POST /invocations` (and the runtime API's `POST /endpoints/NAME/invocations`, so a boto3
sagemaker-runtime client pointed at a local endpoint works unchanged) and `GET /ping` exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("imgclf.serve")

MB = 1024 * 1024
FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(rb"[0-9]{1,15}")
_INVOCATIONS = re.compile(r"/endpoints/[^/?#]{1,63}/invocations")


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server. Defaults suit SageMaker's real-time contract."""

    max_body_bytes: int = 6 * MB  # SageMaker's request limit
    linger_bytes: int = 64 * MB  # an over-limit body up to this is read and dropped: JSON 413
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0  # from a connection's first byte to the end of its headers
    body_timeout_s: float = 30.0  # for the whole body to arrive
    idle_timeout_s: float = 75.0  # a keep-alive connection with no request (above SageMaker's 60)
    max_connections: int = 1024
    body_budget_bytes: int = 256 * MB  # bodies held here and in MMS, all requests together
    upstream_concurrency: int = 256  # requests handed to MMS at once (below its job queue)
    request_timeout_s: float = 60.0  # from the request's arrival to its answer


class HttpError(Exception):
    """An answer the front gives itself: status, JSON {"error", "hint"}, and whether the
    connection must close afterwards."""

    def __init__(self, status: int, error: str, hint: str, *, close: bool = True) -> None:
        super().__init__(error)
        self.status, self.error, self.hint, self.close = status, error, hint, close


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


def json_body(error: str, hint: str) -> bytes:
    return json.dumps({"error": error, "hint": hint}).encode()


def render_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    keep_alive: bool = True,
    extra: dict[str, str] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response; the reason phrase is fixed ASCII."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def worker_died(status: int, body: bytes) -> bool:
    """MMS's own answer for a request whose worker process died (or restarted: MMS 1.1 also
    fails a batch whose answer its decoder could not read) while it was being answered."""
    if status < 500:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and "Worker died" in str(doc.get("message", ""))


def rewrite_upstream_error(status: int, body: bytes) -> tuple[int, bytes]:
    """MMS's own error bodies ({"code", "type", "message"}, the type a Java class) become ours;
    our handler's answers ({"error", "hint"}) pass unchanged."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc and "hint" in doc:
        return status, body
    message = str(doc.get("message", "")) if isinstance(doc, dict) else ""
    if "Worker died" in message or status in (500, 502, 503, 507):
        return 503, json_body(
            "the model's worker stopped while answering this request",
            "retry; the endpoint restarts its workers by itself",
        )
    if status == 413:
        return 413, json_body("the request is too large", "send at most 6 MB")
    if status == 408:
        return 504, json_body("the model did not answer in time", "retry with a smaller request")
    return (status if 400 <= status < 600 else 502), json_body(
        f"the model server answered {status}", "retry; the endpoint's log has the details"
    )


# ---------------------------------------------------------------- budgets


class NoWorkerInTime(TimeoutError):
    """A request's deadline passed while no worker could take it (MMS restarting, the model
    reloading): the endpoint's state, not the request, is why."""


class ByteBudget:
    """Bytes of request bodies held at once (here and in MMS), shared by all requests."""

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


# ---------------------------------------------------------------- upstream (MMS)


class Upstream:
    """Keep-alive connections to MMS's private inference port."""

    def __init__(self, limits: Limits, path: str = "/invocations") -> None:
        self.port: int | None = None
        self.path = path  # where requests are posted in MMS
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, int]] = deque()
        self.slots = asyncio.Semaphore(limits.upstream_concurrency)

    def retarget(self, port: int | None) -> None:
        """MMS (re)started on `port`, or stopped (None): drop the old connections."""
        self.port = port
        while self._idle:
            _, writer, _ = self._idle.popleft()
            writer.close()

    async def _connection(self):
        while self._idle:
            reader, writer, port = self._idle.pop()
            if port == self.port and not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        if self.port is None:
            raise ConnectionRefusedError("the model server is not running")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=64 * 1024)
        return reader, writer, False

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST to MMS: (status, content type, body). A reused connection that turns out to be
        closed is retried once on a fresh one, before any answer was read."""
        for attempt in range(2):
            reader, writer, reused = await self._connection()
            port = self.port
            try:
                writer.write(_upstream_request(path, headers, body))
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                writer.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                writer.close()
                raise
            try:
                status, rheaders = parse_response_head(head)
                length = int(rheaders.get("content-length", "0"))
                payload = await reader.readexactly(length)
            except BaseException:
                writer.close()
                raise
            if rheaders.get("connection", "").lower() == "close":
                writer.close()
            else:
                self._idle.append((reader, writer, port))
            return status, rheaders.get("content-type", "application/json"), payload
        raise ConnectionError("unreachable")


def _upstream_request(path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_response_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.rstrip(b"\r\n").split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return status, headers


# ---------------------------------------------------------------- the server


@dataclass
class Counters:
    connections: int = 0
    in_flight: int = 0
    answered: dict[int, int] = field(default_factory=dict)


class Front:
    """The public HTTP server. `ready()` says whether a worker can answer now (with why not)."""

    def __init__(
        self,
        limits: Limits,
        upstream: Upstream,
        ready: Callable[[], Awaitable[tuple[bool, str]]],
        *,
        can_forward: Callable[[], bool] = lambda: True,
        on_upstream_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.limits, self.upstream, self.ready = limits, upstream, ready
        self.can_forward, self.on_upstream_failure = can_forward, on_upstream_failure
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
                        json_body(
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
        except HttpError as exc:
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
            ok, why = (False, "shutting down") if self.draining else await self.ready()
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
                async with asyncio.timeout_at(_loop_time(deadline)):
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
                status, ctype, payload = await self._forward(head, body, deadline)
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

    async def _forward(self, head: RequestHead, body: bytes, deadline: float):
        """MMS's answer to the request, once more on a restarted worker when the worker (or
        MMS) died while answering it: inference is idempotent, and the client should not pay
        for a fault of the endpoint's own processes. Only once: a request that kills its
        worker twice gets the 503."""
        headers = {k: head.headers[k] for k in FORWARDED_HEADERS if k in head.headers}
        for attempt in range(2):
            try:
                status, ctype, payload = await self._post_when_ready(headers, body, deadline)
            except NoWorkerInTime:
                self.on_upstream_failure()
                raise HttpError(
                    503,
                    f"no worker could answer within {self.limits.request_timeout_s:.0f} s: "
                    "the model server is restarting or reloading the model",
                    "retry shortly; the endpoint recovers by itself",
                ) from None
            except TimeoutError:
                self.on_upstream_failure()
                raise HttpError(
                    504,
                    f"the model did not answer within {self.limits.request_timeout_s:.0f} s",
                    "retry; send fewer images per request",
                ) from None
            except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError):
                self.on_upstream_failure()
                if attempt == 0:
                    continue
                raise HttpError(
                    503,
                    "the model server stopped while answering this request",
                    "retry; the endpoint restarts it by itself",
                ) from None
            if status == 200:
                return status, ctype, payload
            if worker_died(status, payload):
                self.on_upstream_failure()
                if attempt == 0:
                    continue
            break
        status, payload = rewrite_upstream_error(status, payload)
        if status >= 500:
            self.on_upstream_failure()
        return status, "application/json", payload

    async def _post_when_ready(self, headers: dict[str, str], body: bytes, deadline: float):
        """MMS's answer; NoWorkerInTime when the deadline passed while no worker could take the
        request, TimeoutError when it passed in MMS or in the queue for it."""
        no_worker = True
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                # No worker can answer now (restarting, reloading): wait, within the deadline,
                # rather than hand MMS a request it would fail.
                while not self.can_forward() and not (await self.ready())[0]:
                    await asyncio.sleep(0.1)
                no_worker = False
                async with self.upstream.slots:
                    while True:  # MMS restarting: wait for it, within the request's deadline
                        try:
                            return await self.upstream.post(self.upstream.path, headers, body)
                        except ConnectionRefusedError:
                            no_worker = True
                            await asyncio.sleep(0.2)
        except TimeoutError:
            if no_worker:
                raise NoWorkerInTime from None
            raise

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
        writer.write(
            render_response(error.status, json_body(error.error, error.hint), keep_alive=False)
        )
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

    async def _send(self, writer, error: HttpError, *, keep_alive: bool = False) -> None:
        self.counters.answered[error.status] = self.counters.answered.get(error.status, 0) + 1
        with contextlib.suppress(Exception):
            writer.write(
                render_response(
                    error.status, json_body(error.error, error.hint), keep_alive=keep_alive
                )
            )
            await writer.drain()


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio's clock is time.monotonic on Linux; keep the conversion in one place."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
    writer.close()
