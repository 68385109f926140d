"""TEMPORARY stand-ins for the real engine and retriever core, plus live-server helpers.

`FakeEngine` and `FakeRetrieverBackend` exist only until the real ones land
(`model/engine.py` built from a smoke bundle; the retriever core's memory and CLIP).
They let the service tests run without trained weights: the services, batching, cache,
HTTP and error handling under test are all real; only the numbers the model would
produce are made up. The FAISS index inside the fake memory is real.

To switch the API tests to the real components, change `model_factories` (the one
fixture that builds engine + memory) to return factories for the smoke bundle.

Run a role in its own process: `python -m tests.fakes --role generator --port 8002`.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pytest
import uvicorn

from app.generator.protocol import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    T2IJob,
)
from app.images import encode_png
from app.retriever.service import RetrievalStrategy, StoredDocument
from app.settings import GeneratorSettings, RetrieverSettings

DIM = 64
IMAGE_SIZE = 32
GRID = 8
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("square", "circle", "triangle")


def _word_vec(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.lower().encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def hashed_text_embedding(text: str) -> np.ndarray:
    words = [w.strip(".,!?\"'") for w in text.lower().split()] or [""]
    v = np.sum([_word_vec(w) for w in words], axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def nearest_colour(image: np.ndarray) -> str:
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return min(PALETTE, key=lambda c: float(np.sum((np.array(PALETTE[c]) - mean) ** 2)))


def solid_image(colour: str, size: int = IMAGE_SIZE) -> np.ndarray:
    return np.full((size, size, 3), PALETTE[colour], dtype=np.uint8)


# --- the fake memory ---------------------------------------------------------------------


class FakeMemorySnapshot:
    def __init__(self, version: str, n_docs: int) -> None:
        self.version = version
        self.docs: list[StoredDocument] = []
        vectors = []
        colours = list(PALETTE)
        for i in range(n_docs):
            colour, shape = colours[i % len(colours)], SHAPES[(i // len(colours)) % 3]
            caption = f"a {colour} {shape} number {i}"
            image = solid_image(colour)
            codes = np.full((GRID, GRID), (i * 7) % 256, dtype=np.int64)
            self.docs.append(
                StoredDocument(i, caption, [3 + (i % 50), 7, 11], codes, encode_png(image))
            )
            v = hashed_text_embedding(caption) + hashed_text_embedding(colour)
            vectors.append(v / np.linalg.norm(v))
        self.index = faiss.IndexFlatIP(DIM)
        self.index.add(np.stack(vectors).astype(np.float32))
        self.size = n_docs
        self.dim = DIM
        self.searches = 0  # query vectors searched (a cache hit searches none)

    def search(
        self, vectors: np.ndarray, k: int, strategy: RetrievalStrategy
    ) -> list[list[tuple[int, float]]]:
        self.searches += len(vectors)
        n = min(self.size, max(k, strategy.candidates))
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), n)
        out = []
        for row_s, row_i in zip(scores, ids, strict=True):
            kept = [(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
            if strategy.diversity_threshold is not None:
                kept = [h for h in kept if h[1] <= strategy.diversity_threshold] or kept
            out.append(kept[:k])
        return out

    def documents(self, ids: Sequence[int]) -> list[StoredDocument]:
        return [self.docs[i] for i in ids]

    def describe(self) -> dict[str, Any]:
        return {"index": "Flat", "dim": DIM, "fake": True}


class FakeRetrieverBackend:
    """Versions come from `memory_dir/CURRENT` ("v1", "v2"...; "corrupt" is refused)."""

    def __init__(self, memory_dir: Path | None, n_docs: int = 40) -> None:
        self.memory_dir = memory_dir
        self.n_docs = n_docs
        self._current = self._load()
        self.encoded = 0

    def _load(self) -> FakeMemorySnapshot:
        version = "v1"
        if self.memory_dir is not None and (self.memory_dir / "CURRENT").is_file():
            version = (self.memory_dir / "CURRENT").read_text().strip()
        if version == "corrupt":
            raise ValueError("memory version 'corrupt' failed its checksum")
        extra = int(version[1:]) if version[1:].isdigit() else 0
        return FakeMemorySnapshot(version, self.n_docs + extra)

    def current(self) -> FakeMemorySnapshot:
        return self._current

    def reload(self) -> FakeMemorySnapshot:
        snap = self._load()
        time.sleep(0.05)  # loading takes a moment; requests keep flowing meanwhile
        self._current = snap
        return snap

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self.encoded += len(texts)
        return np.stack([hashed_text_embedding(t) for t in texts])

    def encode_image(self, images: list[np.ndarray]) -> np.ndarray:
        self.encoded += len(images)
        return np.stack([hashed_text_embedding(nearest_colour(im)) for im in images])


# --- the fake engine -------------------------------------------------------------------------


class FakeEngine:
    """Deterministic per seed; sleeps `batch_delay_s` per batch like a real forward pass."""

    def __init__(self, batch_delay_s: float = 0.0) -> None:
        self.batch_delay_s = batch_delay_s
        self.batches: list[tuple[str, int]] = []
        self.warmed = False
        self._tokens = 0

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    def info(self) -> dict[str, Any]:
        return {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "grid": [GRID, GRID], "name": "fake"}

    def warmup(self) -> None:
        self.warmed = True

    def _batch(self, task: str, n: int) -> None:
        self.batches.append((task, n))
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)

    def _colour(self, text: str | None, neighbours: Sequence[Any]) -> str:
        for word in (text or "").lower().split():
            if word in PALETTE:
                return word
        for nb in neighbours:
            for word in (nb.caption or "").split():
                if word in PALETTE:
                    return word
        return "white"

    def _image(self, colour: str, seed: int) -> GeneratedImage:
        rng = np.random.default_rng(seed)
        noise = rng.integers(-8, 9, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = np.clip(solid_image(colour).astype(int) + noise, 0, 255).astype(np.uint8)
        self._tokens += GRID * GRID
        return GeneratedImage(image, 0.25, rng.integers(0, 256, (GRID, GRID)))

    def text_to_image(self, jobs: list[T2IJob]) -> list[list[GeneratedImage]]:
        self._batch("text_to_image", len(jobs))
        out = []
        for job in jobs:
            colour = self._colour(job.prompt, job.neighbours)
            out.append([self._image(colour, job.sampling.seed + i) for i in range(job.n)])
        return out

    def caption(self, jobs: list[CaptionJob]) -> list[list[GeneratedCaption]]:
        self._batch("caption", len(jobs))
        out = []
        for job in jobs:
            assert job.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            colour = nearest_colour(job.image)
            self._tokens += 4 * job.n
            out.append([GeneratedCaption(f"a {colour} image", -1.0 - i) for i in range(job.n)])
        return out

    def infill(self, jobs: list[InfillJob]) -> list[list[GeneratedImage]]:
        self._batch("infill", len(jobs))
        out = []
        for job in jobs:
            assert job.mask.shape == job.image.shape[:2] and job.mask.dtype == bool
            colour = self._colour(job.prompt, job.neighbours)
            results = []
            for i in range(job.n):
                image = job.image.copy()
                image[job.mask] = PALETTE[colour]
                g = self._image(colour, job.sampling.seed + i)
                results.append(GeneratedImage(image, g.score, g.codes))
            out.append(results)
        return out

    def classify(self, jobs: list[ClassifyJob]) -> list[ClassifyResult]:
        self._batch("classify", len(jobs))
        out = []
        for job in jobs:
            colour = nearest_colour(job.image)
            raw = np.array([3.0 if colour in label.lower() else 0.0 for label in job.labels])
            probs = np.exp(raw) / np.exp(raw).sum()
            scores = {label: float(p) for label, p in zip(job.labels, probs, strict=True)}
            out.append(ClassifyResult(max(scores, key=scores.__getitem__), scores))
        return out


# --- the one fixture to switch to real components -----------------------------------------


@dataclass
class ModelFactories:
    engine: Any  # GeneratorSettings -> Engine
    backend: Any  # RetrieverSettings -> RetrieverBackend


def fake_factories(batch_delay_s: float = 0.0, n_docs: int = 40) -> ModelFactories:
    def engine(settings: GeneratorSettings) -> FakeEngine:
        return FakeEngine(batch_delay_s)

    def backend(settings: RetrieverSettings) -> FakeRetrieverBackend:
        return FakeRetrieverBackend(Path(settings.memory_dir), n_docs)

    return ModelFactories(engine, backend)


@pytest.fixture(scope="module")
def model_factories() -> ModelFactories:
    """Builds the engine and the memory. TEMPORARY fakes: switch to the smoke bundle here."""
    return fake_factories()


# --- live servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A uvicorn server on a free port in a background thread (real HTTP, real lifespan)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def wait_ready(url: str, timeout_s: float = 60.0, accept_degraded: bool = True) -> dict:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2.0)
            last = r.json()
            if r.status_code == 200 and (accept_degraded or last["status"] == "ready"):
                return last
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


@contextmanager
def live_app(app: Any) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        wait_ready(server.url)
        yield server


# --- one role in its own process (multi-service tests) ----------------------------------


def main() -> None:
    from app.serve import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    factories = fake_factories(args.batch_delay_s)
    serve(
        args.role, "127.0.0.1", args.port,
        engine_factory=factories.engine, backend_factory=factories.backend,
    )


if __name__ == "__main__":
    main()
