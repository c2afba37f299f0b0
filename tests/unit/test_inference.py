import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.data.loaders import ImageListDataset
from imgclf.data.transforms import eval_transform
from imgclf.serving import inference, runtime
from tests.conftest import jpeg_bytes, png_bytes, random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real artifact of a random ResNet-18 over 4 classes (weights need not be trained)."""
    return random_model(tmp_path_factory.mktemp("model"), ["1.a", "2.b", "3.c", "4.d"])


@pytest.fixture(scope="module")
def loaded(model_dir):
    return inference.model_fn(model_dir, device=torch.device("cpu"))


def test_serving_preprocessing_is_trainings_eval_preprocessing(tmp_path, loaded):
    payload = jpeg_bytes(3, size=(300, 200))
    (tmp_path / "x.jpg").write_bytes(payload)
    pre = loaded.preprocess
    train_side = ImageListDataset(
        [(str(tmp_path / "x.jpg"), 0)], eval_transform(pre), draft=pre.resize_size
    )[0][0]
    serve_side = inference.prepare(
        inference.input_fn(payload, "image/jpeg", draft=pre.resize_size), loaded
    )[0]
    # The handler builds the uint8 crop; the model normalises it (folded into the network).
    assert serve_side.dtype == np.uint8
    serve_side = torch.from_numpy(serve_side)
    unnormalised = ImageListDataset(
        [(str(tmp_path / "x.jpg"), 0)],
        eval_transform(pre, normalize=False),
        draft=pre.resize_size,
    )[0][0]
    assert torch.equal(unnormalised, serve_side)
    folded = runtime.Normalized(torch.nn.Identity(), pre.mean, pre.std)
    assert torch.allclose(folded(serve_side[None])[0], train_side, atol=1e-5)


def test_predict_returns_probabilities_per_image(loaded):
    images = inference.input_fn(png_bytes(), "image/png") + inference.input_fn(
        jpeg_bytes(), "image/jpeg"
    )
    probs = inference.predict_fn(images, loaded)
    assert probs.shape == (2, 4)
    assert np.allclose(probs.sum(axis=1), np.ones(2), atol=1e-5)


def test_json_batch_and_output_shapes(loaded):
    body = json.dumps(
        {
            "instances": [
                base64.b64encode(png_bytes()).decode(),
                base64.b64encode(jpeg_bytes()).decode(),
            ]
        }
    ).encode()
    images = inference.input_fn(body, "application/json; charset=utf-8")
    probs = inference.predict_fn(images, loaded)
    out, ctype = inference.output_fn(
        probs,
        loaded.labels,
        accept="application/json",
        options=inference.Options(topk=2, probabilities=True),
        batch=True,
    )
    doc = json.loads(out)
    assert ctype == "application/json" and len(doc) == 2
    assert len(doc[0]["predictions"]) == 2 and len(doc[0]["probabilities"]) == 4
    top = doc[1]["predictions"][0]
    assert top["index"] == int(probs[1].argmax()) and top["label"] == loaded.labels[top["index"]]


@pytest.mark.parametrize(
    "body,ctype,status",
    [
        (b"", "image/jpeg", 400),
        (b"\x00\x01random bytes", "image/png", 400),
        (jpeg_bytes(1)[:300], "image/jpeg", 400),
        (b"x" * (6 * 1024 * 1024 + 1), "image/jpeg", 413),
        (b"col\n1", "text/csv", 415),
        (b"\x93NUMPY", "application/x-npy", 415),
        (b"{not json", "application/json", 400),
        (b'{"instances": [12]}', "application/json", 400),
        (b'{"instances": ["***"]}', "application/json", 400),
    ],
)
def test_bad_input_is_a_client_error_with_a_hint(body, ctype, status):
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(body, ctype)
    assert err.value.status == status
    doc = json.loads(err.value.body())
    assert doc["error"] and doc["hint"] and "Traceback" not in doc["error"]


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")  # 64 Mpx in a few kB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(buf.getvalue(), "image/png")
    assert err.value.status == 413


def test_accept_and_custom_attributes():
    inference.check_accept(None)
    inference.check_accept("application/json, text/plain")
    inference.check_accept("*/*")
    with pytest.raises(inference.RequestError) as err:
        inference.check_accept("text/csv")
    assert err.value.status == 406
    assert inference.parse_options("topk=2, probabilities=true", 4) == inference.Options(2, True)
    assert inference.parse_options(None, 3).topk == 3
    with pytest.raises(inference.RequestError):
        inference.parse_options("topk=zero", 4)


@pytest.mark.parametrize(
    ("value", "full"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("all", True),  # this header's own word for every class
        (" All ", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("", False),
        ("maybe", False),  # unknown: false, not a 400
    ],
)
def test_probabilities_attribute_values(value, full):
    assert inference.parse_options(f"probabilities={value}", 4).probabilities is full


def test_broken_artifacts_fail_with_the_file_named(tmp_path, model_dir):
    import shutil

    from imgclf.errors import UserError

    broken = tmp_path / "m"
    shutil.copytree(model_dir, broken)
    (broken / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="model.pt"):
        inference.model_fn(broken)
    (broken / "labels.json").unlink()
    with pytest.raises(UserError, match="labels.json"):
        inference.model_fn(broken)


def _strip(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_limits_count_what_preprocessing_will_make():
    # ~100 bytes that a resize to 36 px would make 85 Mpx (4.3 Gpx at 256 px): refused unread.
    thin = _strip(65535, 1)
    assert len(thin) < 300
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(thin, "image/png", draft=36)
    assert err.value.status == 413 and "aspect ratio" in err.value.error
    # A 16:1 strip is fine alone...
    ok = _strip(16 * 36, 36)
    assert len(inference.input_fn(ok, "image/png", draft=36)) == 1
    # ...but 64 of them in one JSON request are over the request's resize budget.
    batch = json.dumps({"instances": [base64.b64encode(ok).decode()] * 64}).encode()
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(batch, "application/json", draft=36)
    assert err.value.status == 413 and "together" in err.value.error
    # Decoded pixels are summed over the batch: 5 images of 10 Mpx are over 40 Mpx.
    big = _strip(4000, 2500)
    batch = json.dumps({"instances": [base64.b64encode(big).decode()] * 5}).encode()
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(batch, "application/json", draft=256)
    assert err.value.status == 413 and str(inference.MAX_PIXELS) in err.value.error
    # 16-bit pixels cost three times as much to decode and scale: 16 Mpx of them are too many.
    deep = io.BytesIO()
    Image.new("I;16", (4000, 4000), 300).save(deep, format="PNG")
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(deep.getvalue(), "image/png", draft=256)
    assert err.value.status == 413 and "counts 3x" in err.value.error
    # A JPEG counts at its draft scale: 4000x3000 decodes at 1/8 scale for a 256 px resize.
    photo = jpeg_bytes(size=(4000, 3000))
    size = inference.probe_image(photo, draft=256)
    assert (size.width, size.height) == (500, 375)


def test_resized_pixels_matches_torchvision_resize():
    from torchvision import transforms

    for w, h in [(300, 200), (37, 1000), (64, 64), (1001, 3)]:
        out = transforms.Resize(36, antialias=True)(Image.new("RGB", (w, h)))
        assert inference.resized_pixels(w, h, 36) == out.width * out.height


def test_client_text_never_reaches_the_reason_phrase():
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(png_bytes(), "image/\u00e9" + "x" * 200)
    assert err.value.status == 415 and err.value.reason == "Unsupported Media Type"
    assert err.value.body().decode("ascii")  # JSON escapes what the client sent
    assert len(err.value.error) < 200


def test_deep_json_and_odd_digits_are_client_errors():
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(deep, "application/json")
    assert err.value.status == 400
    for value in ("\u00b2", "\u0663", "1" * 40, "-1", "0", ""):
        with pytest.raises(inference.RequestError) as err:
            inference.parse_options(f"topk={value}", 4)
        assert err.value.status == 400


def test_response_format_per_request_or_by_default(loaded):
    probs = inference.predict_fn(inference.input_fn(png_bytes(), "image/png"), loaded)
    attrs = inference.parse_options("format=vectors", 4)
    body, _ = inference.output_fn(probs, loaded.labels, accept=None, options=attrs, batch=False)
    vectors = np.asarray(json.loads(body))
    assert vectors.shape == (1, 4)
    assert np.argmax(vectors, 1).tolist() == [int(probs[0].argmax())]
    # Accept's parameter, then the deploy's default, when the attributes say nothing.
    fmt = inference.check_accept("application/json; format=vectors")
    assert inference.parse_options(None, 4, accept_format=fmt).format == "vectors"
    assert inference.parse_options(None, 4, default_format="vectors").format == "vectors"
    chosen = inference.parse_options("format=predictions", 4, default_format="vectors")
    assert chosen.format == "predictions"
    with pytest.raises(inference.RequestError) as err:
        inference.parse_options("format=csv", 4)
    assert err.value.status == 400 and "vectors" in err.value.hint


def test_json_lines_answers_one_line_per_image(loaded):
    images = inference.input_fn(png_bytes(), "image/png") * 3
    probs = inference.predict_fn(images, loaded)
    for fmt in ("predictions", "vectors"):
        options = inference.parse_options(f"format={fmt}", 4)
        body, media = inference.output_fn(
            probs, loaded.labels, accept="application/jsonlines", options=options, batch=True
        )
        lines = body.decode().splitlines()
        assert media == "application/jsonlines" and len(lines) == 3 and body.endswith(b"\n")
        docs = [json.loads(line) for line in lines]
        if fmt == "vectors":
            assert [int(np.argmax(row)) for row in docs] == probs.argmax(1).tolist()
        else:
            assert [d["predictions"][0]["index"] for d in docs] == probs.argmax(1).tolist()


# ---------------------------------------------------------------- min_confidence, temperature

# Two images over the labels a, b, c, d: the first sure of a (0.7), the second torn (0.4).
PROBS = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
LABELS = ["a", "b", "c", "d"]


def _answer(attributes, *, accept=None, batch=True, thresholds=None, **defaults):
    options = inference.parse_options(attributes, 4, thresholds=thresholds, **defaults)
    body, _ = inference.output_fn(
        PROBS, LABELS, accept=accept, options=options, batch=batch, thresholds=thresholds
    )
    if accept == "application/jsonlines":
        return [json.loads(line) for line in body.decode().splitlines()]
    return json.loads(body)


def test_min_confidence_says_no_confident_label_in_every_format():
    docs = _answer("min_confidence=0.5")
    assert [(d["label"], d["confident"], d["threshold"]) for d in docs] == [
        ("a", True, 0.5),
        (None, False, 0.5),
    ]
    # the top-k is still listed for the image without a confident label
    assert [p["label"] for p in docs[1]["predictions"]] == ["a", "b", "c", "d"]
    # vectors: one more entry, index N (one past the last label), which an argmax then picks
    rows = np.asarray(_answer("min_confidence=0.5,format=vectors"))
    assert rows.shape == (2, 5) and np.argmax(rows, 1).tolist() == [0, 4]
    assert np.allclose(rows[:, :4], PROBS.numpy())
    lines = _answer("min_confidence=0.5", accept="application/jsonlines")
    assert [line["confident"] for line in lines] == [True, False]
    lines = _answer("min_confidence=0.5,format=vectors", accept="application/jsonlines")
    assert [int(np.argmax(row)) for row in lines] == [0, 4]
    one = _answer("min_confidence=0.75", batch=False)  # an image body: one object
    assert one["label"] is None and one["predictions"][0]["label"] == "a"


def test_without_min_confidence_the_answers_are_unchanged():
    docs = _answer(None)
    assert all(set(d) == {"predictions"} for d in docs)
    assert np.asarray(_answer("format=vectors")).shape == (2, 4)
    assert np.asarray(_answer("format=vectors,min_confidence=0")).shape == (2, 4)


def test_min_confidence_auto_uses_each_classs_threshold_and_deploy_default():
    thresholds = (0.8, 0.2, 0.2, 0.2)  # class a must reach 0.8
    docs = _answer("min_confidence=auto", thresholds=thresholds)
    assert [d["confident"] for d in docs] == [False, False]
    assert docs[0]["threshold"] == 0.8
    # the deploy's default applies when the request says nothing, and the request's wins
    docs = _answer(None, thresholds=thresholds, default_min_confidence=0.35)
    assert [d["confident"] for d in docs] == [True, True]
    assert "confident" not in _answer("min_confidence=off", default_min_confidence=0.9)[0]
    with pytest.raises(inference.RequestError) as err:
        inference.parse_options("min_confidence=auto", 4)  # a model without thresholds
    assert err.value.status == 400 and "min_confidence=P" in err.value.hint
    for bad in ("1.5", "-0.1", "high", "0.5.5"):
        with pytest.raises(inference.RequestError) as err:
            inference.parse_options(f"min_confidence={bad}", 4)
        assert err.value.status == 400 and "0 to 1" in err.value.hint


def test_the_endpoint_divides_the_logits_by_the_models_temperature(tmp_path, model_dir, loaded):
    hot = tmp_path / "hot"
    shutil.copytree(model_dir, hot)
    config = json.loads((hot / "model_config.json").read_text())
    (hot / "model_config.json").write_text(json.dumps({**config, "temperature": 2.5}))
    warm = inference.model_fn(hot, device=torch.device("cpu"), cpu_runtime="torch")
    images = inference.input_fn(jpeg_bytes(5), "image/jpeg")
    crops = inference.prepare(images, warm)
    logits = torch.from_numpy(warm.forward(crops))
    assert np.allclose(
        inference.predict_batch(crops, warm), torch.softmax(logits / 2.5, dim=1), atol=1e-6
    )
    assert np.allclose(
        inference.predict_batch(crops, loaded), torch.softmax(logits, dim=1), atol=1e-4
    )
