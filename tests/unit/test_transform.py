"""imgclf.transform: what a batch transform sends, where each answer goes, how predictions.csv
reads every answer format, and the sender's retries (against a real HTTP server on 127.0.0.1
that fails the way a restarting worker does)."""

import csv
import http.server
import json
import threading

import pytest

from imgclf import transform as batch
from imgclf.errors import UserError


def rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_scan_folder_finds_files_at_any_depth_and_leaves_hidden_ones_out(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"12345")
    (tmp_path / "top.png").write_bytes(b"1")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"1")
    (tmp_path / ".git" / "config").write_bytes(b"1")
    items = batch.scan_folder(tmp_path)
    assert [(i.rel, i.size) for i in items] == [("a/b/x.jpg", 5), ("top.png", 1)]
    assert batch.out_path(tmp_path / "out", "a/b/x.jpg") == tmp_path / "out/a/b/x.jpg.out"


def test_an_empty_or_missing_input_and_overlapping_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="holds no files"):
        batch.scan_folder(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        batch.scan_folder(tmp_path / "nope")
    with pytest.raises(UserError, match="overlap"):
        batch.check_folders(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="overlap"):
        batch.check_folders(tmp_path / "in", tmp_path)
    batch.check_folders(tmp_path / "in", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        batch.check_folders(tmp_path / "in", tmp_path / "file")


@pytest.mark.parametrize("rel", ["../x.jpg", "a/../../x", "/etc/passwd", "a//b", "", "a/./b"])
def test_a_key_that_would_leave_the_output_folder_is_refused(rel):
    with pytest.raises(UserError, match="cannot be a file under the output folder"):
        batch.check_rel(rel, "s3://b/in/")


def test_the_payload_limit_is_sagemakers_and_the_reason_names_the_fix(tmp_path):
    assert batch.check_payload_mb(100) == 100
    for bad in (0, 101):
        with pytest.raises(UserError, match="1 to 100"):
            batch.check_payload_mb(bad)
    big = batch.Item("a.jpg", 7_700_000)
    assert batch.oversized([big, batch.Item("b.jpg", 10)], 6) == [big]
    assert "rerun with --max-payload-mb 8" in batch.too_big_reason(big, 6)
    huge = batch.Item("pano.tif", 150 * 1024 * 1024)
    assert "asynchronous endpoint" in batch.too_big_reason(huge, 6)


PREDICTION = {"predictions": [{"label": "cat", "index": 1, "probability": 0.9}]}
PLACEHOLDER = {
    "error": "the body is not an image that can be read",
    "hint": "send JPEG",
    "message": "the body is not an image that can be read (send JPEG)",
    "status": 400,
    "predictions": [],
}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (json.dumps(PREDICTION), ("cat", "1", "0.9", "")),
        (json.dumps(PREDICTION) + "\n", ("cat", "1", "0.9", "")),  # JSON Lines
        ("[[0.1, 0.7, 0.2]]", ("dog", "1", "0.7", "")),  # vectors
        ("[0.1, 0.2, 0.7]\n", ("bird", "2", "0.7", "")),  # vectors, JSON Lines
        (json.dumps(PLACEHOLDER), ("", "", "", "400: " + PLACEHOLDER["message"])),
        ("<html>oops", ("", "", "", "the answer is not JSON")),
        ("{}", ("", "", "", "the answer holds no prediction")),
    ],
)
def test_every_answer_format_becomes_one_row(body, expected):
    assert batch.parse_answer(body.encode(), ["cat", "dog", "bird"]) == expected


def test_predictions_csv_has_one_row_per_input_with_the_reason_for_each_missing_answer(tmp_path):
    out = tmp_path / "out"
    items = [batch.Item(r, 1) for r in ("a/1.jpg", "a/2.jpg", "b/3.jpg", "4.jpg")]
    (out / "a").mkdir(parents=True)
    (out / "a/1.jpg.out").write_text(json.dumps(PREDICTION))
    (out / "a/2.jpg.out").write_text(json.dumps(PLACEHOLDER))
    summary = batch.write_predictions(items, out, errors={"b/3.jpg": "413: too large"})
    assert (summary.images, summary.classified, summary.failed) == (4, 1, 3)
    table = rows(out / batch.PREDICTIONS_FILE)
    assert list(table[0]) == list(batch.CSV_HEADER)
    assert [r["file"] for r in table] == [i.rel for i in items]
    assert table[0]["label"] == "cat" and table[0]["error"] == ""
    assert table[1]["label"] == "" and "not an image" in table[1]["error"]
    assert table[2]["error"] == "413: too large"
    assert "run the same command again" in table[3]["error"]
    assert [i.rel for i in batch.pending(items, out)] == ["b/3.jpg", "4.jpg"]


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `fail` POSTs, then 200 with the body's length."""

    fail = 0
    seen: list[bytes] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with type(self).lock:
            type(self).seen.append(body)
            failing = type(self).fail > 0
            type(self).fail -= failing
        if failing:
            self.send_response(503)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        answer = json.dumps({"predictions": [{"label": "n", "index": len(body), "probability": 1}]})
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    Flaky.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_a_5xx_is_sent_again_and_every_answer_lands_in_its_out_file(tmp_path, flaky):
    source, out = tmp_path / "in", tmp_path / "out"
    (source / "d").mkdir(parents=True)
    for n in range(1, 7):
        (source / "d" / f"{n}.png").write_bytes(b"x" * n)
    Flaky.fail = 2  # two 503s: within SageMaker's three retries
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    items = batch.scan_folder(source)
    outcomes = batch.send_all(url, items, out, concurrency=3, progress=False)
    assert [o.error for o in outcomes] == [None] * 6
    for n in range(1, 7):
        answer = json.loads((out / "d" / f"{n}.png.out").read_bytes())
        assert answer["predictions"][0]["index"] == n  # each file's own answer
    assert len(Flaky.seen) == 8
    assert not list(out.rglob("*.tmp"))  # written atomically: no temp file left


def test_an_answer_that_stays_an_error_is_reported_and_writes_no_out(tmp_path, flaky):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"abc")
    Flaky.fail = 10
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    [outcome] = batch.send_all(
        url, batch.scan_folder(tmp_path / "in"), tmp_path / "out", concurrency=1, progress=False
    )
    assert outcome.error.startswith("503")
    assert len(Flaky.seen) == 1 + batch.RETRIES
    assert not (tmp_path / "out" / "a.png.out").exists()


def test_answers_are_found_under_either_naming_and_nothing_else_is_taken():
    keys = [
        "a/1.jpg.out",  # the input's relative path
        "photos/a/2.jpg.out",  # a folder in front of it
        "b/3.jpg.out.tmp",
        "predictions.csv",
        "other/9.jpg.out",
    ]
    found = batch.answer_keys(keys, ["a/1.jpg", "a/2.jpg", "b/3.jpg", "c/4.jpg"])
    assert found == {"a/1.jpg": "a/1.jpg.out", "a/2.jpg": "photos/a/2.jpg.out"}
    exact = batch.answer_keys(["x/a/1.jpg.out", "a/1.jpg.out"], ["a/1.jpg"])
    assert exact == {"a/1.jpg": "a/1.jpg.out"}  # the exact name wins
