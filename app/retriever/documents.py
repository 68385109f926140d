"""Adding documents to the served memory over HTTP: `POST /admin/documents`.

This is `racm3 build-index --source folder --append` followed by `POST /admin/reload`,
behind one authenticated route: the uploaded images and captions are written as a folder
of `NAME.png` + `NAME.txt` pairs, read by the folder source, appended by the index
builder as a new version (published atomically; the old one is never touched), and the
retriever then switches to it. Nothing is re-embedded but the new documents.

A build embeds, VQ-encodes and rebuilds the index, seconds of CPU: it runs on a thread so
the event loop keeps serving, and one at a time, since two appends from the same parent
would race for the same version name.

The route lives wherever the memory is: in embedded mode and in the retriever role it
runs the build itself; a gateway in front of a remote retriever forwards the upload there.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image

from app.errors import ApiError, DependencyUnavailable, InvalidRequest, error_from_body
from app.images import ImageLimits, decode_image, encode_png, in_decode_thread
from app.retriever.service import RetrieverService
from app.schemas import DOCUMENTS_ERRORS, DocumentsResponse

if TYPE_CHECKING:
    from retrieval.build import BuildReport

log = logging.getLogger(__name__)

MAX_DOCUMENTS = 64  # per request: a larger collection belongs to `racm3 build-index`
MAX_CAPTION_CHARS = 1000
FORWARD_TIMEOUT_S = 600.0

BundleLoader = Callable[[], Any]


@dataclass
class NewDocument:
    image: np.ndarray  # (H, W, 3) uint8, already validated
    caption: str
    filename: str  # the client's name for the image (its stem), recorded as the source


class DocumentAppender:
    """Appends documents to one memory directory and has `service` serve the result."""

    def __init__(self, service: RetrieverService, load_bundle: BundleLoader | None = None) -> None:
        self.service = service
        self.memory_dir = Path(service.settings.memory_dir)
        self._load_bundle = load_bundle or self._default_bundle
        self._bundle: Any = None
        self._lock = asyncio.Lock()

    def _default_bundle(self) -> Any:
        from model.bundle import Bundle

        s = self.service.settings
        return Bundle(s.bundle_dir, device=s.device)

    async def append(self, docs: list[NewDocument]) -> DocumentsResponse:
        async with self._lock:
            previous = self.service.snapshot().version
            start = time.perf_counter()
            try:
                report = await asyncio.to_thread(self._build, docs)
            except ValueError as exc:
                # The index builder refuses an append it cannot do (models that differ
                # from the memory's, a version published meanwhile): nothing was written.
                err = ApiError(f"documents not added, still serving {previous}: {exc}")
                err.status_code, err.error_type, err.code = 409, "conflict_error", "append_refused"
                raise err from None
            self.service.metrics.stage_latency.labels("memory_append").observe(
                time.perf_counter() - start
            )
            reloaded = await self.service.reload()
        first = report.documents - report.added
        log.info("appended %d documents: %s -> %s", report.added, previous, report.version)
        return DocumentsResponse(
            memory_version=reloaded.memory_version,
            previous_version=previous,
            documents=reloaded.documents,
            added=report.added,
            ids=list(range(first, first + report.added)),
        )

    def _build(self, docs: list[NewDocument]) -> BuildReport:
        from retrieval import publish as pub
        from retrieval.from_bundle import build_from_bundle

        if self._bundle is None:
            self._bundle = self._load_bundle()
        with tempfile.TemporaryDirectory(prefix="racm3-documents-") as tmp:
            folder = Path(tmp)
            for i, doc in enumerate(docs):
                stem = f"{i:05d}-{doc.filename}"
                Image.fromarray(doc.image).save(folder / f"{stem}.png")
                (folder / f"{stem}.txt").write_text(doc.caption, encoding="utf-8")
            try:
                return build_from_bundle(self._bundle, "folder", folder, self.memory_dir,
                                         append=True, progress=False)
            except pub.PublishError as exc:
                raise ValueError(str(exc)) from exc


def _safe_stem(filename: str) -> str:
    stem = Path(filename or "image").stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "image"


# --- the route -------------------------------------------------------------------------------


def _limits(request: Request) -> tuple[ImageLimits, int]:
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return ImageLimits(), MAX_CAPTION_CHARS
    return gateway.image_limits, gateway.settings.max_prompt_chars


async def _validated(
    request: Request, images: list[UploadFile], captions: list[str]
) -> list[NewDocument]:
    if len(images) != len(captions):
        raise InvalidRequest(
            f"got {len(images)} images and {len(captions)} captions; send one caption per "
            "image, in the same order",
            param="caption",
        )
    if len(images) > MAX_DOCUMENTS:
        raise InvalidRequest(
            f"at most {MAX_DOCUMENTS} documents per request; use `racm3 build-index --append` "
            "for a collection",
            param="image",
        )
    limits, max_chars = _limits(request)
    docs = []
    for i, (upload, caption) in enumerate(zip(images, captions, strict=True)):
        text = " ".join(caption.split())
        if not text:
            raise InvalidRequest(f"caption {i} is empty", param=f"caption.{i}")
        if len(text) > max_chars:
            raise InvalidRequest(
                f"caption {i} is {len(text)} characters; the limit is {max_chars}",
                param=f"caption.{i}",
            )
        if "\x00" in text:
            raise InvalidRequest(f"caption {i} contains a NUL character", param=f"caption.{i}")
        data = await upload.read(limits.max_bytes + 1)
        if not data:
            raise InvalidRequest(f"image {i} is empty", param=f"image.{i}", code="invalid_image")
        img = await in_decode_thread(decode_image, data, f"image.{i}", limits)
        docs.append(NewDocument(img.rgb, text, _safe_stem(upload.filename or f"image{i}")))
    return docs


async def _forward(docs: list[NewDocument], base_url: str, api_key: str | None) -> Any:
    """A gateway in front of a remote retriever: the retriever holds the memory, so the
    validated documents go there, as the same multipart request."""
    files = [("image", (f"{d.filename}.png", encode_png(d.image), "image/png")) for d in docs]
    data = {"caption": [d.caption for d in docs]}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(FORWARD_TIMEOUT_S, connect=2.0)) as c:
            answer = await c.post(f"{base_url.rstrip('/')}/admin/documents", files=files,
                                  data=data, headers=headers)
    except httpx.HTTPError as exc:
        raise DependencyUnavailable(
            f"retriever at {base_url} is unreachable ({type(exc).__name__})"
        ) from None
    if answer.status_code != 200:
        try:
            payload: Any = answer.json()
        except ValueError:
            payload = None
        raise error_from_body(answer.status_code, payload, answer.headers)
    return DocumentsResponse.model_validate_json(answer.content)


def build_documents_router(require_key: Callable[..., Any]) -> APIRouter:
    """`POST /admin/documents`: multipart `image` files with one `caption` field each."""
    router = APIRouter(dependencies=[Depends(require_key)], responses=DOCUMENTS_ERRORS)

    @router.post("/admin/documents", response_model=DocumentsResponse)
    async def add_documents(
        request: Request,
        image: Annotated[list[UploadFile], File(description="images, one per document")],
        caption: Annotated[list[str], Form(description="captions, in the images' order")],
    ) -> Any:
        docs = await _validated(request, image, caption)
        appender: DocumentAppender | None = getattr(request.app.state, "document_appender", None)
        if appender is None:
            settings = request.app.state.gateway.settings
            key = settings.api_keys[0] if settings.api_keys else None
            return await _forward(docs, settings.retriever_url, key)
        if appender.service.backend is None:
            raise DependencyUnavailable(f"retriever is not ready ({appender.service.state})")
        return await appender.append(docs)

    return router
