"""Live servers for the service tests, on the real engine and the real memory.

`real_models` wraps the session's smoke bundle (tests/conftest.py `smoke_bundle`): the
RA-CM3 engine (`model/engine.py`) and the retriever core's memory-mapped memory behind
`CoreRetrieverBackend`. The loaded bundle and engine are cached per process, so every
test app after the first starts in about a second (load the memory, warm up) instead of
paying the torch/open_clip imports and weight loading again.

Servers are uvicorn on a free port in a background thread: real HTTP, real lifespan.
"""

from __future__ import annotations

import functools
import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from app.retriever.service import CoreRetrieverBackend
from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


def solid_image(colour: str, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), COLOURS[colour], dtype=np.uint8)


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode).save(buf, format="PNG")
    return buf.getvalue()


# --- the real components ---------------------------------------------------------------------


@functools.cache
def load_bundle(bundle_dir: str) -> Any:
    from model.bundle import Bundle

    return Bundle(bundle_dir)


@functools.cache
def load_engine(bundle_dir: str) -> Any:
    from model.engine import Engine

    return Engine.from_bundle(load_bundle(bundle_dir), decoder="ra_cm3")


@dataclass
class RealModels:
    """The smoke bundle's engine and memory, as factories for `create_role_app`."""

    bundle_dir: Path
    memory_dir: Path

    @property
    def bundle(self) -> Any:
        return load_bundle(str(self.bundle_dir))

    def engine(self, settings: GeneratorSettings | None = None) -> Any:
        return load_engine(str(self.bundle_dir))

    def backend(self, settings: RetrieverSettings) -> CoreRetrieverBackend:
        # The bundle's CLIP, shared with the engine's reranker (both only run inference).
        return CoreRetrieverBackend(settings, self.bundle.clip, self.bundle.vq)

    def retriever_settings(self, memory_dir: Path | None = None, **kw: Any) -> RetrieverSettings:
        return RetrieverSettings(
            memory_dir=memory_dir or self.memory_dir, bundle_dir=self.bundle_dir, **kw
        )

    def generator_settings(self, **kw: Any) -> GeneratorSettings:
        return GeneratorSettings(bundle_dir=self.bundle_dir, **kw)

    def app(
        self,
        *,
        gateway: dict[str, Any] | None = None,
        retriever: dict[str, Any] | None = None,
        generator: dict[str, Any] | None = None,
        memory_dir: Path | None = None,
        engine_factory: Any = None,
    ) -> Any:
        """An embedded-mode app (gateway + retriever + generator in one process)."""
        return create_role_app(
            "embedded",
            gateway_settings=GatewaySettings(**(gateway or {})),
            retriever_settings=self.retriever_settings(memory_dir, **(retriever or {})),
            generator_settings=self.generator_settings(**(generator or {})),
            engine_factory=engine_factory or self.engine,
            backend_factory=self.backend,
        )

    def memory(self) -> Any:
        from retrieval.memory import Memory

        return Memory.load(self.memory_dir)

    def copy_memory(self, dest: Path) -> Path:
        """A private copy of the memory, for tests that publish new versions into it."""
        shutil.copytree(self.memory_dir, dest)
        return dest


@pytest.fixture(scope="session")
def real_models(smoke_bundle: tuple[Path, Path]) -> RealModels:
    bundle_dir, memory_dir = smoke_bundle
    return RealModels(Path(bundle_dir), Path(memory_dir))


def append_documents(models: RealModels, memory_dir: Path, captions: list[str],
                     colours: list[str], workdir: Path) -> str:
    """Publish a new memory version: the current one plus these image+caption documents,
    built by the real index builder (`racm3 build-index --append`). Returns its name."""
    from retrieval.from_bundle import build_from_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    for i, (caption, colour) in enumerate(zip(captions, colours, strict=True)):
        Image.fromarray(solid_image(colour)).save(workdir / f"{i:03d}.png")
        (workdir / f"{i:03d}.txt").write_text(caption)
    report = build_from_bundle(models.bundle, "folder", workdir, memory_dir, append=True,
                               progress=False)
    return report.version


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
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def wait_ready(url: str, timeout_s: float = 120.0, accept_degraded: bool = True) -> dict:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2.0)
            last = r.json()
            if r.status_code == 200 and (accept_degraded or last["status"] == "ready"):
                return last
            if any(str(v).startswith("failed") for v in last.get("checks", {}).values()):
                raise RuntimeError(f"{url} failed to start: {last}")
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


@contextmanager
def live_app(app: Any) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        wait_ready(server.url)
        yield server


@contextmanager
def role_cluster(models: RealModels, engine: Any, **generator: Any) -> Iterator[dict[str, str]]:
    """Retriever, a generator worker on `engine` (`generator`: its settings) and a gateway,
    each its own app on its own port, as multi-service mode runs them."""
    retriever = create_role_app(
        "retriever", retriever_settings=models.retriever_settings(),
        backend_factory=models.backend)
    worker = create_role_app(
        "generator", generator_settings=models.generator_settings(**generator),
        engine_factory=lambda settings: engine)
    with LiveServer(retriever) as r, LiveServer(worker) as g:
        wait_ready(r.url)
        wait_ready(g.url)
        gateway = create_role_app("gateway", gateway_settings=GatewaySettings(
            retriever_url=r.url, generator_urls=[g.url]))
        with live_app(gateway) as gw:
            yield {"gateway": gw.url, "retriever": r.url, "generator": g.url}
