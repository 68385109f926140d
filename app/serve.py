"""Roles and how they are served.

- `embedded` (the default): gateway + retriever + generator in one process, wired with
  in-process clients; an in-process LRU cache unless RACM3_REDIS_URL is set.
- `gateway`, `retriever`, `generator`: one role per process, the gateway reaching the
  others over HTTP (RACM3_RETRIEVER_URL, RACM3_GENERATOR_URLS).

`build_components` wires a role; `create_role_app` turns it into a FastAPI app;
`serve` runs it under uvicorn. Tests pass their own engine/backend factories.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.clients import (
    HttpGeneratorClient,
    HttpRetrieverClient,
    InProcessGeneratorClient,
    InProcessRetrieverClient,
)
from app.gateway import Gateway
from app.generator.service import EngineFactory, GeneratorService
from app.memories import MemoryAccess, bare_key
from app.metrics import Metrics
from app.retriever.service import BackendFactory, RetrieverService
from app.schemas import ReadyResponse
from app.settings import (
    ROLES,
    GatewaySettings,
    GeneratorSettings,
    RetrieverSettings,
    get_gateway_settings,
    get_generator_settings,
    get_retriever_settings,
)
from retrieval.publish import list_versions

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"embedded": 8000, "gateway": 8000, "retriever": 8001, "generator": 8002}
INTERNAL_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Components:
    role: str
    metrics: Metrics
    api_keys: list[str]
    max_body_bytes: int
    retriever: RetrieverService | None = None
    generator: GeneratorService | None = None
    gateway: Gateway | None = None
    _closers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        # Retriever and generator load concurrently (each on its own thread).
        await asyncio.gather(
            *(s.start() for s in (self.retriever, self.generator) if s is not None)
        )
        if self.gateway is not None and self.generator is not None:
            await self.gateway.generator_info()  # the window's limits, for the first request

    async def stop(self) -> None:
        for service in (self.retriever, self.generator):
            if service is not None:
                await service.stop()
        for close in self._closers:
            await close()

    async def readiness(self) -> ReadyResponse:
        if self.gateway is not None:
            parts = await asyncio.gather(
                self.gateway.retriever.readiness(), self.gateway.generator.readiness()
            )
            names = ("retriever", "generator")
        else:
            services = [s for s in (self.retriever, self.generator) if s is not None]
            parts = [
                ReadyResponse(
                    status="ready" if s.ready else "not_ready", checks=await s.checks()
                )
                for s in services
            ]
            names = tuple(type(s).__name__ for s in services)
        checks: dict[str, str] = {}
        for name, part in zip(names, parts, strict=True):
            for key, value in part.checks.items():
                checks[key if self.gateway is None else f"{name}.{key}"] = value
        if any(p.status == "not_ready" for p in parts):
            status = "not_ready"
        elif any(p.status == "degraded" for p in parts) or any(
            v.startswith("degraded") for v in checks.values()
        ):
            status = "degraded"
        else:
            status = "ready"
        return ReadyResponse(status=status, checks=checks)


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _bundle(path: str, device: str) -> Any:
    from model.bundle import Bundle

    return Bundle(path, device=device)


def default_engine_factory(settings: GeneratorSettings) -> Any:
    """The real engine from a bundle; CUDA (bf16 inside the engine) when present."""
    import torch  # heavy imports stay out of `racm3 --help`

    from model.engine import Engine

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # One lock for both factories: in embedded mode they load on two threads at once,
    # and the retriever then reuses the CLIP the engine loaded (same bundle, same device).
    with _LOAD_LOCK:
        return Engine.from_bundle(_bundle(str(settings.bundle_dir), device),
                                  fast=fast_decode_options(settings, device))


def fast_decode_options(settings: GeneratorSettings, device: str = "cpu") -> Any:
    """The engine's decoding fast path as the settings ask, with the batch shapes the
    worker will run compiled at warm-up: up to `max_batch_size` text-to-image jobs of
    one candidate with guidance, at the prompt lengths of 0, 1 and 2 documents."""
    from model.fast_decode import FastDecodeOptions, default_warmup_shapes

    return FastDecodeOptions(
        enabled=(str(device).startswith("cuda") if settings.fast_decode is None
                 else settings.fast_decode),
        prefix_cache_bytes=settings.prefix_cache_bytes,
        compile=settings.decode_compile,
        warmup_shapes=default_warmup_shapes(settings.max_batch_size),
    )


def default_backend_factory(settings: RetrieverSettings) -> Any:
    """The real retriever: CLIP from the bundle plus the published memory."""
    from app.retriever.service import CoreRetrieverBackend

    with _LOAD_LOCK:
        bundle = _bundle(str(settings.bundle_dir), settings.device)
        clip, vq = bundle.clip, bundle.vq if bundle.has("vq") else None
    return CoreRetrieverBackend.load(settings, clip, vq)


def _has_component(bundle: Path, name: str) -> bool:
    if name == "tokenizer":
        return (bundle / "tokenizer.json").is_file()
    return (bundle / f"{name}.safetensors").is_file()


def preflight(role: str) -> None:
    """Refuse to start, with the command that fixes it, when the bundle or memory is missing.

    Without this a missing memory only shows as a `/readyz` that never turns ready.
    """
    problems: list[str] = []
    needed: dict[Path, set[str]] = {}  # bundle -> the components this role loads from it
    if role in ("embedded", "retriever"):
        rs = get_retriever_settings()
        needed.setdefault(rs.bundle_dir, set()).add("clip")
        default_name, default_dir = rs.named_memories[0]
        # A CURRENT that is damaged, or missing beside published versions, is recovered
        # at start-up (the retriever serves the newest valid version and says so).
        if not (default_dir / "CURRENT").is_file() and not list_versions(default_dir):
            problems.append(
                f"no memory at {default_dir}/ (it has no CURRENT file). Build it with:\n"
                f"    racm3 build-index --source world --input memory --out {default_dir} "
                f"--bundle {rs.bundle_dir}\n"
                "  (`make serve` does this for you), or set RACM3_MEMORY_DIR (or "
                "RACM3_MEMORIES) to a built memory."
            )
    if role in ("embedded", "generator"):
        needed.setdefault(get_generator_settings().bundle_dir, set()).update(
            ("ra_cm3", "vq", "clip", "tokenizer"))
    for bundle, components in needed.items():
        if not (bundle / "manifest.json").is_file():
            problems.append(
                f"no model bundle at {bundle}/ (it has no manifest.json). Train one with:\n"
                f"    racm3 train all --recipe demo --out {bundle}\n"
                "  or set RACM3_BUNDLE_DIR to a trained bundle."
            )
            continue
        missing = sorted(c for c in components if not _has_component(bundle, c))
        if missing:
            problems.append(
                f"the bundle at {bundle}/ lacks {', '.join(missing)} (is training still "
                f"running?). `racm3 train all --recipe demo --out {bundle}` resumes it."
            )
    if problems:
        raise SystemExit(f"racm3 serve --role {role}: cannot start.\n- " + "\n- ".join(problems))


def build_components(
    role: str = "embedded",
    *,
    gateway_settings: GatewaySettings | None = None,
    retriever_settings: RetrieverSettings | None = None,
    generator_settings: GeneratorSettings | None = None,
    engine_factory: EngineFactory | None = None,
    backend_factory: BackendFactory | None = None,
) -> Components:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    metrics = Metrics()
    retriever = generator = gateway = None
    closers: list[Any] = []
    if role in ("embedded", "retriever"):
        rs = retriever_settings or get_retriever_settings()
        retriever = RetrieverService(rs, backend_factory or default_backend_factory, metrics)
    if role in ("embedded", "generator"):
        gs = generator_settings or get_generator_settings()
        generator = GeneratorService(gs, engine_factory or default_engine_factory, metrics)
    if role in ("embedded", "gateway"):
        ws = gateway_settings or get_gateway_settings()
        if role == "embedded":
            assert retriever is not None and generator is not None
            rc: Any = InProcessRetrieverClient(retriever)
            gc: Any = InProcessGeneratorClient(generator)
        else:
            key = bare_key(ws.api_keys[0]) if ws.api_keys else None
            rc = HttpRetrieverClient(ws.retriever_url, ws.request_timeout_s, key)
            gc = HttpGeneratorClient(ws.generator_urls, ws.request_timeout_s + 5, key,
                                     retry_after_s=ws.retry_after_s)
            closers += [rc.close, gc.close]
        # The gateway announces each job before retrieving for it: the generator's batcher
        # (embedded) or the HTTP client (multi-service) admits it or answers 429.
        announce = generator.batcher.expecting if generator is not None else gc.expecting
        access = MemoryAccess([name for name, _ in ws.named_memories])
        gateway = Gateway(ws, rc, gc, metrics, role=role, announce=announce, access=access)
    api_keys = (gateway_settings or retriever_settings or generator_settings or _any(role)).api_keys
    max_body = gateway.settings.max_body_bytes if gateway is not None else INTERNAL_MAX_BODY_BYTES
    return Components(
        role=role,
        metrics=metrics,
        api_keys=list(api_keys),
        max_body_bytes=max_body,
        retriever=retriever,
        generator=generator,
        gateway=gateway,
        _closers=closers,
    )


def _any(role: str) -> Any:
    if role == "retriever":
        return get_retriever_settings()
    if role == "generator":
        return get_generator_settings()
    return get_gateway_settings()


def create_role_app(role: str = "embedded", **kwargs: Any) -> FastAPI:
    from app.main import create_app

    return create_app(build_components(role, **kwargs))


def serve(role: str = "embedded", host: str = "127.0.0.1", port: int | None = None,
          **kwargs: Any) -> None:
    import uvicorn

    logging.basicConfig(
        level=_any(role).log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if "engine_factory" not in kwargs and "backend_factory" not in kwargs:
        preflight(role)
    app = create_role_app(role, **kwargs)
    uvicorn.run(
        app,
        host=host,
        port=port or DEFAULT_PORTS[role],
        log_level=_any(role).log_level.lower(),
        # Our own JSON errors and limits; uvicorn's access log stays on for operators.
        timeout_graceful_shutdown=10,
    )
