"""Faults of the endpoint's own processes (issue 15: 2, 6, 7): a killed worker, a killed
worker parent, SIGTERM with a request in flight, a killed `serve`. Real processes, real kills."""

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.processes import group_members, proc_stat_fields
from tests.conftest import run_launch
from tests.integration.serving_client import deploy, http, ping_status, post, read_response
from tests.integration.test_serving_faults import make_model, png, running

RECOVERY_LIMIT_S = 240  # a bound on recovery, not a timing assertion: generous for 2 slow cores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ml") / "model")


@pytest.fixture(scope="module")
def endpoint(home, model_dir):
    ep = deploy(home, model_dir, "life")
    yield ep
    if (home / "endpoints" / "life").exists():
        run_launch("delete", "life", home=home)
    assert not running(ep["pid"])


def mms_python(serve_pid: int) -> tuple[list[int], list[int]]:
    """(the workers' parent: MMS's backend, a child of Java; the workers: its children)."""
    members = group_members(serve_pid)

    def cmd(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    python = {p: ppid for p, (state, ppid) in members.items() if b"model_service_worker" in cmd(p)}
    parents = [p for p, ppid in python.items() if b"ModelServer" in cmd(ppid)]
    workers = [p for p, ppid in python.items() if ppid in parents]
    return parents, workers


def watch_recovery(endpoint, kill) -> float:
    """Kill, then ping every 0.2 s while sending requests one after another; return the seconds
    until a request sent after a 200 ping succeeds. Asserts /ping never said 200 while a
    request was failing."""
    url = endpoint["url"]
    pings, requests = [], []
    done = threading.Event()

    def pinger():
        while not done.is_set():
            pings.append((time.monotonic(), ping_status(url, timeout=5)))
            time.sleep(0.2)

    kill()
    killed = time.monotonic()
    time.sleep(1.0)  # /ping's answer may be up to 0.5 s old
    thread = threading.Thread(target=pinger)
    thread.start()
    recovered = None
    try:
        while time.monotonic() - killed < RECOVERY_LIMIT_S:
            start = time.monotonic()
            status, raw = post(url, png(), "image/png", timeout=90)
            requests.append((start, time.monotonic(), status, raw[:200]))
            healthy_before = [t for t, s in pings if s == 200 and t <= start]
            if status == 200 and healthy_before and healthy_before[-1] > killed + 1.0:
                recovered = time.monotonic() - killed
                break
            time.sleep(0.3)
    finally:
        done.set()
        thread.join()
    assert recovered is not None, requests[-3:]
    for start, end, status, raw in requests:
        if status != 200:
            lying = [t for t, s in pings if s == 200 and start <= t <= end]
            assert not lying, (status, raw)
    print(f"recovered in {recovered:.1f} s; answers {[r[2] for r in requests]}")
    return recovered


def test_a_killed_worker_is_replaced(endpoint):
    _, workers = mms_python(endpoint["pid"])
    assert workers
    watch_recovery(endpoint, lambda: [os.kill(p, signal.SIGKILL) for p in workers])
    assert set(mms_python(endpoint["pid"])[1]).isdisjoint(workers)


def test_a_killed_worker_parent_then_worker_is_recovered(endpoint, home):
    parents, workers = mms_python(endpoint["pid"])
    assert parents and workers

    def kill():
        for pid in parents:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

    watch_recovery(endpoint, kill)
    new_parents, new_workers = mms_python(endpoint["pid"])
    assert new_parents and new_workers and set(new_parents).isdisjoint(parents)
    listed = run_launch("endpoints", home=home).stdout
    assert " healthy " in listed and "unhealthy" not in listed, listed


def cpu_seconds(pid: int) -> float:
    fields = proc_stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def slow_batch() -> bytes:
    """A JSON request that keeps the worker busy for a while: nine 2000x2000 PNGs (36 Mpx,
    under the 40 Mpx request budget; PNG has no draft decoding), small on the wire."""
    ramp = np.linspace(0, 255, 2000, dtype=np.uint8)
    images = []
    for i in range(9):
        arr = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(i * 20)), -1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    return json.dumps({"instances": images}).encode()


def test_a_request_whose_worker_dies_is_answered_by_the_next(endpoint):
    """The worker is killed while it works on a request: the front sends that request once
    more, to the restarted worker, and the client gets its answer instead of a 503."""
    _, workers = mms_python(endpoint["pid"])
    assert len(workers) == 1
    worker, body, result = workers[0], slow_batch(), {}
    before = cpu_seconds(worker)
    sender = threading.Thread(
        target=lambda: result.update(
            answer=post(endpoint["url"], body, "application/json", timeout=RECOVERY_LIMIT_S)
        )
    )
    sender.start()
    deadline = time.monotonic() + 60
    while cpu_seconds(worker) - before < 0.15:  # the worker is decoding this request
        assert time.monotonic() < deadline and sender.is_alive(), result
        time.sleep(0.01)
    os.kill(worker, signal.SIGKILL)
    sender.join(RECOVERY_LIMIT_S)
    status, raw = result["answer"]
    assert status == 200, raw[:300]
    answers = json.loads(raw)
    assert len(answers) == 9 and all(a["predictions"] for a in answers)
    assert worker not in mms_python(endpoint["pid"])[1]


def logged_at(log: Path, text: str) -> list[float]:
    """Wall-clock times of MMS's log lines holding `text` (its stamp: 2026-11-23T15:32:07,950)."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if text in line and line[:4].isdigit() and line[10:11] == "T":
            stamp = datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f")
            times.append(stamp.timestamp())  # MMS logs local time, as this process reads it
    return times


def test_ping_is_healthy_again_only_once_the_new_worker_has_its_model(endpoint, home):
    """MMS calls a restarted worker READY as soon as it connects, seconds before its model is
    loaded: /ping waits for the load. The first 200 after a kill comes no earlier than the new
    worker's "model loaded" line (logged through MMS, so up to a fraction of a second late)."""
    log = home / "endpoints" / "life" / "serve.log"
    _, workers = mms_python(endpoint["pid"])
    killed = time.time()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)  # /ping's answer may be up to 0.5 s old
    healthy = None
    while healthy is None and time.time() - killed < RECOVERY_LIMIT_S:
        if ping_status(endpoint["url"], timeout=5) == 200:
            healthy = time.time()
        time.sleep(0.05)
    assert healthy is not None
    loaded = []
    while not loaded and time.time() - killed < RECOVERY_LIMIT_S:
        time.sleep(0.5)  # MMS writes the workers' lines to its log asynchronously
        loaded = [t for t in logged_at(log, "model loaded from") if t > killed]
    assert loaded, log.read_text()[-2000:]
    assert healthy >= loaded[0] - 0.25, (healthy - killed, loaded[0] - killed)


def _loaded_mark(pid: int) -> Path | None:
    """Where worker `pid` marks itself loaded (from its environment), if it can be read."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"IMGCLF_WORKER_LOADED_DIR="):
            return Path(item.split(b"=", 1)[1].decode()) / str(pid)
    return None


def test_a_worker_that_never_finishes_loading_gets_the_server_restarted(home, tmp_path):
    """A worker that connects to MMS and never finishes loading the model (a load hung on a
    stuck filesystem or device; here the replacement worker is stopped mid-load) is a loading
    worker only for as long as a start may take (SAGEMAKER_STARTUP_TIMEOUT): then serve
    restarts MMS and the endpoint answers again. (MMS's own wait for the load is the request
    timeout, set far beyond the test.)"""
    startup_s = 45
    env = {"SAGEMAKER_STARTUP_TIMEOUT": str(startup_s), "SAGEMAKER_MODEL_SERVER_TIMEOUT": "900"}
    ep = deploy(home, make_model(tmp_path / "model"), "stuck", env=env)
    log = home / "endpoints" / "stuck" / "serve.log"
    try:
        stopped = []
        for _ in range(5):  # the stop can come after the load finished: then try again
            _, old = mms_python(ep["pid"])
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + RECOVERY_LIMIT_S
            while not stopped and time.monotonic() < deadline:
                new = [p for p in mms_python(ep["pid"])[1] if p not in old]
                status, body = http(f"{ep['url']}/ping", timeout=5)
                if new and status == 503 and b"still loading" in body:
                    for pid in new:  # connected to MMS, model not loaded yet
                        os.kill(pid, signal.SIGSTOP)
                    stopped = new
                time.sleep(0.05)
            assert stopped, "the replacement worker was never seen loading"
            marks = [_loaded_mark(pid) for pid in stopped]
            if all(mark is not None and not mark.exists() for mark in marks):
                break
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
        assert stopped, "every replacement worker finished loading before it could be stopped"
        stuck_at = time.monotonic()
        assert ping_status(ep["url"], timeout=5) == 503
        message = f"no worker finished loading the model in {startup_s} s".encode()
        while message not in log.read_bytes() and time.monotonic() - stuck_at < RECOVERY_LIMIT_S:
            time.sleep(1.0)
        assert message in log.read_bytes(), log.read_text(errors="replace")[-3000:]
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while ping_status(ep["url"], timeout=5) != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        status, raw = post(ep["url"], png(), "image/png", timeout=90)
        assert status == 200 and json.loads(raw)["predictions"], raw[:300]
        assert not any(pid in mms_python(ep["pid"])[1] for pid in stopped)
    finally:
        stop = run_launch("delete", "stuck", home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not running(ep["pid"])


def test_delete_answers_the_request_in_flight(endpoint, home):
    """A slow request in flight when `delete` runs is answered 200; then nothing is left."""
    body = png()
    head = (
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    result = {}

    def delete():
        result["delete"] = run_launch("delete", "life", home=home)

    with socket.create_connection(("127.0.0.1", endpoint["port"]), timeout=90) as sock:
        sock.sendall(head + body[:10])  # in flight: the front has its headers
        time.sleep(0.5)
        stopper = threading.Thread(target=delete)
        stopper.start()
        time.sleep(2.0)  # SIGTERM has reached serve: it drains
        assert ping_status(endpoint["url"]) != 200  # closed to new clients, or 503
        for i in range(10, len(body), 40):
            sock.sendall(body[i : i + 40])
            time.sleep(0.05)
        answer = read_response(sock)
        stopper.join(timeout=120)
    assert answer is not None and answer[0] == 200, answer
    assert json.loads(answer[3])["predictions"]
    assert result["delete"].returncode == 0 and "stopped" in result["delete"].stdout
    assert not running(endpoint["pid"])


def test_nothing_outlives_a_killed_serve(home, model_dir):
    ep = deploy(home, model_dir, "orphan")
    # serve killed outright: its watchdog takes the whole group down with it.
    os.kill(ep["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while running(ep["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(ep["pid"])
    listed = run_launch("endpoints", home=home)
    assert "orphan" in listed.stdout and "dead" in listed.stdout
    # The port is free again: the next deploy on it works.
    ep = deploy(home, model_dir, "orphan", port=ep["port"])
    # serve and its watchdog both killed: MMS is orphaned until `delete` stops the group.
    watchdog = [
        p for p in group_members(ep["pid"]) if b"killpg" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert watchdog
    for pid in [ep["pid"], *watchdog]:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert running(ep["pid"])  # MMS and its workers, orphaned
    # serve's own exit may lag its SIGKILL on a loaded machine: the state converges within 30 s
    deadline = time.monotonic() + 30
    listed = run_launch("endpoints", home=home)
    while "orphaned" not in listed.stdout and time.monotonic() < deadline:
        time.sleep(1)
        listed = run_launch("endpoints", home=home)
    assert "orphaned" in listed.stdout, listed.stdout
    stop = run_launch("delete", "orphan", home=home)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not running(ep["pid"])
