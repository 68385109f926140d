"""racm3 Studio in a real browser: headless Chromium (Debian's, driven by Playwright) against
a real embedded server on the smoke bundle, asserting what a person sees.

The browser is required, never skipped: `.ci/run` installs it (`apt-get install chromium`).
One server (with an API key, so every request the page makes carries the Bearer token)
and one browser serve the module; each test opens a fresh page and fails on anything the
page logs as an error, or on a request that leaves the server's origin.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.live import live_app, png_bytes, real_models, solid_image  # noqa: F401 - fixture

CHROMIUM = os.environ.get("RACM3_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
API_KEY = "studio-test-key"
TIMEOUT_MS = 30_000
# What Chromium itself logs for a fetch answered with an error status. A test that asks
# for an error expects exactly these; anything else logged as an error fails every test.
NETWORK_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def server(real_models, tmp_path_factory):  # noqa: F811 - fixture
    # A private copy of the memory: the add-documents test publishes new versions into it.
    memory_dir = real_models.copy_memory(tmp_path_factory.mktemp("studio") / "memory")
    app = real_models.app(
        memory_dir=memory_dir, gateway={"api_keys": [API_KEY]}, generator={"max_wait_ms": 2}
    )
    with live_app(app) as live:
        yield live


@pytest.fixture(scope="module")
def api(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set "
                    "RACM3_CHROMIUM); the Studio's tests need a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Studio:
    page: object
    url: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def expect_only_network_errors(self, *statuses: int) -> None:
        """The page logged nothing but Chromium's line for these error answers."""
        seen = []
        for message in self.errors:
            m = NETWORK_ERROR.search(message)
            assert m is not None, f"the page logged an error: {message}"
            seen.append(int(m.group(1)))
        assert sorted(seen) == sorted(statuses), self.errors
        self.errors.clear()


def new_context(browser, api_key: str | None):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    if api_key:  # what the page keeps once a person has typed the key
        context.add_init_script(f"sessionStorage.setItem('racm3.apiKey', {json.dumps(api_key)})")
    return context


def open_studio(context, url: str, memory_visible: bool = True) -> Studio:
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    studio = Studio(page, url)
    page.on("console", lambda m: studio.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: studio.errors.append(f"uncaught: {e}"))
    page.on("request", lambda r: None if r.url.startswith((url, "data:")) else
            studio.foreign.append(r.url))
    page.goto(url)
    if memory_visible:  # /v1/info shows a memory only to a key that may use it
        page.locator("#memory-pill[data-state=ready]").wait_for()
    else:
        page.locator("#memory-pill").wait_for()
    return studio


@pytest.fixture(scope="module")
def keyed_context(browser):
    context = new_context(browser, API_KEY)
    yield context
    context.close()


@pytest.fixture
def studio(keyed_context, server) -> Iterator[Studio]:
    """A fresh page (a tab of its own) for each test."""
    s = open_studio(keyed_context, server.url)
    yield s
    try:
        assert s.errors == [], f"the page logged errors: {s.errors}"
        assert s.foreign == [], f"the page reached outside its server: {s.foreign}"
    finally:
        s.page.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=TIMEOUT_MS)  # a generation on a loaded CPU takes seconds
    return pw_expect(locator)


def decoded_size(img) -> tuple[int, int]:
    """The pixel size the browser decoded for an <img> (0x0 if it failed to decode)."""
    return tuple(img.evaluate("i => [i.naturalWidth, i.naturalHeight]"))


def decoded_pixels(img) -> np.ndarray:
    """The <img>'s decoded pixels, read back through a canvas: (H, W, 4) uint8."""
    data = img.evaluate("""i => {
        const c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(i, 0, 0);
        return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];
    }""")
    w, h, flat = data
    return np.asarray(flat, dtype=np.uint8).reshape(h, w, 4)


def src_pixels(img) -> np.ndarray:
    src = img.get_attribute("src")
    raw = base64.b64decode(src.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def b64_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def small_generation(page, n: int = 1) -> None:
    """n images from one candidate each: what the tests check does not need the rerank."""
    page.locator("#gen-n").fill(str(n))
    page.locator("#panel-generate details.advanced summary").click()
    page.fill("#gen-candidates", "1")


def upload(name: str, image: np.ndarray) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(image)}


# --- the page itself -----------------------------------------------------------------------------


def test_page_and_assets_are_served_and_self_contained(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path in ("/", "/studio"):
            r = http.get(path)  # no API key: the page itself is public, the API is not
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "<title>racm3 Studio</title>" in r.text
        html = http.get("/").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert {"/studio/static/studio.css", "/studio/static/studio.js"} <= set(assets)
        for asset in assets:
            assert asset.startswith(("/", "data:")), f"{asset} is not served by racm3"
            if asset.startswith("/"):
                r = http.get(asset)
                assert r.status_code == 200, asset
        for text in [html] + [http.get(a).text for a in assets if a.startswith("/")]:
            # Nothing from elsewhere (a CDN, a font host): only the SVG namespace URI.
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text)
        missing = http.get("/studio/static/../gateway.py")
        assert missing.status_code == 404 and "error" in missing.json()
        assert http.get("/studio/static/nothing.js").status_code == 404


def test_every_page_file_is_package_data():
    """A non-editable install carries the page: every shipped file matches a package-data
    pattern (a new kind of file needs a pattern, or the installed page breaks)."""
    import fnmatch

    from app.studio import STATIC_DIR

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    line = re.search(r'(?m)^"app\.studio" = \[(.*)\]$', pyproject)
    assert line is not None, "no package-data entry for app.studio"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    shipped = [p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.iterdir()]
    assert {"static/index.html", "static/studio.css", "static/studio.js"} <= set(shipped)
    for name in shipped:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


# --- Generate -----------------------------------------------------------------------------------


def test_generate_compares_with_and_without_memory(studio, api):
    page = studio.page
    page.fill("#gen-prompt", "a big red circle on the left")
    page.fill("#gen-seed", "1234")
    small_generation(page)
    expect(page.locator("#gen-compare")).to_be_checked()
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/images/generations") else None)
    page.click("#gen-submit")
    expect(page.locator("#gen-results .progress")).to_be_visible()  # during the request
    run = page.locator("[data-testid=run]").first
    with_side = run.locator("[data-testid=side-with]")
    without_side = run.locator("[data-testid=side-without]")
    expect(with_side.locator("[data-testid=generated] img")).to_have_count(1)
    expect(without_side.locator("[data-testid=generated] img")).to_have_count(1)
    expect(page.locator("#gen-results .progress")).to_be_hidden()

    # Images the browser decoded, at the model's size, shown enlarged and pixelated.
    for img in (with_side.locator("img.px").first, without_side.locator("img.px").first):
        assert decoded_size(img) == (32, 32)
        assert decoded_pixels(img)[..., 3].min() == 255  # opaque: real decoded pixels
        box = img.bounding_box()
        assert box["width"] >= 128 and box["height"] >= 128
        assert img.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"

    # Two neighbour cards with captions beside the with-memory images; none without.
    cards = run.locator("[data-testid=side-retrieved] [data-testid=neighbour]")
    assert (run.locator("[data-testid=side-retrieved]").bounding_box()["x"]
            < with_side.bounding_box()["x"] < without_side.bounding_box()["x"])
    expect(cards).to_have_count(2)
    for i in range(2):
        assert cards.nth(i).locator(".caption").inner_text().strip()
        assert re.search(r"score -?\d\.\d{3}", cards.nth(i).locator(".score").inner_text())
        assert decoded_size(cards.nth(i).locator("img")) == (32, 32)
    expect(without_side.locator("[data-testid=neighbour]")).to_have_count(0)

    # The same seed on both sides, and exactly what the API answers for these requests.
    assert "seed 1234" in run.locator(".facts").inner_text()
    with_body, without_body = sorted(sent, key=lambda b: not b["retrieval"]["enabled"])
    assert with_body["retrieval"] == {"enabled": True, "k": 2}
    assert without_body["retrieval"] == {"enabled": False}
    assert with_body["seed"] == without_body["seed"] == 1234
    assert {**with_body, "retrieval": None} == {**without_body, "retrieval": None}
    with_api = api.post("/v1/images/generations", json=with_body).json()
    without_api = api.post("/v1/images/generations", json=without_body).json()
    shown_with = src_pixels(with_side.locator("[data-testid=generated] img"))
    shown_without = src_pixels(without_side.locator("[data-testid=generated] img"))
    assert np.array_equal(shown_with, b64_pixels(with_api["data"][0]["b64_json"]))
    assert np.array_equal(shown_without, b64_pixels(without_api["data"][0]["b64_json"]))
    assert [c.locator(".caption").inner_text() for c in cards.all()] == [
        n["caption"] for n in with_api["neighbours"]]

    # A generated image goes on to be captioned in one click.
    with_side.locator("[data-testid=generated]").get_by_role("button", name="Caption").click()
    expect(page.locator("#panel-caption")).to_be_visible()
    expect(page.locator("[data-testid=caption]").first).to_be_visible()
    assert page.locator("#cap-preview").evaluate("c => [c.width, c.height]") == [32, 32]


def test_empty_prompt_shows_a_readable_error(studio):
    page = studio.page
    page.fill("#gen-prompt", "")
    page.click("#gen-submit")
    alert = page.locator("#gen-results .alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("The request was not valid")
    expect(alert).to_contain_text("prompt")
    expect(page.locator("[data-testid=run]")).to_have_count(0)  # no blank result card
    expect(page.locator("#gen-runs .empty")).to_be_visible()
    studio.expect_only_network_errors(422, 422)  # with and without memory: both refused


def test_a_missing_api_key_is_explained_then_sent_as_bearer(browser, server):
    context = new_context(browser, api_key=None)
    studio = open_studio(context, server.url, memory_visible=False)
    page = studio.page
    try:
        page.locator("#gen-compare").uncheck()
        small_generation(page)
        page.click("#gen-submit")
        alert = page.locator("#gen-results .alert")
        expect(alert).to_contain_text("API key needed")
        expect(alert).to_contain_text("Enter the key in the box at the top right")
        page.fill("#api-key", API_KEY)
        with page.expect_request("**/v1/images/generations") as sent:
            page.click("#gen-submit")
        assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
        expect(page.locator("[data-testid=generated] img")).to_have_count(1)
        # The one 401 of this generation: without a key /v1/info shows no memory, so the
        # page looks nothing up in it at load.
        studio.expect_only_network_errors(401)
    finally:
        context.close()


# --- Caption & classify --------------------------------------------------------------------------


def test_uploaded_image_gets_captions_neighbours_and_labels(studio):
    page = studio.page
    page.click("#tab-caption")
    page.set_input_files("#cap-file", upload("red.png", solid_image("red")))
    captions = page.locator("[data-testid=caption]")
    expect(captions).to_have_count(3)
    for i in range(3):
        assert captions.nth(i).locator(".text").inner_text().strip()
        assert re.fullmatch(r"-?\d+\.\d{3}", captions.nth(i).locator(".score").inner_text())
    expect(page.locator("#cap-neighbours [data-testid=neighbour]")).to_have_count(2)
    assert page.locator("#cap-preview").evaluate("c => [c.width, c.height]") == [32, 32]

    page.fill("#cls-labels", "a red square\na blue circle\na green triangle")
    page.click("#cls-submit")
    rows = page.locator("[data-testid=label-score]")
    expect(rows).to_have_count(3)
    expect(page.locator("[data-testid=label-score].best")).to_have_count(1)
    shares = [float(r.locator(".pct").inner_text().rstrip("%")) for r in rows.all()]
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) - 100) < 0.5


# --- Edit & infill -------------------------------------------------------------------------------


def test_infill_a_dragged_box_keeps_the_rest_and_the_size(studio):
    page = studio.page
    page.click("#tab-edit")
    original = solid_image("blue")
    page.set_input_files("#edit-file", upload("blue.png", original))
    canvas = page.locator("#edit-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    cell = box["width"] / 32
    # Drag over columns 0-15, every row: the left half.
    page.mouse.move(box["x"] + cell / 2, box["y"] + cell / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 10 * cell, box["y"] + 20 * cell, steps=4)
    page.mouse.move(box["x"] + 15.5 * cell, box["y"] + 31.5 * cell, steps=4)
    page.mouse.up()
    page.fill("#edit-prompt", "a red square")
    page.locator("#edit-n").fill("1")
    with page.expect_request("**/v1/images/infill") as sent:
        page.click("#edit-submit")
    assert json.loads(sent.value.post_data)["box"] == [0, 0, 16, 32]
    result = page.locator("[data-testid=infilled] img")
    expect(result).to_have_count(1)
    assert decoded_size(result) == (32, 32) == original.shape[1::-1]
    out = decoded_pixels(result)[..., :3]
    assert np.array_equal(out[:, 16:], original[:, 16:])  # outside the box: kept exactly
    shown = result.bounding_box()
    assert abs(shown["width"] - box["width"]) < 1  # shown next to it at the same scale


def test_infill_a_painted_mask(studio):
    page = studio.page
    page.click("#tab-edit")
    page.set_input_files("#edit-file", upload("white.png", solid_image("white")))
    page.locator(".segmented span", has_text="Brush").click()
    page.click("#edit-clear")
    page.click("#edit-submit")  # nothing marked: said before any request is made
    expect(page.locator("#edit-results .alert")).to_contain_text("Mark the area to regenerate")
    box = page.locator("#edit-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=6)
    page.mouse.up()
    page.fill("#edit-prompt", "")
    with page.expect_request("**/v1/images/infill") as sent:
        page.click("#edit-submit")
    body = json.loads(sent.value.post_data)
    assert "box" not in body and "prompt" not in body
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))[..., 3] == 0
    assert mask.shape == (32, 32) and 10 < mask.sum() < 400
    assert mask[14, 14] and not mask[0, 0] and not mask[31, 31]
    result = page.locator("[data-testid=infilled] img")
    expect(result).to_have_count(2)
    assert decoded_size(result.first) == (32, 32)


# --- Memory --------------------------------------------------------------------------------------


def test_added_document_is_served_and_found(studio, api):
    page = studio.page
    before = api.get("/v1/info").json()["memory"]
    page.click("#tab-memory")
    expect(page.locator("[data-testid=stat-version]")).to_have_text(before["version"])
    expect(page.locator("[data-testid=stat-documents]")).to_have_text(
        f"{before['documents']:,}")

    flag = np.zeros((32, 32, 3), dtype=np.uint8)
    flag[:, :11] = (250, 250, 250)
    flag[:, 11:22] = (30, 180, 60)
    flag[:, 22:] = (235, 220, 40)
    page.set_input_files("#add-files", [upload("the_flag_of_Studiovia.png", flag)])
    caption = page.locator("[data-testid=pending-caption]")
    expect(caption).to_have_value("the flag of Studiovia")  # from the file name, editable
    page.click("#add-submit")

    change = page.locator("[data-testid=version-change]")
    expect(change).to_be_visible()
    after = api.get("/v1/info").json()["memory"]
    assert after["version"] != before["version"]
    expect(change).to_have_text(f"{before['version']} → {after['version']}")
    assert after["documents"] == before["documents"] + 1
    expect(page.locator("#memory-pill")).to_contain_text(after["version"])
    expect(page.locator("[data-testid=stat-version]")).to_have_text(after["version"])

    # The page searched for the new caption: the new document is there, marked.
    new = page.locator("[data-testid=memory-result].new")
    expect(new).to_have_count(1)
    expect(new.locator(".caption")).to_have_text("the flag of Studiovia")
    assert np.array_equal(decoded_pixels(new.locator("img"))[..., :3], flag)
    # ...and a plain text search by a person finds it too.
    page.fill("#mem-text", "the flag of Studiovia")
    page.locator("#mem-k").fill("5")
    page.click("#mem-search")
    expect(page.locator("[data-testid=memory-result]").filter(
        has_text="the flag of Studiovia")).to_have_count(1)


def test_memory_search_by_image_shows_a_grid(studio, api):
    page = studio.page
    page.click("#tab-memory")
    page.set_input_files("#mem-file", upload("red.png", solid_image("red")))
    page.locator("#mem-k").fill("12")
    page.click("#mem-search")
    tiles = page.locator("[data-testid=memory-result]")
    expect(tiles).to_have_count(12)
    # Best first, in the retriever's order (hybrid mode ranks an image query by CLIP score
    # and VQ-code agreement, so the CLIP score shown need not fall monotonically).
    shown = [int(t.get_attribute("title").removeprefix("document #")) for t in tiles.all()]
    asked = api.post("/v1/retrieve", json={
        "k": 12, "strategy": page.locator("#mem-strategy").input_value(),
        "image": base64.b64encode(png_bytes(solid_image("red"))).decode()})
    assert asked.status_code == 200, asked.text
    assert shown == [d["id"] for d in asked.json()["data"]]
    assert all(decoded_size(t.locator("img")) == (32, 32) for t in tiles.all()[:3])
    assert "the image" in page.locator("#mem-meta").inner_text()


def test_add_documents_errors_are_readable(studio):
    page = studio.page
    page.click("#tab-memory")
    page.set_input_files("#add-files", [upload("x.png", solid_image("black"))])
    page.fill("[data-testid=pending-caption]", "   ")
    page.click("#add-submit")
    alert = page.locator("#mem-results .alert")
    expect(alert).to_contain_text("The request was not valid")
    expect(alert).to_contain_text("caption 0 is empty")
    studio.expect_only_network_errors(422)


# --- streaming and a busy server ---------------------------------------------------------------


def sse(*events: dict) -> str:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


def test_streamed_partial_images_are_shown_forming(browser, server, api):
    """The page's side of OpenAI's image streaming (`stream: true, partial_images: N`
    answered with `image_generation.partial_image` / `.completed` server-sent events).
    This server does not stream yet, so the browser's requests are answered here with the
    events a streaming server sends, made from a real generation of the same request."""
    context = new_context(browser, API_KEY)  # its own: the routes below are for it alone
    sent: list[dict] = []

    def advertise(route) -> None:
        info = route.fetch().json()
        info["limits"]["max_partial_images"] = 2
        route.fulfill(json=info)

    def stream(route) -> None:
        body = json.loads(route.request.post_data)
        sent.append(body)
        plain = {k: v for k, v in body.items() if k not in ("stream", "partial_images")}
        final = api.post("/v1/images/generations", json=plain).json()["data"][0]["b64_json"]
        done = b64_pixels(final).copy()
        partials = []
        for i, rows in enumerate((8, 24)):  # the first rows drawn, the rest still gray
            img = done.copy()
            img[rows:] = 128
            partials.append({"type": "image_generation.partial_image", "partial_image_index": i,
                             "b64_json": base64.b64encode(png_bytes(img)).decode()})
        completed = {"type": "image_generation.completed", "b64_json": final}
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=sse(*partials, completed))

    context.route("**/v1/info", advertise)
    context.route("**/v1/images/generations", stream)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url)
        page.locator("#memory-pill[data-state=ready]").wait_for(timeout=TIMEOUT_MS)
        expect(page.locator("#gen-stream-note")).to_contain_text("2 per image")
        page.evaluate("""() => {
            const seen = window.partialsSeen = [];
            new MutationObserver(() => document.querySelectorAll('[data-testid=partial] img')
                .forEach(i => seen.includes(i.src) || seen.push(i.src)))
              .observe(document.body, {subtree: true, childList: true}); }""")
        small_generation(page)
        page.click("#gen-submit")
        run = page.locator("[data-testid=run]").first
        expect(run.locator("[data-testid=generated] img")).to_have_count(2)
        assert [b["stream"] for b in sent] == [True, True]
        assert [b["partial_images"] for b in sent] == [2, 2]
        seen = page.evaluate("window.partialsSeen")
        assert len(seen) == 4  # two partial images for each side, each shown
        assert all(s.startswith("data:image/png;base64,") for s in seen)
        # The stream carries images only: the page shows the neighbours it was given.
        expect(run.locator("[data-testid=side-retrieved] [data-testid=neighbour]")).to_have_count(2)
        assert errors == []
    finally:
        context.close()


def test_a_busy_server_is_reported_beside_the_result_that_came(studio, server):
    """One request at a time: of the two the comparison sends at once, one gets the
    server's real 429 (with Retry-After), shown as such while the other side renders."""
    gateway = server.app.state.gateway
    normal = gateway.settings
    gateway.settings = normal.model_copy(update={"max_inflight": 1, "retry_after_s": 2})
    page = studio.page
    try:
        small_generation(page, n=4)
        page.click("#gen-submit")
        run = page.locator("[data-testid=run]").first
        expect(run.locator("[data-testid=generated] img")).to_have_count(4)
        alert = page.locator("#gen-results .alert")
        expect(alert).to_contain_text("The server is busy")
        expect(alert).to_contain_text("Try again in 2 s")
        refused = run.locator(".side").filter(has_text="The server is busy")
        expect(refused.first).to_be_visible()
        assert refused.count() in (1, 2)  # one arm (with memory: its neighbours as well)
        studio.expect_only_network_errors(429)
    finally:
        gateway.settings = normal
