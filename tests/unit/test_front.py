"""The front's pure parts: request heads, body framing, MMS's errors rewritten, responses; and
the supervisor's reading of MMS's management answers and of the environment."""

import json
from pathlib import Path

import pytest

from imgclf.serving import front, serve


def test_request_heads_are_parsed_strictly():
    head = front.parse_request_head(
        b"POST /invocations?x=1 HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: 12\r\n"
        b"X-Amzn-SageMaker-Custom-Attributes: topk=2\r\nAccept: text/\xe9"
    )
    assert (head.method, head.path, head.version) == ("POST", "/invocations", "HTTP/1.1")
    assert head.headers["content-type"] == "image/png"
    assert head.headers["accept"] == "text/\u00e9"  # latin-1, passed on for a 406 with a hint
    assert head.keep_alive and front.body_length(head) == 12
    assert not front.parse_request_head(b"GET /ping HTTP/1.0").keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"PRI * HTTP/2.0",  # an HTTP/2 preface (MMS answers 500 naming a Java exception)
        b"GET /ping",
        b"GET  /ping HTTP/1.1",
        b"\x16\x03\x01\x02\x00",
        b"POST /invocations HTTP/1.1\r\n Folded: x",
        b"POST /invocations HTTP/1.1\r\nBad Name: x",
        b"POST /invocations HTTP/1.1\r\nX: a\x00b",
        b"POST /invocations HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
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
    head = front.parse_request_head(b"POST /invocations HTTP/1.1\r\n" + headers)
    with pytest.raises(front.HttpError) as err:
        front.body_length(head)
    assert err.value.status == 400


def test_mms_errors_are_rewritten_without_java_names():
    mms = json.dumps(
        {"code": 500, "type": "InternalServerException", "message": "Worker died."}
    ).encode()
    status, body = front.rewrite_upstream_error(500, mms)
    doc = json.loads(body)
    assert status == 503 and doc["error"] and doc["hint"]
    assert "Exception" not in body.decode()
    ours = json.dumps({"error": "bad image", "hint": "send a real one"}).encode()
    assert front.rewrite_upstream_error(400, ours) == (400, ours)
    status, body = front.rewrite_upstream_error(404, b"<html>not json</html>")
    assert status == 404 and json.loads(body)["error"]


def test_only_mms_worker_deaths_are_sent_again():
    died = json.dumps({"code": 500, "type": "InternalServerException", "message": "Worker died."})
    assert front.worker_died(500, died.encode())
    ours = json.dumps({"error": "Worker died in the handler's words", "hint": "x"}).encode()
    assert not front.worker_died(500, ours)  # an answer of our handler is never sent again
    busy = json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": "busy"})
    assert not front.worker_died(503, busy.encode())
    assert not front.worker_died(400, died.encode()) and not front.worker_died(500, b"<html>")


def test_responses_have_ascii_phrases_and_exact_lengths():
    raw = front.render_response(413, b'{"error": "x"}', keep_alive=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"Content-Length: 14" in head and b"Connection: close" in head and body
    assert front.render_response(599, b"").startswith(b"HTTP/1.1 599 Error\r\n")


def test_ready_workers_reads_mms_describe_answers():
    doc = {"workers": [{"status": "READY"}, {"status": "LOADING"}, {"status": "READY"}]}
    assert serve.ready_workers(doc) == 2
    assert serve.ready_workers([doc]) == 2
    assert serve.ready_workers({"workers": [{"status": "UNLOADING"}]}) == 0
    assert serve.ready_workers([]) == 0 and serve.ready_workers("junk") == 0


def test_settings_come_from_the_environment_and_bad_values_are_named():
    settings = serve.read_settings(
        {
            "SAGEMAKER_BASE_DIR": "/opt/ml",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "30",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "IMGCLF_HEADER_TIMEOUT_SECONDS": "2.5",
            "IMGCLF_RESPONSE_FORMAT": "vectors",
        }
    )
    assert settings.model_dir == Path("/opt/ml/model") and settings.workers == 2
    assert settings.limits.request_timeout_s == 30 and settings.limits.header_timeout_s == 2.5
    assert settings.response_format == "vectors"
    with pytest.raises(ValueError, match="SAGEMAKER_MODEL_SERVER_TIMEOUT"):
        serve.read_settings({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "sixty"})
    with pytest.raises(ValueError, match="IMGCLF_RESPONSE_FORMAT"):
        serve.read_settings({"IMGCLF_RESPONSE_FORMAT": "csv"})


def test_serve_registers_the_model_with_batching(tmp_path):
    """MMS 1.1 gives its start-up model a batch size of 1: serve registers it through the
    management API instead, with the batch size and delay of the environment."""
    from urllib.parse import parse_qs, urlsplit

    env = {"IMGCLF_MODEL_DIR": str(tmp_path / "model"), "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    settings = serve.read_settings(env)
    assert (settings.batch_size, settings.max_batch_delay_ms) == (8, 1)
    settings = serve.read_settings(
        env | {"IMGCLF_BATCH_SIZE": "4", "IMGCLF_MAX_BATCH_DELAY_MS": "5"}
    )
    path = urlsplit(serve.registration_path(settings))
    query = {k: v[0] for k, v in parse_qs(path.query).items()}
    assert path.path == "/models"
    assert query == {
        "url": "model",
        "model_name": serve.MODEL_NAME,
        "batch_size": "4",
        "max_batch_delay": "5",
        "initial_workers": "2",
        "synchronous": "false",
    }
    # Not MMS's start-up model, so /invocations would not find it: the front posts here.
    assert serve.PREDICT_PATH == f"/predictions/{serve.MODEL_NAME}"
    assert "--models" not in serve.Supervisor(settings, env, tmp_path)._command(tmp_path / "c")
    for bad in ("0", "-1", "x"):
        with pytest.raises(ValueError, match="IMGCLF_BATCH_SIZE"):
            serve.read_settings(env | {"IMGCLF_BATCH_SIZE": bad})


def test_a_worker_counts_as_loaded_only_by_its_own_mark(tmp_path):
    """handler_service.mark_loaded leaves the pid's start time; serve counts a worker only
    when that mark is its own (a dead worker's pid reused by a new one is not loaded)."""
    import os

    from imgclf.serving import handler_service

    handler_service.mark_loaded(str(tmp_path))
    me = os.getpid()
    assert serve.loaded_workers(tmp_path, [me]) == [me]
    (tmp_path / str(me)).write_text("12345")  # another process's start time, same pid
    assert serve.loaded_workers(tmp_path, [me]) == []
    assert serve.loaded_workers(tmp_path, [os.getppid()]) == []  # no mark at all
    assert serve.loaded_workers(None, [me]) == []
    handler_service.mark_loaded(None)  # unset: nothing is written, nothing fails
    # A mark that cannot be written fails the worker's load (MMS then starts another) rather
    # than leave a worker that answers but never counts as ready.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RuntimeError, match="cannot mark this worker loaded"):
        handler_service.mark_loaded(str(tmp_path / "a-file"))  # not a folder


def test_a_request_that_no_worker_could_take_is_a_503_and_a_slow_one_a_504():
    """Both wait out the request's deadline, on real sockets: one for a worker while none is
    ready (MMS restarting, the model reloading: retry shortly), the other in MMS (a 504 about
    the request). Neither says the other's reason."""
    import asyncio

    async def exchange(port: int) -> tuple[int, dict]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = front.parse_response_head(head)
        body = await reader.readexactly(int(headers["content-length"]))
        writer.close()
        return status, json.loads(body)

    async def scenario() -> tuple:
        silent_clients = []

        async def silent_mms(reader, writer):  # takes the request, never answers
            silent_clients.append(writer)
            await reader.read(1 << 16)

        mms = await asyncio.start_server(silent_mms, "127.0.0.1", 0)
        limits = front.Limits(request_timeout_s=1.0)
        answers = []
        for worker_ready in (False, True):

            async def ready(worker_ready=worker_ready):
                return worker_ready, "" if worker_ready else "the model is still loading"

            upstream = front.Upstream(limits)
            upstream.retarget(mms.sockets[0].getsockname()[1])
            gate = front.Front(limits, upstream, ready, can_forward=lambda w=worker_ready: w)
            await gate.start("127.0.0.1", 0)
            answers.append(await exchange(gate._server.sockets[0].getsockname()[1]))
            gate._server.close()
        mms.close()
        return answers

    (no_worker, body_a), (slow, body_b) = asyncio.run(scenario())
    assert no_worker == 503 and "no worker could answer" in body_a["error"], body_a
    assert "retry shortly" in body_a["hint"]
    assert slow == 504 and "did not answer within" in body_b["error"], body_b
