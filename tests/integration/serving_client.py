"""HTTP clients for the serving tests (integration, docker, contract): urllib's POST, GET and
/ping, raw exact bytes on the wire (odd headers, partial bodies, HTTP/2 prefaces) and a
closed-loop load generator; `deploy` for a local endpoint. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from imgclf.util import free_port
from tests.conftest import run_launch


def deploy(home: Path, model_dir: Path, name: str, *args: str, port=None, env=None) -> dict:
    """`launch.py deploy` with one worker (plus `args`), asserted to succeed: url, port, the
    serve pid (its process group) and name. `env` is added to os.environ."""
    port = port or free_port()
    proc = run_launch(
        "deploy",
        "--model",
        str(model_dir),
        "--name",
        name,
        "--port",
        str(port),
        "--workers",
        "1",
        *args,
        home=home,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((home / "endpoints" / name / "endpoint.json").read_text())
    return {"url": f"http://127.0.0.1:{port}", "port": port, "pid": record["pid"], "name": name}


def _exchange(request, timeout) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url, body, content_type, headers=None, timeout=60) -> tuple[int, bytes]:
    """(status, body) of a POST to `url`/invocations; raises OSError when nothing answers."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": content_type, **(headers or {})},
    )
    return _exchange(request, timeout)


def http(url: str, body: bytes | None = None, headers: dict | None = None, timeout=60.0):
    """(status, body) of a GET (no body) or POST; (0, b"") when nothing answers."""
    try:
        return _exchange(urllib.request.Request(url, data=body, headers=headers or {}), timeout)
    except OSError:
        return 0, b""


def ping_status(url, timeout=2.0) -> int:
    """/ping's status code; 0 when nothing answers."""
    return http(f"{url}/ping", timeout=timeout)[0]


def raw_exchange(port: int, data: bytes, *, timeout: float = 30.0, read_limit=1 << 20):
    """Send bytes as they are; return (status, reason, headers, body) of the answer, or None
    when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, read_limit=read_limit)


def read_response(sock: socket.socket, *, read_limit=1 << 20):
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = (lines[0].split(" ", 2) + [""])[:3]
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < min(length, read_limit):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status), reason, headers, body


def request_bytes(body: bytes, content_type: str = "image/png", extra: str = "") -> bytes:
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


async def _one_client(port, bodies, stop_at, counts: Counter, i: int):
    reader = writer = None
    n = i
    while time.monotonic() < stop_at:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["connect-error"] += 1
                await asyncio.sleep(0.05)
                continue
        body = bodies[n % len(bodies)]
        n += 1
        try:
            writer.write(request_bytes(body))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                if name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await reader.readexactly(length)
            if status == 200:
                json.loads(payload)
            counts[status] += 1
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counts["reset"] += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


def load(port: int, bodies: list[bytes], *, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` keep-alive clients, each sending its next request as soon as
    the last one is answered (whatever the answer), for `seconds`. Goodput counts 200s."""

    async def run():
        counts: Counter = Counter()
        stop_at = time.monotonic() + seconds
        await asyncio.gather(
            *(_one_client(port, bodies, stop_at, counts, i) for i in range(concurrency))
        )
        return counts

    started = time.monotonic()
    counts = asyncio.run(run())
    wall = time.monotonic() - started
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 1),
        "goodput": round(counts[200] / wall, 1),
        "answers": dict(counts),
    }


def runtime_client(url: str):
    """boto3's sagemaker-runtime client pointed at a local endpoint (which serves the runtime
    API's path and takes any credentials)."""
    import boto3

    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - the local endpoint does not check it
    )
