"""Image normalisation and the streaming source readers, on real files made in tmp_path."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval.images import ImageError, encode_png, load_image
from retrieval.sources import (
    REMOTE_URL,
    SOURCES,
    SkipReport,
    SourceItem,
    guess_source_kind,
    make_item,
    open_source,
    read_csv,
    read_folder,
    read_jsonl,
    read_parquet,
    read_webdataset,
    register_source,
)

SIZE = 16
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# --- fixtures: real encoded files --------------------------------------------------------------


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def left_right_image() -> Image.Image:
    """Left half red, right half blue: rotations are visible in where the colours go."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(Image.new("RGB", (20, 20), RED), (0, 0))
    return image


def noise(size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def truncated(data: bytes) -> bytes:
    """The first half of a file: the header parses, the pixel data ends early."""
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def assert_rgb(array: np.ndarray, size: int = SIZE) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (size, size, 3)


def mean_color(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, 3).mean(axis=0)


# --- load_image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (encoded(solid(RED), "PNG"), RED),
        (encoded(solid(RED), "JPEG", quality=95), RED),
        (encoded(solid(RED).quantize(4), "PNG"), RED),  # palette (P)
        (encoded(solid(BLUE, mode="L"), "PNG"), (29, 29, 29)),  # grayscale L of blue
        (encoded(solid(RED, mode="CMYK"), "JPEG", quality=95), RED),
        (encoded(Image.new("RGBA", (30, 30), (0, 0, 255, 0)), "PNG"), WHITE),  # transparent
        (encoded(Image.new("RGBA", (30, 30), (0, 0, 255, 255)), "PNG"), BLUE),  # opaque
        (encoded(Image.new("LA", (30, 30), (0, 0)), "PNG"), WHITE),
        (encoded(Image.new("1", (30, 30), 1), "PNG"), WHITE),
    ],
    ids=["png", "jpeg", "palette", "gray", "cmyk-jpeg", "rgba-clear", "rgba-opaque", "la", "1bit"],
)
def test_load_image_normalises_every_mode_to_rgb(data, expected):
    out = load_image(data, SIZE)
    assert_rgb(out)
    np.testing.assert_allclose(mean_color(out), expected, atol=6)


def test_palette_transparency_composites_on_white():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 255] + [0] * 765)
    out = load_image(encoded(image, "PNG", transparency=0), SIZE)
    np.testing.assert_allclose(mean_color(out), WHITE, atol=1)


def test_16bit_grayscale_scales_to_8bit():
    values = np.full((20, 20), 32768, dtype=np.uint16)  # half of the 16-bit range
    image = Image.fromarray(values)
    out = load_image(encoded(image, "PNG"), SIZE)
    assert_rgb(out)
    np.testing.assert_allclose(mean_color(out), (128, 128, 128), atol=1)


def test_exif_orientation_6_rotates_the_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    left_right_image().save(path, format="JPEG", quality=95, exif=exif)
    out = load_image(path, 20).astype(int)
    # Displayed upright, the red left half ends up on top.
    top, bottom = out[:8].reshape(-1, 3).mean(0), out[-8:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # And without the EXIF tag the same pixels stay left/right.
    plain = load_image(encoded(left_right_image(), "JPEG", quality=95), 20).astype(int)
    assert plain[:, :8].reshape(-1, 3).mean(0)[0] > 200


def test_resize_shorter_side_then_centre_crop():
    # 60x20: red | green | blue thirds; the centre square is all green.
    image = Image.new("RGB", (60, 20), RED)
    image.paste(Image.new("RGB", (20, 20), (0, 255, 0)), (20, 0))
    image.paste(Image.new("RGB", (20, 20), BLUE), (40, 0))
    out = load_image(encoded(image, "PNG"), 10)
    assert_rgb(out, 10)
    np.testing.assert_allclose(mean_color(out[:, 2:8]), (0, 255, 0), atol=2)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not_an_image"),
        (b"this is plain text, not a PNG", "not_an_image"),
        (truncated(encoded(noise(), "PNG")), "truncated"),
        (truncated(encoded(noise(), "JPEG")), "truncated"),
        (png_header_only(8000, 8000), "too_large"),  # over our limit, under Pillow's
        (png_header_only(20000, 20000), "too_large"),  # over Pillow's own bomb limit
        (png_header_only(0, 10), "not_an_image"),  # Pillow refuses 0-width PNG headers
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "bomb-64mpx", "bomb-400mpx", "zero"],
)
def test_bad_input_raises_image_error_with_reason(data, reason):
    with pytest.raises(ImageError) as info:
        load_image(data, SIZE)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_max_pixels_is_configurable():
    data = encoded(solid(RED, (100, 100)), "PNG")
    assert_rgb(load_image(data, SIZE, max_pixels=10_000))
    with pytest.raises(ImageError, match="exceeds the limit") as info:
        load_image(data, SIZE, max_pixels=9_999)
    assert info.value.reason == "too_large"


def test_encode_png_round_trips():
    array = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert np.array_equal(load_image(encode_png(array), SIZE), array)
    with pytest.raises(ValueError):
        encode_png(array.astype(np.float32))


# --- readers ---------------------------------------------------------------------------------


def by_source(items: list[SourceItem]) -> dict[str, SourceItem]:
    return {item.source: item for item in items}


def assert_item_image(item: SourceItem, color) -> None:
    assert_rgb(item.image)
    np.testing.assert_allclose(mean_color(item.image), color, atol=6)
    assert np.array_equal(load_image(item.image_bytes, SIZE), item.image)  # PNG of the same


def test_read_folder_pairs_sidecar_captions_recursively_and_skips_bad_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    solid(RED).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red thing\n")
    solid(BLUE).save(tmp_path / "sub" / "b.jpg", quality=95)  # no caption: image-only
    solid(RED).save(tmp_path / "sub" / "deeper" / "c.png")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("   ")  # empty caption
    (tmp_path / "fake.png").write_text("not an image at all")
    (tmp_path / "cut.jpg").write_bytes(truncated(encoded(noise(), "JPEG")))
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))

    report = SkipReport()
    items = by_source(list(read_folder(tmp_path, SIZE, report)))

    assert sorted(items) == ["a.png", "sub/b.jpg", "sub/deeper/c.png"]
    assert items["a.png"].caption == "a red thing"
    assert_item_image(items["a.png"], RED)
    assert items["sub/b.jpg"].caption is None
    assert_item_image(items["sub/b.jpg"], BLUE)
    assert items["sub/deeper/c.png"].caption is None
    assert report.items == 3
    assert report.skipped == {"not_an_image": 1, "truncated": 1, "too_large": 1}
    assert report.noted == {"empty_caption": 1}
    assert report.examples["not_an_image"][0].startswith("fake.png: ")


def write_row_images(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    solid(RED).save(tmp_path / "img" / "red.png")
    solid(BLUE).save(tmp_path / "img" / "blue.jpg", quality=95)
    (tmp_path / "img" / "bad.png").write_text("not an image")


def test_read_jsonl_resolves_paths_and_skips_bad_rows(tmp_path):
    write_row_images(tmp_path)
    absolute_blue = str(tmp_path / "img" / "blue.jpg")
    lines = [
        json.dumps({"image": "img/red.png", "caption": "red", "id": 7}),
        json.dumps({"image_path": absolute_blue, "text": "blue"}),
        json.dumps({"caption": "text only"}),
        json.dumps({"image": "img/red.png", "caption": ""}),  # empty caption: image-only
        json.dumps({"url": "http://169.254.169.254/latest", "caption": "ssrf"}),
        json.dumps({"image": "img/missing.png", "caption": "gone"}),
        json.dumps({"image": "img/bad.png", "caption": "bad"}),
        json.dumps({"image": "", "caption": ""}),
        "{not json",
        "[1, 2]",
        "",
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = SkipReport()
    items = list(read_jsonl(path, SIZE, report))

    assert [i.caption for i in items] == ["red", "blue", "text only", None]
    assert_item_image(items[0], RED)
    assert items[0].meta == {"id": 7}
    assert items[0].source == "data.jsonl:1"
    assert_item_image(items[1], BLUE)
    assert items[2].image is None and items[2].image_bytes is None
    assert_item_image(items[3], RED)
    assert report.skipped == {
        REMOTE_URL: 1, "missing_file": 1, "not_an_image": 1, "empty": 1, "bad_row": 2
    }
    assert report.noted == {"empty_caption": 1}


def test_read_jsonl_explicit_columns(tmp_path):
    write_row_images(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"pic": "img/red.png", "alt_text": "x", "caption": "ignored"}))
    report = SkipReport()
    items = list(read_jsonl(path, SIZE, report, image_column="pic", caption_column="alt_text"))
    assert len(items) == 1 and items[0].caption == "x"
    assert_item_image(items[0], RED)


def test_read_csv_and_tsv(tmp_path):
    write_row_images(tmp_path)
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(
        "image,caption\n"
        "img/red.png,\"a red, quoted caption\"\n"
        "img/bad.png,broken\n"
        "https://example.com/x.jpg,remote\n"
        "img/blue.jpg,\n"
        ",\n"
        "img/red.png,too,many,fields\n"
    )
    report = SkipReport()
    items = list(read_csv(csv_path, SIZE, report))
    assert [i.caption for i in items] == ["a red, quoted caption", None]
    assert_item_image(items[0], RED)
    assert_item_image(items[1], BLUE)
    assert report.skipped == {"not_an_image": 1, REMOTE_URL: 1, "empty": 1, "bad_row": 1}
    assert report.noted == {"empty_caption": 1}

    tsv_path = tmp_path / "data.tsv"
    tsv_path.write_text("filepath\ttitle\nimg/blue.jpg\tblue, with a comma\n")
    (item,) = read_csv(tsv_path, SIZE, SkipReport())
    assert item.caption == "blue, with a comma"
    assert_item_image(item, BLUE)


def test_read_parquet_paths_and_bytes(tmp_path):
    write_row_images(tmp_path)
    table = pa.table(
        {
            "image_path": ["img/red.png", "img/bad.png", None, "img/missing.png", "file://"
                           + str(tmp_path / "img" / "blue.jpg")],
            "caption": ["red", "bad", "text only", "gone", None],
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=2)
    report = SkipReport()
    items = list(read_parquet(path, SIZE, report, batch_rows=2))
    assert [i.caption for i in items] == ["red", "text only", None]
    assert_item_image(items[0], RED)
    assert items[1].image is None
    assert_item_image(items[2], BLUE)
    assert items[2].source == "data.parquet:5"
    assert report.skipped == {"not_an_image": 1, "missing_file": 1}

    # Hugging Face-style image struct {bytes, path} with the bytes inline.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table(
        {
            "image": pa.array(
                [{"bytes": encoded(solid(BLUE), "PNG"), "path": None},
                 {"bytes": b"garbage", "path": None}],
                type=image_type,
            ),
            "text": ["inline blue", "garbage"],
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    report = SkipReport()
    (item,) = read_parquet(tmp_path / "hf.parquet", SIZE, report)
    assert item.caption == "inline blue"
    assert_item_image(item, BLUE)
    assert report.skipped == {"not_an_image": 1}


def test_read_parquet_missing_named_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no column 'pic'"):
        list(read_parquet(tmp_path / "d.parquet", SIZE, SkipReport(), image_column="pic"))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_webdataset_groups_members_by_key_across_shards(tmp_path):
    red_jpg = encoded(solid(RED), "JPEG", quality=95)
    write_shard(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", red_jpg),
            ("000000000.txt", b"a red square"),
            ("000000000.json", json.dumps({"url": "http://x", "key": "000000000"}).encode()),
            ("000000001.png", encoded(solid(BLUE), "PNG")),
            ("000000001.json", json.dumps({"caption": "caption from json"}).encode()),
            ("000000002.jpg", b"corrupt bytes"),
            ("000000002.txt", b"corrupt"),
            ("000000003.jpg", red_jpg),
            ("000000003.txt", b""),
        ],
    )
    write_shard(tmp_path / "00001.tar", [("sub/000000004.txt", b"text only sample")])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file" * 40)

    report = SkipReport()
    items = by_source(list(read_webdataset(str(tmp_path / "*.tar"), SIZE, report)))
    assert sorted(items) == [
        "00000.tar:000000000", "00000.tar:000000001", "00000.tar:000000003",
        "00001.tar:sub/000000004",
    ]
    first = items["00000.tar:000000000"]
    assert first.caption == "a red square" and first.meta["key"] == "000000000"
    assert_item_image(first, RED)
    assert items["00000.tar:000000001"].caption == "caption from json"
    assert_item_image(items["00000.tar:000000001"], BLUE)
    assert items["00000.tar:000000003"].caption is None
    assert items["00001.tar:sub/000000004"].image is None
    assert report.skipped == {"not_an_image": 1, "corrupt_shard": 1}
    assert report.noted == {"empty_caption": 1}

    # A directory of shards reads the same documents.
    assert len(list(read_webdataset(tmp_path, SIZE, SkipReport()))) == 4


def test_readers_stream_lazily(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"caption": f"c{i}"}) + "\n" for i in range(1000)))
    report = SkipReport()
    stream = read_jsonl(path, SIZE, report)
    assert next(stream).caption == "c0"
    assert report.items == 1  # nothing beyond the first row was built


def test_open_source_registry_and_world_hook(tmp_path):
    assert {"folder", "jsonl", "csv", "parquet", "webdataset"} <= set(SOURCES)
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source("nope", tmp_path, SIZE, SkipReport())

    def fake_world(input, size, report, *, count=2):
        for i in range(count):
            image = np.full((size, size, 3), i * 100, dtype=np.uint8)
            item = make_item(image, f"world {i}", f"world:{i}", report)
            if item is not None:
                yield item

    register_source("test-world", fake_world)
    try:
        report = SkipReport()
        items = list(open_source("test-world", "seed=0", SIZE, report, count=3))
        assert [i.caption for i in items] == ["world 0", "world 1", "world 2"]
        assert load_image(items[2].image_bytes, SIZE)[0, 0, 0] == 200
        assert report.items == 3
    finally:
        del SOURCES["test-world"]

    solid(RED).save(tmp_path / "x.png")
    assert len(list(open_source("folder", tmp_path, SIZE, SkipReport()))) == 1


def test_guess_source_kind(tmp_path):
    assert guess_source_kind(tmp_path) == "folder"
    assert guess_source_kind("a/b.jsonl.gz") == "jsonl"
    assert guess_source_kind("x.tsv") == "csv"
    assert guess_source_kind("x.parquet") == "parquet"
    assert guess_source_kind("shards/{00000..00009}.tar") == "webdataset"
    with pytest.raises(ValueError):
        guess_source_kind("x.bin")


def test_skip_report_keeps_a_few_examples():
    report = SkipReport(max_examples=2)
    for i in range(5):
        report.skip("truncated", f"f{i}.jpg", "cut")
    assert report.skipped["truncated"] == 5
    assert report.examples["truncated"] == ["f0.jpg: cut", "f1.jpg: cut"]
    assert "5 skipped" in report.summary()
    assert report.to_dict()["skipped"] == {"truncated": 5}
