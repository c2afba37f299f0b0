"""The request protocol (serving.protocol): content types, sniffing, the error body, Accept."""

import json

import pytest

from imgclf.serving import protocol
from tests.conftest import jpeg_bytes, png_bytes


def test_error_bodies_carry_what_botocore_reads():
    doc = json.loads(protocol.error_body("the image is truncated", "send all of it"))
    assert doc["error"] == "the image is truncated" and doc["hint"] == "send all of it"
    assert doc["message"] == "the image is truncated (send all of it)"
    assert protocol.is_error_body(doc) and not protocol.is_error_body({"message": "x"})
    err = protocol.RequestError(415, "no", "yes")
    assert json.loads(err.body()) == json.loads(protocol.error_body("no", "yes"))


@pytest.mark.parametrize(
    "content_type,body,served",
    [
        ("image/jpeg", b"anything", "image/jpeg"),
        ("Image/JPG; q=1", b"anything", "image/jpeg"),
        ("binary/octet-stream", b"anything", "application/octet-stream"),
        (None, b"anything", "application/octet-stream"),
        ("application/json", b"{}", "application/json"),
        ("application/x-www-form-urlencoded", "jpeg", "image/jpeg"),
        ("application/x-www-form-urlencoded", "png", "image/png"),
        ("application/x-www-form-urlencoded", b"GIF89a...", "image/gif"),
        ("application/x-www-form-urlencoded", b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
        ("application/x-www-form-urlencoded", b"II*\x00rest", "image/tiff"),
    ],
)
def test_request_types_served(content_type, body, served):
    body = {"jpeg": jpeg_bytes(), "png": png_bytes()}.get(body, body)
    assert protocol.request_type(content_type, body) == served


@pytest.mark.parametrize(
    "content_type,body,hint",
    [
        ("application/x-www-form-urlencoded", b"name=dog&x=1", "-H 'Content-Type: image/jpeg'"),
        ("text/plain", b"\xff\xd8\xffjpeg", "image/jpeg"),
        ("application/x-npy", b"\x93NUMPY", "no pickles"),
        ("multipart/form-data; boundary=x", b"--x", "image/jpeg"),
    ],
)
def test_other_types_are_a_415_with_the_fix(content_type, body, hint):
    with pytest.raises(protocol.RequestError) as err:
        protocol.request_type(content_type, body)
    assert err.value.status == 415 and hint in err.value.hint


def test_accept_and_reason_phrases():
    assert protocol.check_accept(None) is None
    assert protocol.check_accept("application/json; format=vectors") == "vectors"
    with pytest.raises(protocol.RequestError) as err:
        protocol.check_accept("text/csv")
    assert err.value.status == 406
    for status in (400, 406, 413, 415, 500, 503, 599):
        protocol.reason_phrase(status).encode("ascii")


def test_json_lines_are_answered_when_asked_first():
    assert protocol.answer_type(None) == "application/json"
    assert protocol.answer_type("*/*") == "application/json"
    assert protocol.answer_type("application/jsonlines") == "application/jsonlines"
    assert protocol.answer_type("application/json, application/jsonlines") == "application/json"
    assert protocol.answer_type("text/csv, application/jsonlines;q=1") == "application/jsonlines"
    assert protocol.check_accept("application/jsonlines; format=vectors") == "vectors"
