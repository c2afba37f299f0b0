"""Local endpoint records as untrusted input, through the launcher: a pid is signalled only while
it names the `serve` that deploy started; a corrupt record, a record pointing elsewhere or a
folder placed as a link cost a warning, never a traceback or someone else's files."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from imgclf.processes import boot_id, process_start
from tests.conftest import run_launch


def write_record(home: Path, name: str, **fields) -> Path:
    folder = home / "endpoints" / name
    folder.mkdir(parents=True)
    doc = {"name": name, "port": 9, "pid": 999_999_999, "base": str(folder), "model": "m"}
    doc.update(fields)
    (folder / "endpoint.json").write_text(json.dumps(doc))
    return folder


def still_running(proc: subprocess.Popen) -> bool:
    time.sleep(0.3)  # a signal, had one been sent, has landed
    return proc.poll() is None


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"start": "1"}, "is another process now"),  # the pid was reused
        ({}, "has no start time"),  # a record written before records carried one
        ({"boot": "another-boot"}, "machine has restarted"),  # the pid, after a reboot
    ],
    ids=["wrong-start", "no-start", "other-boot"],
)
def test_delete_never_signals_a_pid_that_is_not_the_serve_deploy_started(
    tmp_path, sleeper, fields, said
):
    home = tmp_path / "home"
    doc = {"pid": sleeper.pid, **fields}
    if fields:  # the record's other half is right: only the named half is wrong
        doc.setdefault("start", process_start(sleeper.pid))
        doc.setdefault("boot", boot_id())
    folder = write_record(home, "ep", **doc)
    listed = run_launch("endpoints", home=home)
    proc = run_launch("delete", "ep", home=home)
    assert still_running(sleeper), "delete signalled a process it did not start"
    assert proc.returncode == 0, proc.stderr
    assert "not stopped" in proc.stdout and said in proc.stdout
    assert not folder.exists()
    assert listed.returncode == 0 and "stale" in listed.stdout and said in listed.stdout


def test_delete_stops_the_process_the_record_still_names(tmp_path, sleeper):
    home = tmp_path / "home"
    write_record(home, "ep", pid=sleeper.pid, start=process_start(sleeper.pid), boot=boot_id())
    proc = run_launch("delete", "ep", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "endpoint ep stopped" in proc.stdout
    assert sleeper.wait(timeout=10) is not None


def test_a_corrupt_record_is_skipped_with_a_warning_naming_it(tmp_path):
    home = tmp_path / "home"
    bad = write_record(home, "bad")
    (bad / "endpoint.json").write_text('{"name": "bad", "po')  # truncated
    write_record(home, "good")
    listed = run_launch("endpoints", home=home)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert f"warning: skipping endpoint bad: {bad / 'endpoint.json'} cannot be read" in (
        listed.stderr
    )
    assert "good" in listed.stdout and "bad" not in listed.stdout
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"\xff\xd8")
    invoked = run_launch("invoke", "--endpoint", "bad", str(image), home=home)
    assert invoked.returncode == 2 and "Traceback" not in invoked.stderr
    assert "no local endpoint named bad" in invoked.stderr
    deleted = run_launch("delete", "bad", home=home)
    assert deleted.returncode == 0 and "Traceback" not in deleted.stderr, deleted.stderr
    assert "could not be read, so nothing was signalled" in deleted.stdout
    assert not bad.exists() and (home / "endpoints" / "good").exists()


def test_a_record_cannot_point_delete_at_another_folder(tmp_path):
    home = tmp_path / "home"
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    write_record(home, "ep", base=str(project))
    proc = run_launch("delete", "ep", home=home)
    assert proc.returncode == 0, proc.stderr
    assert (project / "src").is_dir()
    assert not (home / "endpoints" / "ep").exists()


def test_an_endpoint_folder_placed_as_a_link_is_neither_followed_nor_deleted(tmp_path):
    home = tmp_path / "home"
    project = tmp_path / "project"
    project.mkdir()
    (project / "endpoint.json").write_text(
        json.dumps({"name": "ep", "port": 9, "pid": 999_999_999, "base": str(project), "model": ""})
    )
    (home / "endpoints").mkdir(parents=True)
    (home / "endpoints" / "ep").symlink_to(project, target_is_directory=True)
    listed = run_launch("endpoints", home=home)
    proc = run_launch("delete", "ep", home=home)
    assert (project / "endpoint.json").exists()
    assert proc.returncode == 2 and "symbolic link" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert listed.returncode == 0 and "symbolic link" in listed.stderr


@pytest.mark.parametrize(
    ("state", "said"),
    [
        ({"state": "ready", "pid": 1}, "started by an imgclf that cannot swap models"),
        ({"state": "starting", "swap_signal": "SIGHUP"}, "its serve is starting"),
    ],
    ids=["older-serve", "not-ready"],
)
def test_a_swap_is_never_signalled_to_a_serve_that_did_not_offer_one(
    tmp_path, sleeper, state, said
):
    """SIGHUP's default action ends a process: `deploy` to a running endpoint signals only a
    serve that wrote, when ready, that it takes a new model on SIGHUP."""
    home = tmp_path / "home"
    start, boot = process_start(sleeper.pid), boot_id()
    folder = write_record(home, "ep", pid=sleeper.pid, start=start, boot=boot)
    (folder / "state.json").write_text(json.dumps(state))
    proc = run_launch("deploy", "--model", str(tmp_path), "--name", "ep", home=home)
    assert still_running(sleeper), "deploy signalled a serve that cannot swap"
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "delete ep" in proc.stderr
    assert json.loads((folder / "endpoint.json").read_text()).get("next_model") is None


@pytest.mark.parametrize(
    ("swap", "shown"),
    [
        ({"id": 2, "state": "loading"}, "old -> new (swapping)"),
        ({"id": 2, "state": "done"}, "new"),  # finished after the deploy stopped waiting
        ({"id": 2, "state": "failed", "reason": "x"}, "old"),
        (None, "old"),
    ],
)
def test_endpoints_shows_both_models_while_a_swap_is_under_way(tmp_path, swap, shown):
    from imgclf.targets import endpoints

    home = tmp_path / "home"
    folder = write_record(home, "ep", model="old", next_model="new")
    (folder / "state.json").write_text(json.dumps({"state": "ready", "swap": swap}))
    assert endpoints.models_served(endpoints.read_endpoint(home, "ep")) == shown
    write_record(home, "other", model="old")
    assert endpoints.models_served(endpoints.read_endpoint(home, "other")) == "old"
