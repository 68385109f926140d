"""Builds the FastAPI app for a role from its components (see `app.serve`), nothing else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from app.errors import BodyLimitMiddleware, install_error_handlers
from app.gateway import (
    api_key_checker,
    build_admin_router,
    build_health_router,
    build_ops_router,
)
from app.gateway import build_router as build_gateway_router
from app.generator.service import build_info_router as build_generator_info_router
from app.generator.service import build_router as build_generator_router
from app.metrics import RequestMetricsMiddleware
from app.retriever.documents import DocumentAppender, build_documents_router
from app.retriever.service import build_router as build_retriever_router
from app.schemas import finish_openapi
from app.serve import Components
from app.studio import build_studio_router

VERSION = "0.1.0"


def create_app(components: Components) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers at once, /readyz once loaded and warm.
        loading = asyncio.create_task(components.start())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await components.stop()

    app = FastAPI(
        title=f"racm3 {components.role}",
        version=VERSION,
        description="Retrieval-augmented CM3 (RA-CM3) inference service.",
        lifespan=lifespan,
    )
    metrics = components.metrics
    app.state.metrics = metrics
    app.state.components = components

    def count_error(error_type: str, status: int) -> None:
        metrics.errors.labels(error_type).inc()

    install_error_handlers(app, on_error=count_error)
    _document_as_served(app, components)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=components.max_body_bytes, on_error=count_error
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    require_key = api_key_checker(components.api_keys)
    app.include_router(build_health_router(components.readiness))
    if components.gateway is not None:
        app.state.gateway = components.gateway
        app.include_router(build_gateway_router(require_key))
        app.include_router(build_ops_router(require_key))
    if components.retriever is not None:
        app.state.retriever_service = components.retriever
        if components.gateway is None:
            app.include_router(build_retriever_router(require_key))
    if components.gateway is not None:
        # In embedded mode the gateway's reload reaches the in-process retriever.
        app.include_router(build_admin_router(require_key))
        app.include_router(build_studio_router())
    if components.retriever is not None:
        app.state.document_appender = DocumentAppender(components.retriever)
    if components.retriever is not None or components.gateway is not None:
        # Where the memory is, the route builds; a gateway alone forwards to the retriever.
        app.include_router(build_documents_router(require_key))
    if components.generator is not None:
        app.state.generator_service = components.generator
        if components.gateway is None:
            app.include_router(build_generator_router(require_key))
            app.include_router(build_generator_info_router())
    return app


def _document_as_served(app: FastAPI, components: Components) -> None:
    """/openapi.json with this server's error shape and the limits it enforces (`max_k`
    as the decoder's window allows, once the generator has said)."""
    generate = app.openapi
    gateway = components.gateway

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        if gateway is None:
            app.openapi_schema = finish_openapi(generate(), {})
            return app.openapi_schema
        limits = {**gateway.settings.model_dump(), **gateway.limits()}
        document = finish_openapi(generate(), limits)
        # kept once final; until the generator has said, made afresh at each call
        app.openapi_schema = document if gateway.window() else None
        return document

    app.openapi = openapi  # type: ignore[method-assign]
