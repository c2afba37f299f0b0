"""The front's pure parts: request heads, body framing, responses; and its content-type
decision and error bodies on real sockets over a stand-in backend."""

import contextlib
import json

import pytest

from imgclf.serving import front


def test_request_heads_are_parsed_strictly():
    head = front.parse_request_head(
        b"POST /invocations?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 12\r\n"
        b"X-Amzn-SageMaker-Custom-Attributes: topk=2\r\nAccept: text/\xe9"
    )
    assert (head.method, head.path, head.version) == ("POST", "/invocations", "HTTP/1.1")
    assert head.headers["content-type"] == "image/png"
    assert head.headers["accept"] == "text/\u00e9"  # latin-1, passed on for a 406 with a hint
    assert head.keep_alive and head.length == 12
    assert not front.parse_request_head(b"GET /ping HTTP/1.0").keep_alive
    chunked = front.parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked")
    assert chunked.length is None


@pytest.mark.parametrize(
    "raw",
    [
        b"PRI * HTTP/2.0",  # an HTTP/2 preface (MMS answers 500 naming a Java exception)
        b"GET /ping",
        b"GET  /ping HTTP/1.1",
        b"\x16\x03\x01\x02\x00",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\n Folded: x",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nBad Name: x",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nX: a\x00b",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2",
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Type: c/d",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 0",  # HTTP/1.1 without Host
    ],
)
def test_malformed_heads_are_client_errors(raw):
    with pytest.raises(front.HttpError) as err:
        front.parse_request_head(raw)
    assert 400 <= err.value.status < 500 and err.value.close


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: \xd9\xa1",  # Arabic-Indic digit one: isdigit() says yes, int() no
        b"Content-Length: -1",
        b"Content-Length: 1e3",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: gzip",
    ],
)
def test_ambiguous_body_framing_is_a_400(headers):
    with pytest.raises(front.HttpError) as err:
        front.parse_request_head(b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + headers)
    assert err.value.status == 400 and err.value.close


def test_responses_have_ascii_phrases_and_exact_lengths():
    raw = front.render_response(413, b'{"error": "x"}', keep_alive=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"Content-Length: 14" in head and b"Connection: close" in head and body
    assert front.render_response(599, b"").startswith(b"HTTP/1.1 599 Error\r\n")


class RecordingBackend:
    """Answers every request 200 with what it was given (the front's side of the contract)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def post(self, headers, body, deadline):
        self.seen.append(headers)
        return 200, "application/json", json.dumps({"type": headers["content-type"]}).encode()

    async def ready(self):
        return True, ""


def _exchange(requests: list[tuple[bytes, str | None]]):
    """(body, content type) requests on one keep-alive connection to a real Front, sent by
    an h11 client: [(status, JSON body)], and the backend that saw what went through."""
    import asyncio

    import h11

    from imgclf.serving.mms import exchange

    backend = RecordingBackend()

    async def scenario():
        gate = front.Front(front.Limits(), backend)
        await gate.start("127.0.0.1", 0)
        port = gate._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn, answers = h11.Connection(h11.CLIENT), []
        for body, content_type in requests:
            headers = {} if content_type is None else {"Content-Type": content_type}
            status, _, raw = await exchange(
                conn, reader, writer, "POST", "/invocations", headers, body
            )
            answers.append((status, json.loads(raw)))
            conn.start_next_cycle()  # the connection stays open, 415s included
        writer.close()
        gate._server.close()
        return answers

    return asyncio.run(scenario()), backend


def test_the_front_decides_content_types_before_the_model_server():
    """curl --data-binary @dog.jpg (no -H: application/x-www-form-urlencoded) is served as the
    JPEG it is; the aliases are resolved; anything else is a 415 that never reaches the model
    server, with a hint that shows the -H to add; the connection stays usable."""
    from tests.conftest import jpeg_bytes, png_bytes

    jpeg, png = jpeg_bytes(), png_bytes()
    form = "application/x-www-form-urlencoded"
    answers, backend = _exchange(
        [
            (jpeg, form),
            (png, form),
            (jpeg, "image/jpg"),
            (png, "binary/octet-stream"),
            (jpeg, None),
            (b"a=1&b=2", form),
            (jpeg, "text/plain"),
            (b"{}", "application/json; charset=utf-8"),
        ]
    )
    types = [doc.get("type") for _, doc in answers]
    assert types[:5] == [
        "image/jpeg",
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "application/octet-stream",
    ]
    assert [status for status, _ in answers[5:7]] == [415, 415]
    assert "-H 'Content-Type: image/jpeg'" in answers[5][1]["hint"]
    assert answers[7] == (200, {"type": "application/json"})
    assert len(backend.seen) == 6  # the two 415s never reached it
    for _, doc in answers[5:7]:  # botocore shows `message`
        assert doc["message"] and doc["error"] in doc["message"] and doc["hint"] in doc["message"]


def _raw(chunks: list[bytes], limits=None, *, wait_close_s: float = 20.0) -> bytes:
    """Raw bytes to a real Front over RecordingBackend; everything it answers until it closes
    (or `wait_close_s` passes: a bound, so a front that never closes fails the test)."""
    import asyncio

    async def scenario():
        gate = front.Front(limits or front.Limits(), RecordingBackend())
        await gate.start("127.0.0.1", 0)
        port = gate._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(wait_close_s):
                while data := await reader.read(1 << 16):
                    received += data
        writer.close()
        gate._server.close()
        return received

    return asyncio.run(scenario())


def test_a_413_closes_once_the_sent_body_is_dropped_not_at_the_body_timeout():
    body = b"\xff" * (7 * 1024 * 1024)
    head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    limits = front.Limits(body_timeout_s=120.0)
    received = _raw([head.encode() + body], limits, wait_close_s=30.0)
    assert received.startswith(b"HTTP/1.1 413 "), received[:100]
    assert received.count(b"HTTP/1.1 ") == 1


def test_headers_over_the_limit_in_one_read_are_a_431():
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\nAccept: " + b"a" * 40_000 + b"\r\n\r\n"
    received = _raw([head])
    assert received.startswith(b"HTTP/1.1 431 "), received[:100]


def test_head_requests_get_one_answer_without_a_body():
    received = _raw([b"HEAD /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 404 ")
    assert received.endswith(b"\r\n\r\n")  # the head alone


def test_a_post_to_ping_is_a_405_and_the_connection_goes_on():
    body = b"x" * 1000
    ping = f"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    get = b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    received = _raw([ping + body + get])
    assert received.startswith(b"HTTP/1.1 405 ") and b"HTTP/1.1 200 " in received


def test_an_oversized_forwarded_header_is_refused_before_the_model_server():
    from tests.conftest import png_bytes

    image = png_bytes()
    head = (
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"X-Amzn-SageMaker-Custom-Attributes: topk=1,{'x' * 5000}\r\n"
        f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n"
    )
    received = _raw([head.encode() + image])
    assert (
        received.startswith(b"HTTP/1.1 431 ") and b"x-amzn-sagemaker-custom-attributes" in received
    )


def test_execution_parameters_and_the_answers_type():
    import asyncio

    import h11

    from imgclf.serving.mms import exchange

    params = {"MaxConcurrentTransforms": 8, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 20}

    async def scenario():
        gate = front.Front(front.Limits(), RecordingBackend(), execution_parameters=params)
        await gate.start("127.0.0.1", 0)
        port = gate._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        got = [await exchange(conn, reader, writer, "GET", "/execution-parameters", {})]
        conn.start_next_cycle()
        headers = {"Content-Type": "image/png", "Accept": "application/jsonlines"}
        got.append(await exchange(conn, reader, writer, "POST", "/invocations", headers, b"x"))
        writer.close()
        gate._server.close()
        return got

    (status, _, body), (status2, headers2, _) = asyncio.run(scenario())
    assert status == 200 and json.loads(body) == params
    assert status2 == 200 and headers2["content-type"] == "application/jsonlines"


def test_a_body_that_ends_early_is_named_so():
    """A client that half-closes its socket mid-body (it gave up) gets the reason, not h11's."""
    import asyncio

    async def scenario() -> bytes:
        gate = front.Front(front.Limits(), RecordingBackend())
        await gate.start("127.0.0.1", 0)
        port = gate._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        writer.write_eof()
        received = b""
        async with asyncio.timeout(20):
            while data := await reader.read(1 << 16):
                received += data
        writer.close()
        gate._server.close()
        return received

    received = asyncio.run(scenario())
    assert received.startswith(b"HTTP/1.1 400 ") and b"the body ended early" in received
