"""`launch.py transform` on the local target, run for real: the serving program started in batch
mode as `deploy` starts it, every file of a folder (digits, odd and broken images, at any depth)
answered in its `.out`, predictions.csv checked row by row against what a deployed endpoint
answers for the same file, the resume, a photo over 6 MB, JSON Lines and vectors."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from imgclf.transform import content_type
from tests.conftest import random_model, run_launch, write_odd_images
from tests.integration.serving_client import deploy, post

BAD = {"odd/empty.jpg", "odd/text.jpg", "odd/truncated.jpg"}


def transform(home, model, source, out, *args):
    return run_launch(
        "transform", "--model", str(model), "--input", str(source), "--output", str(out), *args,
        home=home,
        timeout=600,
    )  # fmt: skip


def table(out):
    with (out / "predictions.csv").open() as f:
        return {row["file"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def model(tiny_digits, tmp_path_factory):
    classes = sorted(p.name for p in (tiny_digits / "train").iterdir())
    return random_model(tmp_path_factory.mktemp("transform") / "model", classes)


@pytest.fixture(scope="module")
def source(tiny_digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("transform-in")
    shutil.copytree(tiny_digits / "test", root / "digits" / "test")
    write_odd_images(root / "odd", np.random.default_rng(1))
    return root


@pytest.fixture(scope="module")
def first_run(home, model, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("transform-out") / "out"
    proc = transform(home, model, source, out)
    return proc, out


def test_every_file_is_answered_and_the_summary_counts_the_failures(first_run, source, home):
    proc, out = first_run
    files = sorted(
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # three images cannot be read
    assert "Traceback" not in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    expected = (
        f"{len(files)} images: {len(files) - len(BAD)} classified, {len(BAD)} failed "
        f"(see {out / 'predictions.csv'})"
    )
    assert last == expected
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.out")) == [
        f + ".out" for f in files
    ]  # SageMaker's naming: the bad images too (a placeholder says why)
    rows = table(out)
    assert sorted(rows) == files
    assert {f for f, r in rows.items() if r["error"]} == BAD
    # the server was stopped at the end
    assert "no local endpoints" in run_launch("endpoints", home=home).stdout


def test_each_row_is_what_a_deployed_endpoint_answers_for_that_file(first_run, source, model, home):
    _, out = first_run
    endpoint = deploy(home, model, "same-model")
    try:
        for rel, row in table(out).items():
            path = source / rel
            status, raw = post(endpoint["url"], path.read_bytes(), content_type(rel))
            answer = json.loads(raw)
            if rel in BAD:
                assert status == 400
                assert row["error"] == f"400: {answer['message']}"
                continue
            assert status == 200, (rel, raw[:200])
            assert json.loads((out / f"{rel}.out").read_bytes()) == answer
            top = answer["predictions"][0]
            assert (row["label"], int(row["index"]), float(row["probability"])) == (
                top["label"],
                top["index"],
                top["probability"],
            )
            assert row["error"] == ""
    finally:
        run_launch("delete", "same-model", home=home)


def test_a_rerun_sends_only_the_files_without_an_answer(first_run, source, model, home):
    _, out = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.out")}
    removed = sorted(before)[:5]
    for p in removed:
        p.unlink()
    proc = transform(home, model, source, out)
    assert proc.returncode == 1
    assert "  5 to send" in proc.stdout, proc.stdout
    for p, mtime in before.items():
        assert p.is_file()
        if p not in removed:
            assert p.stat().st_mtime_ns == mtime  # not sent again
    # nothing left to send: the server is not even started
    again = transform(home, model, source, out)
    assert "already answered" in again.stdout and "starting endpoint" not in again.stdout
    assert again.stdout.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]


def _big_png() -> bytes:
    """Noise does not compress: a 2000x1500 PNG of about 9 MB (3 Mpx, within the pixel
    budget)."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    return buf.getvalue()


def test_a_photo_over_6_mb_needs_and_gets_max_payload_mb(model, home, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    big = _big_png()
    need = -(-len(big) // (1024 * 1024))
    assert need > 6
    (source / "big.png").write_bytes(big)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(source / "small.png")
    first = transform(home, model, source, out)
    assert first.returncode == 1
    assert f"rerun with --max-payload-mb {need}" in table(out)["big.png"]["error"]
    assert table(out)["small.png"]["label"]
    second = transform(home, model, source, out, "--max-payload-mb", str(need))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "  1 to send" in second.stdout
    assert table(out)["big.png"]["label"] and not table(out)["big.png"]["error"]


def test_json_lines_of_vectors_are_read_with_the_models_labels(model, home, source, tmp_path):
    out = tmp_path / "out"
    small = tmp_path / "in"
    shutil.copytree(source / "digits" / "test" / "003.two", small / "two")
    proc = transform(
        home, model, small, out, "--accept", "jsonlines", "--response-format", "vectors"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = [v for _, v in sorted(json.loads((model / "labels.json").read_text()).items(),
                                   key=lambda kv: int(kv[0]))]  # fmt: skip
    for rel, row in table(out).items():
        raw = (out / f"{rel}.out").read_text()
        assert raw.endswith("\n") and raw.count("\n") == 1  # one JSON line per image
        vector = json.loads(raw)
        assert len(vector) == len(labels)
        best = int(np.argmax(vector))
        assert (row["index"], row["label"]) == (str(best), labels[best])


def _ctrl_c_default() -> None:
    """SIGINT as a terminal delivers it: a test suite started in the background (`cmd &` in a
    script) ignores SIGINT, and its children would inherit that (Python then installs no
    KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_server_keeps_every_answer_and_the_rerun_sends_the_rest(
    model, source, home, tmp_path
):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import LAUNCH, ROOT

    out, many = tmp_path / "out", tmp_path / "in"
    for n in range(8):  # enough files that the run is still sending when the signal comes
        shutil.copytree(source, many / f"copy{n}")
    source = many
    env = {**os.environ, "IMGCLF_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    args = ["transform", "--model", str(model), "--input", str(source), "--output", str(out)]
    proc = subprocess.Popen(
        [*LAUNCH, *args, "--concurrency", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_default,
    )
    deadline = time.monotonic() + 300
    while len(list(out.rglob("*.out"))) < 5 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    done = len(list(out.rglob("*.out")))
    files = [p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert 5 <= done < len(files)
    assert not list(out.rglob("*.tmp"))  # no half-written answer
    assert "no local endpoints" in run_launch("endpoints", home=home).stdout  # server stopped
    rerun = transform(home, model, source, out)
    assert f"  {len(files) - done} to send" in rerun.stdout, rerun.stdout
    assert len(table(out)) == len(files)


def test_ctrl_c_while_the_server_starts_leaves_nothing_running(model, source, home, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from imgclf.processes import group_alive
    from tests.conftest import LAUNCH, ROOT

    env = {**os.environ, "IMGCLF_HOME": str(home)}
    args = ["transform", "--model", str(model), "--input", str(source), "--output"]
    proc = subprocess.Popen(
        [*LAUNCH, *args, str(tmp_path / "out"), "--job-name", "tx-startup"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_default,
    )
    record = home / "endpoints" / "tx-startup" / "endpoint.json"
    deadline = time.monotonic() + 120
    while not record.is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pid = json.loads(record.read_text())["pid"]  # serve, starting: its model not loaded yet
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert not record.parent.exists()
    assert not group_alive(pid)  # serve and MMS stopped
    assert not list((tmp_path / "out").rglob("*.out"))
