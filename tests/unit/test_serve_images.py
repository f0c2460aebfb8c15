"""Image requests (issue 17, point 6): base64 rows and multipart uploads become the image
model's input frame, each image checked before it is batched with other requests'; anything
else is a 4xx naming the problem. The inference log keeps a hash and a size, not the bytes."""

from __future__ import annotations

import base64
import io as _io

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.serve import RequestError, image_frame, logged_images, multipart_rows, predict_body

LIMITS = (100_000, 1_000_000)  # bytes, pixels
ID = {"name": "path", "type": None}


def png(size: tuple[int, int] = (20, 20), mode: str = "RGB") -> bytes:
    out = _io.BytesIO()
    Image.new(mode, size, 90).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def form(parts: list[tuple[str, str, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{file}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for name, file, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_base64_rows_and_an_id_become_the_input_frame():
    frame = image_frame([{"image": b64(png()), "path": "a.png"}, {"image": b64(png((30, 10)))}], LIMITS, ID, 10)
    assert frame.columns.tolist() == ["path", "image"] and frame["image"].iloc[0] == png()
    assert frame["path"].tolist() == ["a.png", None]


def test_a_multipart_upload_is_one_row_per_file_with_its_bytes():
    body, kind = form([("image", "a.png", png()), ("image", "b.png", png((8, 8), "L"))])
    rows = predict_body(body, kind)
    assert [r["image"] for r in rows] == [png(), png((8, 8), "L")]
    assert image_frame(rows, LIMITS, None, 10)["image"].tolist() == [png(), png((8, 8), "L")]


@pytest.mark.parametrize("row, status, words", [
    ({"image": "%%%"}, 422, "not valid base64"),
    ({"image": b64(b"GIF89a nonsense")}, 422, "not an image"),
    ({"image": b64(png()[:60])}, 422, "not a decodable image"),
    ({"image": 7}, 422, "must be a base64 string"),
    ({"picture": b64(png())}, 422, "missing column image"),
    ({"image": b64(png()), "x": 1}, 422, "unknown column(s) x"),
    ({"image": "A" * 200_000}, 413, "over the model's limit"),
    ({"image": b64(png((2000, 1000)))}, 413, "pixels, over the model's limit"),
])
def test_a_bad_image_row_is_a_4xx_naming_it(row, status, words):
    with pytest.raises(RequestError) as e:
        image_frame([{"image": b64(png())}, row], LIMITS, None, 10)
    assert e.value.status == status and words in str(e.value) and str(e.value).startswith("row 1: ")


def test_too_many_rows_and_no_rows_are_refused():
    with pytest.raises(RequestError, match="limit is serve.max_rows=2"):
        image_frame([{"image": b64(png())}] * 3, LIMITS, None, 2)
    with pytest.raises(RequestError, match="no rows"):
        image_frame([], LIMITS, None, 2)


def test_the_log_keeps_a_hash_and_a_size_not_the_bytes():
    frame = image_frame([{"image": b64(png()), "path": "a.png"}], LIMITS, ID, 10)
    logged = logged_images(frame)
    assert "image" not in logged.columns and logged["image_bytes"].tolist() == [len(png())]
    assert logged["path"].tolist() == ["a.png"] and len(logged["image_sha256"].iloc[0]) == 64


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=600), st.builds(lambda parts: form(parts)[0], st.lists(
    st.tuples(st.text(max_size=10), st.text(max_size=10), st.binary(max_size=200)), max_size=3))),
       kind=st.sampled_from(["multipart/form-data; boundary=XyZ", "multipart/form-data", "application/json",
                             "multipart/form-data; boundary=", "text/plain"]))
def test_any_body_gives_rows_or_a_4xx_never_an_exception(body, kind):
    try:
        rows = predict_body(body, kind)
        image_frame(rows, LIMITS, ID, 10)
    except RequestError as e:
        assert 400 <= e.status < 500


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(st.text(max_size=300), st.binary(max_size=300), st.integers(), st.none(), st.floats(),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_any_image_value_is_scored_or_a_4xx(value):
    try:
        frame = image_frame([{"image": value}], LIMITS, None, 10)
        assert isinstance(frame["image"].iloc[0], bytes)
    except RequestError as e:
        assert e.status in (413, 422)
