"""The named parts of a service (its long-running tasks): each one's state, and one rule.

A part that raises, or returns although it should run until cancelled, stops the whole service with
`PartFailed`, which names the part: the composition root logs that and exits non-zero, so systemd or
the operator restarts the process. A service is never left running with one of its parts dead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any

from relaybeat.errors import RelaybeatError


class PartState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"  # set by the service's health view, never by `Parts` itself
    FAILED = "failed"
    STOPPED = "stopped"  # cancelled: the service is shutting down


class PartFailed(RelaybeatError):
    """A part of a service ended unexpectedly; `cause` is its exception (None: it returned)."""

    def __init__(self, service: str, part: str, cause: BaseException | None) -> None:
        self.service = service
        self.part = part
        self.cause = cause
        why = "returned although it should run until stopped" if cause is None else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{service}: part {part!r} failed: {why}")


class Parts:
    """Runs a service's parts in one task group, each an asyncio task named `service:part`."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.states: dict[str, PartState] = {}

    async def run(self, parts: dict[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
        """Until cancelled, or until the first part fails: then the others are cancelled and
        `PartFailed` is raised for that part."""
        self.states = dict.fromkeys(parts, PartState.STARTING)
        try:
            async with asyncio.TaskGroup() as tasks:
                for name, part in parts.items():
                    tasks.create_task(self._watch(name, part), name=f"{self.service}:{name}")
        except* PartFailed as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first  # noqa: B904 (its cause is already the part's exception)

    async def _watch(self, name: str, part: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.states[name] = PartState.RUNNING
        try:
            await part()
        except asyncio.CancelledError:
            self.states[name] = PartState.STOPPED
            raise
        except Exception as exc:
            self.states[name] = PartState.FAILED
            raise PartFailed(self.service, name, exc) from exc
        self.states[name] = PartState.FAILED
        raise PartFailed(self.service, name, None)
