"""`deploy` to a running local endpoint swaps its model inside the running `serve`: clients
sending all along get no failed request and see the answers move from the old model's labels to
the new one's; a new model that cannot load leaves the old one serving, and `deploy` says why."""

import http.client
import json
import threading
import time

import pytest

from imgclf.targets import endpoints
from tests.conftest import random_model, run_launch
from tests.integration.serving_client import deploy, post
from tests.integration.test_serving_faults import png

OLD = ["001.cat", "002.dog"]
NEW = ["001.apple", "002.pear", "003.plum"]
OLD_LABELS, NEW_LABELS = {c.split(".", 1)[1] for c in OLD}, {c.split(".", 1)[1] for c in NEW}
CLIENTS = 4


@pytest.fixture(scope="module")
def endpoint(home, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    ep = deploy(home, random_model(models / "old", OLD), "swap")
    ep["models"] = models
    yield ep
    stop = run_launch("delete", "swap", home=home)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def top_label(url: str) -> str:
    status, raw = post(url, png(), "image/png")
    assert status == 200, raw
    return json.loads(raw)["predictions"][0]["label"]


class Clients:
    """`CLIENTS` keep-alive clients, each sending its next request when the last is answered:
    every answer's (status, top label, or the error)."""

    def __init__(self, port: int) -> None:
        self.port, self.stop = port, threading.Event()
        self.answers: list[list[tuple[int, str]]] = [[] for _ in range(CLIENTS)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = png(color=(40 * i, 90, 200))
        while not self.stop.is_set():
            try:
                conn.request("POST", "/invocations", body, {"Content-Type": "image/png"})
                response = conn.getresponse()
                raw = response.read()
            except OSError as exc:  # a refused or reset connection is a failed request too
                self.answers[i].append((0, repr(exc)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            label = json.loads(raw)["predictions"][0]["label"] if response.status == 200 else ""
            self.answers[i].append((response.status, label or raw.decode(errors="replace")))
        conn.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(90)


def test_a_new_model_is_swapped_in_with_no_failed_request(endpoint, home):
    models, url = endpoint["models"], endpoint["url"]
    assert top_label(url) in OLD_LABELS
    new = random_model(models / "new", NEW)
    shown: set[str] = set()
    with Clients(endpoint["port"]) as clients:
        time.sleep(1.0)  # the old model answers the clients for a while first
        swapping = threading.Thread(
            target=lambda: shown.add(
                run_launch("deploy", "--model", str(new), "--name", "swap", home=home).stdout
            )
        )
        swapping.start()
        listed = set()
        while swapping.is_alive():  # `endpoints` during the swap names both models
            record = endpoints.load_endpoint(home, "swap")
            if record is not None:
                listed.add(endpoints.models_served(record))
            time.sleep(0.1)
        time.sleep(1.5)  # and the new one answers them for a while after
    out = shown.pop()
    assert "swapping the model of endpoint swap" in out, out
    failed = [a for answers in clients.answers for a in answers if a[0] != 200]
    assert not failed, failed[:5]
    for answers in clients.answers:
        labels = [label for _, label in answers]
        assert labels and labels[0] in OLD_LABELS and labels[-1] in NEW_LABELS, labels
        first_new = next(i for i, x in enumerate(labels) if x in NEW_LABELS)
        # Once a client was answered by the new model, every later request of its went there.
        assert set(labels[first_new:]) <= NEW_LABELS, labels
    assert f"{models / 'old'} -> {new} (swapping)" in listed, listed
    record = endpoints.read_endpoint(home, "swap")
    assert record.model == str(new) and record.next_model is None
    assert endpoints.models_served(record) == str(new)
    assert not (home / "endpoints" / "swap" / endpoints.NEXT_MODEL).exists()
    assert top_label(url) in NEW_LABELS
    # The old model's worker is gone: one worker (deploy's --workers 1) of one model is left.
    log = (home / "endpoints" / "swap" / "serve.log").read_text()
    assert "model swap 1: done, the old model drained" in log, log[-3000:]


@pytest.mark.parametrize("damage", ["corrupt weights", "architecture mismatch"])
def test_a_new_model_that_cannot_load_leaves_the_old_one_serving(endpoint, home, damage):
    models, url = endpoint["models"], endpoint["url"]
    serving = endpoints.read_endpoint(home, "swap").model
    before = top_label(url)
    bad = random_model(models / damage.replace(" ", "-"), ["001.x", "002.y", "003.z", "004.w"])
    if damage == "corrupt weights":
        (bad / "model.pt").write_bytes(b"not a zip of tensors" * 100)
    else:  # four labels, and weights of a two-class model
        (bad / "model.pt").write_bytes((models / "old" / "model.pt").read_bytes())
    proc = run_launch("deploy", "--model", str(bad), "--name", "swap", home=home)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # a UserError
    error = proc.stderr.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith(f"error: endpoint swap still serves {serving}; the new model "), error
    assert str(bad) in error
    why = "model.pt cannot be loaded" if damage == "corrupt weights" else "does not fit resnet18"
    assert why in error, error  # the worker's own reason, from its mark
    assert top_label(url) == before
    record = endpoints.read_endpoint(home, "swap")
    assert record.model == serving and endpoints.models_served(record) == serving
    assert not (home / "endpoints" / "swap" / endpoints.NEXT_MODEL).exists()
    assert endpoints.endpoint_state(record) == "healthy"
