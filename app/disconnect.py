"""Requests whose HTTP client went away: their work is cancelled, not finished for nobody."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from app.errors import ApiError

T = TypeVar("T")


class ClientDisconnected(ApiError):
    """The client went away; nobody reads this response (nginx's 499 convention)."""

    status_code = 499
    error_type = "client_closed_request"
    default_code = "client_disconnected"


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by now, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the HTTP client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected("client disconnected; job cancelled")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
