"""Runs blocking work on a thread pool from the event loop, in the caller's context (its request id)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


def in_thread(executor: Executor, work: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """`work(*args)` on `executor`, under a copy of the current context variables.

    `loop.run_in_executor` does not carry context variables over (`asyncio.to_thread` does,
    but only on the default pool): without them, a log line written on the thread would not
    name the call it works for.
    """
    loop = asyncio.get_running_loop()
    return loop.run_in_executor(executor, contextvars.copy_context().run, work, *args)
