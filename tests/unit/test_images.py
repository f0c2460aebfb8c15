"""Image files as a dataset (issue 17, points 1, 2 and 8): listing, per-file checks, the
image table, and the generated demo folder."""

from __future__ import annotations

import io as _io
import os
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data import images
from pipeline.data.demo import IMAGE_FLAWS, write_image_folder
from pipeline.errors import DataError

CHECKS = images.ImageChecks()


def png(size: tuple[int, int] = (32, 32), mode: str = "RGB", color: int | tuple[int, ...] = 128,
        fmt: str = "PNG") -> bytes:
    out = _io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("images") / "digits"
    return folder, write_image_folder(folder, rows=120, seed=3, flaws=2)


def inspected(folder: Path) -> pd.DataFrame:
    rows, refused = images.list_folder(folder)
    assert refused.empty
    return pd.concat(list(images.inspect_files(rows, folder, CHECKS, batch=50)), ignore_index=True)


def test_every_flaw_of_the_demo_folder_is_found_with_its_reason(demo):
    folder, flawed = demo
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    found = inspected(folder)
    found[images.REASON] = found[images.REASON].fillna(images.duplicate_reasons(found))
    reason = dict(zip(found[images.PATH], found[images.REASON]))
    expected = {"truncated": "truncated or corrupt", "not_an_image": "not an image", "too_small": "too small",
                "extreme_aspect": "extreme aspect ratio", "cmyk": "mode CMYK", "exact_duplicate": "an exact duplicate of",
                "two_labels": "the same image under labels"}
    assert set(flawed) == set(IMAGE_FLAWS) and all(len(paths) == 2 for paths in flawed.values())
    for kind, paths in flawed.items():
        for path in paths:
            assert expected[kind] in str(reason[path]), (kind, path, reason[path])
    # the originals the duplicates were copied from: the same-label one is kept, the other label's is not
    flaw_paths = {p for paths in flawed.values() for p in paths}
    dropped = found[found[images.REASON].notna() & ~found[images.PATH].isin(flaw_paths)]
    assert len(dropped) == 2 and dropped[images.REASON].str.startswith("the same image under labels").all()
    kept = found[found[images.REASON].isna()]
    assert len(kept) == 120 - 2 and set(kept["mode"]) == {"L", "RGB"} and set(kept["format"]) == {"PNG", "JPEG"}
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # only ever read


def test_the_image_table_and_training_size_describe_the_kept_images(demo):
    found = inspected(demo[0])
    kept = found[found[images.REASON].isna()]
    table = images.image_table(kept)
    assert table["images"] == len(kept) and sum(table["classes"].values()) == len(kept)
    assert set(table["sizes"]) <= {"24×24", "32×32", "40×40"} and table["width"]["min"] >= 24
    assert 0 < table["brightness"]["mean"] < 1 and 0 < table["contrast"]["mean"] < 0.5 and table["sharpness"]["min"] > 0
    assert images.training_size(kept["width"], kept["height"]) == 32
    assert images.training_size(pd.Series([1000, 4000]), pd.Series([800, 3000])) == 224


def test_a_file_outside_a_class_folder_or_linking_out_is_refused_by_name(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(png())
    (root / "stray.png").write_bytes(png())
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(png())  # hidden: not the user's data
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    os.symlink(secret, root / "cat" / "link.png")
    rows, refused = images.list_folder(root)
    assert rows[images.PATH].tolist() == ["cat/a.png"] and rows[images.LABEL].tolist() == ["cat"]
    assert dict(zip(refused[images.PATH], refused[images.REASON])) == {
        "cat/link.png": "a symbolic link that leads out of the image folder",
        "stray.png": "not in a class folder: put it in DIR/<label>/"}
    (root / "cat" / "a.png").unlink()
    (root / "cat" / "link.png").unlink()
    with pytest.raises(DataError, match="holds no files in class folders"):
        images.list_folder(root)


def test_a_manifest_keeps_its_extra_columns_and_refuses_paths_out_of_its_folder(tmp_path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"file": ["a.png", "../b.png", "/etc/passwd", "", "sub/c.png"], "y": [1, 2, 1, 2, 1],
                  "site": ["x", "y", "x", "y", "z"]}).to_csv(manifest, index=False)
    rows, refused = images.read_manifest(manifest, "file", "y")
    assert rows[images.PATH].tolist() == ["a.png", "sub/c.png"] and rows["site"].tolist() == ["x", "z"]
    assert sorted(refused[images.REASON]) == ["a path outside the manifest's folder"] * 2 + ["no path"]
    with pytest.raises(DataError, match="no column 'path'"):
        images.read_manifest(manifest, "path", "y")


@pytest.mark.parametrize("data, reason", [
    (b"", "an empty file"),
    (b"GIF89a" + b"\0" * 40, "not an image"),
    (png((32, 32), "P", fmt="GIF"), "a GIF file"),
    (png((24, 24))[:60], "truncated or corrupt"),
    (png((3, 30)), "too small: 3×30"),
    (png((400, 20)), "extreme aspect ratio: 400×20"),
    (png((32, 32), "I;16", 0), "mode I;16"),
])
def test_each_unusable_file_gets_its_reason(data, reason):
    facts, why = images.inspect(data, CHECKS)
    assert why is not None and why.startswith(reason), why
    assert facts["bytes"] == len(data) and len(facts["sha256"]) == 64


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    bomb = png((5000, 4000), "L", 0)  # 20M pixels in a few kB of PNG
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    facts, why = images.inspect(bomb, images.ImageChecks(max_pixels=10_000_000))
    assert why == "5000×4000 is 20,000,000 pixels, over the limit of 10,000,000" and not decoded
    assert len(bomb) < 100_000 and facts["width"] == 5000


def test_a_usable_image_has_its_facts():
    facts, why = images.inspect(png((48, 32), "RGBA", (255, 255, 255, 0)), CHECKS)
    assert why is None and facts["mode"] == "RGBA" and (facts["width"], facts["height"]) == (48, 32)
    assert facts["brightness"] == pytest.approx(1.0) and facts["contrast"] == 0 and len(facts["phash"]) == 16
    assert facts["sharpness"] == 0


def test_blur_lowers_the_sharpness_measure(demo):
    from PIL import ImageFilter

    source = Image.open(sorted((demo[0] / "4").glob("0*.png"))[0]).convert("RGB").resize((64, 64))
    sharpness = []
    for radius in (0, 1, 2):
        out = _io.BytesIO()
        source.filter(ImageFilter.GaussianBlur(radius)).save(out, format="PNG")
        sharpness.append(images.inspect(out.getvalue(), CHECKS)[0]["sharpness"])
    assert sharpness[0] > sharpness[1] > sharpness[2] > 0


def test_near_duplicates_are_found_across_sets_and_distinct_images_are_not(demo):
    folder, _ = demo
    sources = sorted((folder / "3").glob("0*.png"))[:4] + sorted((folder / "7").glob("0*.png"))[:4]
    hashes = [images.inspect(p.read_bytes(), CHECKS)[0]["phash"] for p in sources]
    copies = []
    for p in sources[:3]:  # the same digits resized and re-encoded as JPEG
        out = _io.BytesIO()
        Image.open(p).convert("RGB").resize((57, 57)).save(out, format="JPEG", quality=80)
        copies.append(images.inspect(out.getvalue(), CHECKS)[0]["phash"])
    pairs = images.near_duplicates(copies, hashes, max_distance=6)
    assert {(i, j) for i, j, _ in pairs} == {(0, 0), (1, 1), (2, 2)}
    assert images.near_duplicates([], hashes) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=2000),
                      st.builds(lambda cut, flip, b: _mutate(png((24, 24)), cut, flip, b),
                                st.integers(0, 400), st.integers(0, 400), st.integers(0, 255))))
def test_any_bytes_get_facts_or_a_reason_never_an_exception(data):
    """Hostile files (issue 17, point 2): random bytes, and valid PNGs cut short or with a byte
    changed. inspect answers with facts and a reason; it never raises."""
    facts, why = images.inspect(data, CHECKS)
    assert facts["bytes"] == len(data)
    assert why is None or (isinstance(why, str) and why and "\n" not in why)
    if why is None:
        assert facts["format"] in images.FORMATS and min(facts["width"], facts["height"]) >= CHECKS.min_side


def _mutate(data: bytes, cut: int, at: int, value: int) -> bytes:
    data = bytearray(data[: max(0, len(data) - cut)])
    if data:
        data[at % len(data)] = value
    return bytes(data)


@settings(max_examples=40, deadline=None)
@given(left=st.lists(st.integers(0, 2**64 - 1), max_size=40), right=st.lists(st.integers(0, 2**64 - 1), max_size=40),
       flips=st.lists(st.integers(0, 63), max_size=6), distance=st.integers(0, 20))
def test_multi_index_hashing_finds_exactly_the_pairs_a_comparison_of_every_pair_finds(left, right, flips, distance):
    if left:  # a planted near duplicate of the first left hash, some bits flipped
        planted = left[0]
        for bit in flips:
            planted ^= 1 << bit
        right = [*right, planted]
    expected = [(i, j, bin(x ^ y).count("1")) for i, x in enumerate(left) for j, y in enumerate(right)
                if bin(x ^ y).count("1") <= distance]
    found = images.near_duplicates([f"{x:016x}" for x in left], [f"{y:016x}" for y in right], distance)
    assert found == expected


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(5)))
def test_of_exact_duplicates_the_path_that_sorts_first_is_kept_whatever_the_order(order):
    """The stages list a folder in random order (image_data.listing): which copy stays must not depend on it."""
    rows = pd.DataFrame({images.PATH: ["b/2.png", "a/1.png", "c/3.png", "a/0.png", "d/4.png"],
                         images.LABEL: ["x", "x", "x", "y", "x"], "sha256": ["h", "h", "h", "k", "m"],
                         images.REASON: pd.Series([None] * 5, dtype="string")}).iloc[list(order)]
    reasons = images.duplicate_reasons(rows).dropna()
    assert sorted(rows.loc[reasons.index, images.PATH]) == ["b/2.png", "c/3.png"]
    assert set(reasons) == {"an exact duplicate of a/1.png"}
