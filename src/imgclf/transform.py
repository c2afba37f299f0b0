"""Batch transform as SageMaker runs it, for `launch.py transform` on every target: each input file
is one request (SplitType None, one image a record), its answer written to `<relative path>.out`
under the output folder; then `predictions.csv`, one row per input file, read back from the
`.out` files (so it is the same after a local run and after a SageMaker job's outputs are
downloaded).

The local sender keeps as many requests in flight as the server's `GET /execution-parameters`
says it takes, over one keep-alive connection per slot; it writes each `.out` atomically, so a
run stopped at any point resumes by sending only the files that have none. Torch-free."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imgclf.errors import UserError
from imgclf.serving.protocol import JSON_TYPE, JSONLINES_TYPE, MAX_PAYLOAD_MB
from imgclf.util import atomic_write

OUT_SUFFIX = ".out"
PREDICTIONS_FILE = "predictions.csv"
CSV_HEADER = ("file", "label", "index", "probability", "error")
DEFAULT_PAYLOAD_MB = 6  # SageMaker's default MaxPayloadInMB
DEFAULT_TIMEOUT_S = 600  # ModelClientConfig.InvocationsTimeoutInSeconds' default
RETRIES = 3  # ModelClientConfig.InvocationsMaxRetries' default
IMAGE_TYPE = "application/x-image"  # what SageMaker's image algorithms take in a transform
# The type a file is sent as, by its suffix (anything else: application/x-image, and the
# server reads the bytes as an image).
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
ACCEPT_TYPES = {"json": JSON_TYPE, "jsonlines": JSONLINES_TYPE}


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), IMAGE_TYPE)


def check_payload_mb(value: int) -> int:
    if not 1 <= value <= MAX_PAYLOAD_MB:
        raise UserError(
            f"--max-payload-mb {value} is out of range: SageMaker takes 1 to {MAX_PAYLOAD_MB} "
            "(for larger photos use an asynchronous endpoint)"
        )
    return value


# ---------------------------------------------------------------- inputs and outputs


@dataclass(frozen=True)
class Item:
    """One input file: its path relative to the input root (POSIX, SageMaker's key suffix) and
    size; `path` is where it is read from locally (None for an S3 object)."""

    rel: str
    size: int
    path: Path | None = None


def check_rel(rel: str, where: str) -> str:
    """A relative path that stays inside the folder it is joined to (an S3 key suffix may hold
    `..`, a leading `/` or empty parts; none of those may become a local path)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
        raise UserError(
            f"{where}: {rel!r} cannot be a file under the output folder (empty, '.' or '..' "
            "parts); rename it, or leave it out of the input prefix"
        )
    return rel


def scan_folder(root: Path) -> list[Item]:
    """Every file under `root` at any depth, sorted; hidden files and folders (a leading dot)
    are left out, as the upload of a dataset leaves them out."""
    if not root.is_dir():
        raise UserError(f"--input {root} is not a folder (give a folder of images or s3://...)")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(
                    f"{path!r}: the file name is not UTF-8 (S3 keys and predictions.csv need "
                    "it); rename it"
                ) from None
            items.append(Item(rel, path.stat().st_size, path))
    if not items:
        raise UserError(f"--input {root} holds no files")
    return sorted(items, key=lambda item: item.rel)  # S3's key order


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """The output may not be inside the input (its .out files would become inputs), nor the
    input inside the output."""
    check_output_folder(output_dir)
    a, b = input_dir.resolve(), output_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UserError(
            f"--output {output_dir} and --input {input_dir} overlap; write the outputs to a "
            "folder outside the input"
        )


def check_output_folder(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output {output_dir} is a file; give a folder (made if missing)")


def answer_keys(keys: Iterable[str], rels: Iterable[str]) -> dict[str, str]:
    """{input path: its answer's key} from the keys under an output prefix (relative to it).
    SageMaker names an answer `<path relative to the input prefix>.out`; a key with more
    folders in front of that path (how its documentation's example reads) is matched by its
    longest such suffix, so either naming is found."""
    wanted = set(rels)
    found: dict[str, str] = {}
    for key in keys:
        if not key.endswith(OUT_SUFFIX):
            continue
        parts = key[: -len(OUT_SUFFIX)].split("/")
        for start in range(len(parts)):
            rel = "/".join(parts[start:])
            if rel in wanted:
                if start == 0 or rel not in found:
                    found[rel] = key
                break
    return found


def out_path(output_dir: Path, rel: str) -> Path:
    return output_dir / (check_rel(rel, "input") + OUT_SUFFIX)


def pending(items: Iterable[Item], output_dir: Path) -> list[Item]:
    """The items with no `.out` yet: what a resumed run sends."""
    return [item for item in items if not out_path(output_dir, item.rel).is_file()]


def oversized(items: Iterable[Item], max_payload_mb: int) -> list[Item]:
    limit = max_payload_mb * 1024 * 1024
    return [item for item in items if item.size > limit]


def too_big_reason(item: Item, max_payload_mb: int) -> str:
    need = min(MAX_PAYLOAD_MB, -(-item.size // (1024 * 1024)))
    fix = (
        f"rerun with --max-payload-mb {need}"
        if item.size <= MAX_PAYLOAD_MB * 1024 * 1024
        else "send it to an asynchronous endpoint"
    )
    return f"{item.size / 1e6:.1f} MB is over the {max_payload_mb} MB payload limit; {fix}"


# ---------------------------------------------------------------- the local sender


def execution_parameters(url: str, timeout: float = 30.0) -> dict:
    """The server's GET /execution-parameters (SageMaker asks the same before it sends)."""
    host, port = _host_port(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/execution-parameters")
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise UserError(f"{url}/execution-parameters cannot be read ({exc})") from None
    finally:
        conn.close()
    try:
        doc = json.loads(body) if response.status == 200 else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("MaxConcurrentTransforms"), int):
        raise UserError(
            f"{url}/execution-parameters answered {response.status} without "
            "MaxConcurrentTransforms; is it imgclf's serving program?"
        )
    return doc


def _host_port(url: str) -> tuple[str, int]:
    rest = url.removeprefix("http://").rstrip("/")
    host, _, port = rest.rpartition(":")
    return host, int(port)


@dataclass
class Outcome:
    """What happened to one item: written (its .out is there), or the reason it is not."""

    rel: str
    error: str | None = None


def _error_text(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("error"):
        hint = f" ({doc['hint']})" if doc.get("hint") else ""
        return f"{status}: {doc['error']}{hint}"
    return f"{status}: {body[:200].decode(errors='replace')}"


class Sender:
    """One in-flight slot: a keep-alive connection that posts one file at a time, with
    SageMaker's retries (a dropped connection or a 5xx is sent again, up to RETRIES times)."""

    def __init__(self, url: str, *, accept: str, timeout: float) -> None:
        self.host, self.port = _host_port(url)
        self.accept, self.timeout = accept, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _post(self, body: bytes, ctype: str) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": ctype, "Accept": self.accept}
        self.conn.request("POST", "/invocations", body=body, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.will_close:
            self.close()
        return response.status, payload

    def send(
        self, body: bytes, ctype: str, stop: threading.Event | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of the last try; (0, reason) when no answer came at all. No retry
        once `stop` is set."""
        last: tuple[int, bytes] = (0, b"")
        for attempt in range(RETRIES + 1):
            try:
                last = self._post(body, ctype)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                last = (0, f"no answer ({exc.__class__.__name__}: {exc})".encode())
            if 0 < last[0] < 500 or attempt == RETRIES or (stop and stop.is_set()):
                return last
            time.sleep(min(2.0, 0.2 * 2**attempt))
        return last

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send_all(
    url: str,
    items: list[Item],
    output_dir: Path,
    *,
    concurrency: int,
    accept: str = JSON_TYPE,
    max_payload_mb: int = DEFAULT_PAYLOAD_MB,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool | None = None,
) -> list[Outcome]:
    """POST every item (read from its `path`) with `concurrency` requests in flight; each 200
    answer is written atomically to its `.out`. Outcomes in the items' order. A Ctrl-C stops
    sending: what is in flight finishes (or is abandoned with its connection), every `.out`
    already written stays, and KeyboardInterrupt is raised again."""
    from tqdm import tqdm

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(items)):
        todo.put(i)
    outcomes: list[Outcome | None] = [None] * len(items)
    stop = threading.Event()
    done = threading.Semaphore(0)

    def one(sender: Sender, item: Item) -> Outcome:
        if oversized([item], max_payload_mb):
            return Outcome(item.rel, too_big_reason(item, max_payload_mb))
        assert item.path is not None
        try:
            body = item.path.read_bytes()
        except OSError as exc:
            return Outcome(item.rel, f"cannot be read: {exc.strerror or exc}")
        status, answer = sender.send(body, content_type(item.rel), stop)
        if status != 200:
            text = answer.decode(errors="replace") if status == 0 else _error_text(status, answer)
            return Outcome(item.rel, text)
        atomic_write(out_path(output_dir, item.rel), answer)
        return Outcome(item.rel)

    def work() -> None:
        sender = Sender(url, accept=accept, timeout=timeout)
        try:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    outcomes[i] = one(sender, items[i])
                except Exception as exc:  # noqa: BLE001 - one file's failure is its row
                    outcomes[i] = Outcome(items[i].rel, f"not sent: {exc}")
                done.release()
        finally:
            sender.close()

    threads = [
        threading.Thread(target=work, daemon=True, name=f"transform-{n}")
        for n in range(max(1, min(concurrency, len(items))))
    ]
    for t in threads:
        t.start()
    quiet = not sys.stderr.isatty() if progress is None else not progress
    with tqdm(
        total=len(items), unit="img", desc="transform", disable=quiet, file=sys.stderr
    ) as bar:
        try:
            for _ in range(len(items)):
                while not done.acquire(timeout=0.5):
                    if not any(t.is_alive() for t in threads):
                        break
                bar.update(1)
        except KeyboardInterrupt:
            stop.set()  # what is in flight may finish (and be written) within a few seconds
            deadline = time.monotonic() + 5
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            raise
    for t in threads:
        t.join()
    return [o or Outcome(items[i].rel, "not sent") for i, o in enumerate(outcomes)]


# ---------------------------------------------------------------- predictions.csv


def parse_answer(body: bytes, labels: list[str] | None) -> tuple[str, str, str, str]:
    """(label, index, probability, error) of one image's answer, in any format the endpoint
    writes: predictions (an object), vectors ([[p0, ...]]), either as JSON or one JSON line, and
    the batch placeholder of an image that could not be classified. An answer below the
    endpoint's min_confidence gives an empty label beside its best class's index and
    probability. Anything else (an `.out` from S3 is not trusted) is a row with a reason."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text.splitlines()[0] if "\n" in text else text)
    except (ValueError, IndexError):
        return "", "", "", "the answer is not JSON"
    if isinstance(doc, list) and len(doc) == 1 and isinstance(doc[0], list | dict):
        doc = doc[0]
    if isinstance(doc, dict):
        found = doc.get("predictions")
        top = found[0] if isinstance(found, list) and found else None
        if isinstance(top, dict) and _is_number(top.get("probability")):
            label = "" if doc.get("confident") is False else str(top.get("label", ""))
            return label, str(top.get("index", "")), str(top["probability"]), ""
        if doc.get("error"):
            why = str(doc.get("message") or doc["error"])[:500]
            return "", "", "", f"{doc['status']}: {why}" if doc.get("status") else why
    if isinstance(doc, list) and doc and all(_is_number(p) for p in doc):
        unsure = False
        if labels and len(doc) == len(labels) + 1:  # min_confidence's flag at index N
            unsure, doc = doc[-1] >= 0.5, doc[:-1]
        index = max(range(len(doc)), key=doc.__getitem__)
        label = labels[index] if labels and index < len(labels) and not unsure else ""
        return label, str(index), str(doc[index]), ""
    return "", "", "", "the answer holds no prediction"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Summary:
    images: int
    classified: int
    failed: int
    predictions: Path


def write_predictions(
    items: list[Item],
    output_dir: Path,
    *,
    errors: dict[str, str] | None = None,
    labels: list[str] | None = None,
    read: Callable[[Path], bytes] = Path.read_bytes,
) -> Summary:
    """predictions.csv from every item's `.out` (or the reason it has none), one row each."""
    errors = errors or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    classified = 0
    for item in items:
        out = out_path(output_dir, item.rel)
        if out.is_file():
            label, index, probability, error = parse_answer(read(out), labels)
        else:
            label = index = probability = ""
            error = errors.get(item.rel) or "no answer yet (run the same command again to resume)"
        classified += not error
        writer.writerow((item.rel, label, index, probability, error))
    path = output_dir / PREDICTIONS_FILE
    atomic_write(path, buffer.getvalue())
    return Summary(len(items), classified, len(items) - classified, path)


def model_labels(model: Path) -> list[str]:
    """The class names of a model dir or model.tar.gz (a vectors answer carries none)."""
    import tempfile

    from imgclf import archives
    from imgclf.artifacts import LABELS_FILE, check_labels

    if model.is_dir():
        return _read_labels(model / LABELS_FILE, check_labels)
    if not archives.is_archive(model):
        raise UserError(f"--model {model}: not a model directory nor a model.tar.gz")
    with tempfile.TemporaryDirectory(prefix="imgclf-labels-") as tmp:
        archives.unpack(model, Path(tmp) / "model")
        return _read_labels(Path(tmp) / "model" / LABELS_FILE, check_labels)


def _read_labels(path: Path, check: Callable) -> list[str]:
    try:
        return check(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); is it a model imgclf trained?") from None
