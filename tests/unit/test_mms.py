"""Everything MMS (serving.mms), without starting it: the config and registration it is given,
the private model store, its answers rewritten, readiness read from its management answers and
the workers' own marks, and a request's deadline on a real socket."""

import asyncio
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from imgclf.serving import handler_service, mms
from imgclf.serving.protocol import Limits
from imgclf.serving.settings import Settings, read_settings


def test_mms_listens_on_private_unix_sockets_only(tmp_path):
    settings = Settings(model_dir=tmp_path / "model", workers=3)
    text = mms.config_properties(settings, run_dir=tmp_path / "run", model_store=tmp_path / "s")
    props = dict(line.split("=", 1) for line in text.splitlines())
    # No TCP address another local process (or a container on --network host) could reach.
    assert props["inference_address"] == f"unix:{tmp_path / 'run' / mms.INFERENCE_SOCKET}"
    assert props["management_address"] == f"unix:{tmp_path / 'run' / mms.MANAGEMENT_SOCKET}"
    assert props["use_native_io"] == "true"
    assert not any("http" in v for v in props.values())
    assert props["model_store"] == str(tmp_path / "s")
    assert int(props["max_request_size"]) >= 6 * 1024 * 1024
    assert props["default_workers_per_model"] == "3"
    # MMS 1.1.11 reads default_response_timeout in minutes; the seconds key wins over it.
    assert props["default_response_timeout_seconds"] == "60"
    assert props["default_response_timeout"] == "1"
    # Above what the front hands MMS at once, so MMS never answers an instant 503.
    assert int(props["job_queue_size"]) > Limits().upstream_concurrency
    assert props["blacklist_env_vars"] == "AWS_.*"
    assert props["default_service_handler"] == "imgclf.serving.handler_service"


def test_the_model_is_registered_with_our_handler_and_batching(tmp_path):
    """MMS 1.1 gives its start-up model a batch size of 1, and would take a handler from a
    manifest: serve registers the model itself, naming the handler."""
    env = {"IMGCLF_MODEL_DIR": str(tmp_path / "model"), "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    settings = read_settings(env | {"IMGCLF_BATCH_SIZE": "4", "IMGCLF_MAX_BATCH_DELAY_MS": "5"})
    path = urlsplit(mms.registration_path(settings))
    query = {k: v[0] for k, v in parse_qs(path.query).items()}
    assert path.path == "/models"
    assert query == {
        "url": mms.MODEL_NAME,
        "model_name": mms.MODEL_NAME,
        "handler": "imgclf.serving.handler_service",
        "runtime": "python",
        "batch_size": "4",
        "max_batch_delay": "5",
        "initial_workers": "2",
        "synchronous": "false",
    }
    # Not MMS's start-up model, so /invocations would not find it: the front posts here.
    assert mms.PREDICT_PATH == f"/predictions/{mms.MODEL_NAME}"
    server = mms.ModelServer(settings, env, tmp_path)
    server.store = tmp_path
    assert "--models" not in server._command(tmp_path / "c")


def test_the_private_store_holds_the_artifacts_files_and_nothing_else(tmp_path):
    model = tmp_path / "model"
    (model / "imgclf").mkdir(parents=True)
    (model / "imgclf" / "__init__.py").write_text("open('/tmp/pwned', 'w')\n")
    (model / "MAR-INF").mkdir()
    (model / "MAR-INF" / "MANIFEST.json").write_text('{"model": {"handler": "evil"}}')
    (model / "handler.py").write_text("raise SystemExit\n")
    (model / "model.onnx.data").write_text("external weights: never copied")
    for name in mms.ARTIFACT_FILES:  # model.onnx and model_onnx.json included
        (model / name).write_text("{}" if name.endswith(".json") else "w")
    copy = mms.private_store(model, tmp_path / "store")
    assert copy == tmp_path / "store" / mms.MODEL_NAME
    assert sorted(p.name for p in copy.iterdir()) == sorted(mms.ARTIFACT_FILES)
    assert (copy / "labels.json").read_text() == "{}" and not (copy / "model.pt").is_symlink()


@pytest.mark.parametrize("name", ["labels.json", "model.onnx", "model_onnx.json"])
def test_the_private_store_never_follows_a_link(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("password")
    (model / name).symlink_to(secret)
    with pytest.raises(ValueError, match=f"{name}.*not links"):
        mms.private_store(model, tmp_path / "store")


def test_the_private_store_leaves_out_an_artifact_without_a_graph(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.pt", "labels.json", "model_config.json"):
        (model / name).write_text("x")
    copy = mms.private_store(model, tmp_path / "store")
    names = sorted(p.name for p in copy.iterdir())
    assert names == ["labels.json", "model.pt", "model_config.json"]


def test_mms_answers_say_what_happened():
    died = json.dumps({"code": 500, "type": "InternalServerException", "message": "Worker died."})
    status, body = mms.answer(500, died.encode())
    assert status == 503 and "worker stopped" in json.loads(body)["error"]
    # MMS's form decoder failing on a binary body (curl's default type) is a 500 too: no
    # worker died, and the answer must not say one did.
    form = json.dumps({"code": 500, "type": "InternalServerException", "message": "Bad form"})
    status, body = mms.answer(500, form.encode())
    doc = json.loads(body)
    assert status == 502 and "worker" not in doc["error"] and doc["message"]
    assert "Exception" not in body.decode()
    busy = json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": "full"})
    status, body = mms.answer(503, busy.encode())
    assert status == 503 and "stopped" not in json.loads(body)["error"]
    ours = json.dumps({"error": "bad image", "hint": "send a real one", "message": "m"}).encode()
    assert mms.answer(400, ours) == (400, ours)
    status, body = mms.answer(404, b"<html>not json</html>")
    assert status == 503 and json.loads(body)["error"]


def test_only_mms_worker_deaths_are_sent_again():
    died = json.dumps({"code": 500, "type": "InternalServerException", "message": "Worker died."})
    assert mms.worker_died(500, died.encode())
    ours = json.dumps({"error": "Worker died in the handler's words", "hint": "x"}).encode()
    assert not mms.worker_died(500, ours)  # an answer of our handler is never sent again
    busy = json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": "busy"})
    assert not mms.worker_died(503, busy.encode())
    assert not mms.worker_died(400, died.encode()) and not mms.worker_died(500, b"<html>")


def test_ready_workers_reads_mms_describe_answers():
    doc = {"workers": [{"status": "READY"}, {"status": "LOADING"}, {"status": "READY"}]}
    assert mms.ready_workers(doc) == 2
    assert mms.ready_workers([doc]) == 2
    assert mms.ready_workers({"workers": [{"status": "UNLOADING"}]}) == 0
    assert mms.ready_workers([]) == 0 and mms.ready_workers("junk") == 0


def test_a_worker_counts_as_loaded_only_by_its_own_mark(tmp_path):
    """handler_service.mark_loaded leaves the pid's start time; serve counts a worker only
    when that mark is its own (a dead worker's pid reused by a new one is not loaded)."""
    handler_service.mark_loaded(str(tmp_path))
    me = os.getpid()
    assert mms.loaded_workers(tmp_path, [me]) == [me]
    (tmp_path / str(me)).write_text("12345")  # another process's start time, same pid
    assert mms.loaded_workers(tmp_path, [me]) == []
    assert mms.loaded_workers(tmp_path, [os.getppid()]) == []  # no mark at all
    assert mms.loaded_workers(None, [me]) == []
    handler_service.mark_loaded(None)  # unset: nothing is written, nothing fails
    # A mark that cannot be written fails the worker's load (MMS then starts another) rather
    # than leave a worker that answers but never counts as ready.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RuntimeError, match="cannot mark this worker loaded"):
        handler_service.mark_loaded(str(tmp_path / "a-file"))  # not a folder


class _Stalled(mms.ModelServer):
    """A ModelServer whose workers are (or are not) ready, over a socket that never answers."""

    def __init__(self, settings, socket_path: Path, worker_ready: bool) -> None:
        super().__init__(settings, {}, socket_path.parent)
        self.upstream.retarget(socket_path)
        self.worker_ready = worker_ready

    def _can_forward(self) -> bool:
        return self.worker_ready

    async def ready(self):
        return self.worker_ready, "" if self.worker_ready else "the model is still loading"


def test_a_request_that_no_worker_could_take_is_a_503_and_a_slow_one_a_504(tmp_path):
    """Both wait out the request's deadline, on a real socket: one for a worker while none is
    ready (MMS restarting, the model reloading: retry shortly), the other in MMS (a 504 about
    the request). Neither says the other's reason."""
    from imgclf.serving.protocol import RequestError

    settings = Settings(limits=Limits(request_timeout_s=1.0))
    sock = tmp_path / "inference.sock"

    async def scenario():
        async def silent_mms(reader, writer):  # takes the request, never answers
            await reader.read(1 << 16)

        server = await asyncio.start_unix_server(silent_mms, str(sock))
        answers = []
        for worker_ready in (False, True):
            backend = _Stalled(settings, sock, worker_ready)
            try:
                await backend.post({}, b"abc", time.monotonic() + 1.0)
            except RequestError as exc:
                answers.append(exc)
        server.close()
        return answers

    no_worker, slow = asyncio.run(scenario())
    assert no_worker.status == 503 and "no worker could answer" in no_worker.error
    assert "retry shortly" in no_worker.hint
    assert slow.status == 504 and "did not answer within" in slow.error


def test_a_management_answer_that_breaks_off_is_a_connection_error(tmp_path):
    """MMS closing mid-answer (it is being stopped) reads as the server being gone: the probe
    says not ready, it does not raise out of /ping or the supervisor."""
    sock = tmp_path / "m.sock"

    async def scenario():
        async def half_answer(reader, writer):
            await reader.read(1 << 16)
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"work')
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(half_answer, str(sock))
        with pytest.raises(ConnectionResetError):
            await mms.management(sock, "/models/model")
        backend = mms.ModelServer(Settings(), {}, tmp_path)
        backend._management = sock
        result = await backend._query()
        server.close()
        return result

    assert asyncio.run(scenario()) == (False, "the model server does not answer")


def test_the_private_store_refuses_a_fifo_without_waiting_on_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "model.pt")
    with pytest.raises(ValueError, match="not a regular file"):
        mms.private_store(model, tmp_path / "store")


def test_the_process_group_is_read_when_used(tmp_path):
    """serve makes the ModelServer before it leads its own group: stopping MMS must signal
    serve's group then, never the group of whoever started serve."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from pathlib import Path\n"
        "from imgclf.serving.mms import ModelServer\n"
        "from imgclf.serving.settings import Settings\n"
        "from imgclf.processes import lead_own_group\n"
        f"server = ModelServer(Settings(), {{}}, Path({str(tmp_path)!r}))\n"
        "lead_own_group()\n"
        "print(server.pgid == os.getpid() != os.getppid())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_a_swapped_in_model_has_its_own_name_folder_and_marks(tmp_path):
    """While serve swaps models two are registered in one MMS: each has its own folder in the
    store, its own predictions path, and its workers' marks name it, so the one still loading
    is never counted as ready by the other's marks."""
    settings = read_settings({"IMGCLF_MODEL_DIR": str(tmp_path / "model")})
    query = parse_qs(urlsplit(mms.registration_path(settings, "model-2")).query)
    assert query["url"] == ["model-2"] and query["model_name"] == ["model-2"]
    assert mms.predict_path("model-2") == "/predictions/model-2"
    assert mms.predict_path(mms.MODEL_NAME) == mms.PREDICT_PATH
    model = tmp_path / "artifact"
    model.mkdir()
    (model / "labels.json").write_text("[]")
    assert mms.private_store(model, tmp_path / "store", "model-2") == tmp_path / "store/model-2"
    handler_service.mark_loaded(str(tmp_path), "model-2")
    me = os.getpid()
    assert mms.loaded_workers(tmp_path, [me], "model-2") == [me]
    assert mms.loaded_workers(tmp_path, [me], mms.MODEL_NAME) == []
    assert mms.loaded_workers(tmp_path, [me]) == [me]  # any model's


def test_a_worker_that_cannot_load_its_model_leaves_the_reason_for_serve(tmp_path):
    """MMS retries a failed load with backoff for ever and logs it in Java's words: serve reads
    the worker's own reason, for that model only, and stops waiting."""
    handler_service.mark_failed(str(tmp_path), "model-3", ValueError("model.pt: bad\nmore"))
    assert mms.load_failure(tmp_path, "model-3") == "model.pt: bad"
    assert mms.load_failure(tmp_path, mms.MODEL_NAME) is None
    assert mms.load_failure(None, "model-3") is None
    handler_service.mark_failed(str(tmp_path), "model-4", MemoryError())
    assert mms.load_failure(tmp_path, "model-4") == "MemoryError"
    handler_service.mark_failed(None, "model-4", MemoryError())  # unset: nothing to write
