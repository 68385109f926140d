"""Large uploads are decoded reduced, so their memory is bounded.

A 65 kB all-zero 4096x4096 RGBA PNG is within the default limits. Decoded naively (whole
image, then RGBA conversion, compositing, RGB, numpy) it took ~350 MiB per decode, and
eight at once through the server took gigabytes. Now:
- a JPEG decodes straight at 1/8 of its size (no full-resolution buffer at all);
- a PNG can only be decoded whole by Pillow, so it is decoded once at full resolution
  (64 MiB here) and reduced stripe by stripe, with no other full-resolution copy;
- client images decode on two threads of their own, whatever the concurrency.

Peak memory of one decode is measured in a fresh interpreter (`ru_maxrss` is a
high-water mark for the whole process, so it must start clean); the concurrent case
samples the resident size of the test process, which runs the live server.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.images import ImageLimits, decode_image, decode_mask
from tests.live import live_app, real_models  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
SIDE = 4096
MIB = 1024 * 1024
LIMITS = ImageLimits(max_bytes=64 * MIB, max_pixels=SIDE * SIDE, max_side=SIDE)


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def zero_png() -> bytes:
    data = encoded(Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0)))
    assert len(data) < 100_000
    return data


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return encoded(small.resize((SIDE, SIDE)), "JPEG", quality=80)


_MEASURE = """
import resource, sys
from app.images import ImageLimits, decode_image
data = open(sys.argv[1], "rb").read()
limits = ImageLimits(max_bytes=8 << 20, max_pixels=4096 * 4096, max_side=4096)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_image(data, "image", limits)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, decoded.rgb.shape[0], decoded.rgb.shape[1])
"""


def peak_decode_bytes(data: bytes, tmp_path: Path) -> tuple[int, tuple[int, int]]:
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout.split()
    return int(out[0]), (int(out[1]), int(out[2]))


def test_a_large_png_is_decoded_whole_once_and_reduced(zero_png, tmp_path):
    full_rgba = SIDE * SIDE * 4  # 64 MiB: the one buffer Pillow's PNG decoder needs
    peak, shape = peak_decode_bytes(zero_png, tmp_path)
    assert shape == (512, 512)
    assert peak < 1.25 * full_rgba, f"peak {peak / MIB:.0f} MiB"


def test_a_large_jpeg_never_decodes_at_full_resolution(big_jpeg, tmp_path):
    full_rgb = SIDE * SIDE * 3  # 48 MiB
    peak, shape = peak_decode_bytes(big_jpeg, tmp_path)
    assert shape == (512, 512)
    assert peak < full_rgb / 4, f"peak {peak / MIB:.0f} MiB"


def test_reduced_decoding_keeps_content_sizes_and_masks():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2048, 1536, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:256, :256, 3] = 0  # a transparent corner
    data = encoded(Image.fromarray(pixels, "RGBA"))
    decoded = decode_image(data, "image", LIMITS)
    assert decoded.size == (1536, 2048) and decoded.scale == 2
    assert decoded.rgb.shape == (1024, 768, 3)
    # Transparent pixels are white; the rest is the 2x2 mean of the opaque pixels.
    assert (decoded.rgb[:128, :128] == 255).all()
    expected = pixels[256:, 256:, :3].reshape(896, 2, 640, 2, 3).mean(axis=(1, 3))
    assert np.abs(decoded.rgb[128:, 128:].astype(float) - expected).max() <= 1
    assert decoded.transparent is not None
    assert decoded.transparent[:128, :128].all() and not decoded.transparent[128:, :].any()
    # A mask marks a working pixel when any pixel under it is marked.
    mask_pixels = np.zeros((2048, 1536), dtype=np.uint8)
    mask_pixels[1001, 701] = 255  # one white pixel
    mask = decode_mask(encoded(Image.fromarray(mask_pixels, "L")), "mask", LIMITS)
    assert mask.size == (1536, 2048)
    assert mask.mask.sum() == 1 and mask.mask[500, 350]


def test_exif_orientation_is_applied_to_the_reduced_image():
    img = Image.new("RGB", (2048, 1024), (250, 250, 250))
    img.paste((10, 10, 10), (0, 0, 256, 256))  # dark top-left corner, as stored
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    decoded = decode_image(encoded(img, "JPEG", exif=exif.tobytes()), "image", LIMITS)
    assert decoded.size == (1024, 2048)
    assert decoded.rgb.shape == (1024, 512, 3)
    assert decoded.rgb[:64, -64:].mean() < 60  # the dark corner is now top-right
    assert decoded.rgb[:64, :64].mean() > 200


class RssSampler:
    """The resident size of this process, sampled every few milliseconds; peak growth."""

    def __init__(self) -> None:
        self.peak = self.start = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    app = real_models.app(
        gateway={"max_image_bytes": 8 * MIB, "max_body_bytes": 16 * MIB},
        generator={"max_wait_ms": 1},
    )
    with live_app(app) as live:
        yield live


def test_eight_concurrent_large_pngs_stay_bounded(server, zero_png):
    body = {"image": base64.b64encode(zero_png).decode(), "k": 2, "return_thumbnails": False}

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/retrieve", json=body, timeout=120)

    one(0)  # first use: warm the allocator and the routes
    with RssSampler() as rss, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert [a.status_code for a in answers] == [200] * 8, answers[0].text[:300]
    # Two decodes at a time, each one 64 MiB buffer and a few stripes.
    assert rss.growth < 200 * MIB, f"RSS grew {rss.growth / MIB:.0f} MiB"


def test_infill_box_and_edit_mask_of_a_large_image(server):
    image = Image.new("RGB", (2048, 2048), (30, 60, 220))
    b64 = base64.b64encode(encoded(image)).decode()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/images/infill", json={"image": b64, "box": [1024, 1024, 2048, 2048]})
        assert r.status_code == 200, r.text[:300]
        r = client.post("/v1/images/infill", json={"image": b64, "box": [0, 0, 2049, 8]})
        assert r.status_code == 422 and "2048" in r.json()["error"]["message"]
        mask = encoded(Image.new("RGBA", (2049, 2048), (0, 0, 0, 0)))
        r = client.post(
            "/v1/images/edits", data={"prompt": "a red square"},
            files={"image": ("i.png", encoded(image), "image/png"),
                   "mask": ("m.png", mask, "image/png")},
        )
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "mask_size_mismatch"
        assert "2049x2048" in r.json()["error"]["message"]
