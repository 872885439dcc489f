"""The response header that names the replica which computed an answer: a Ray Serve replica
(:mod:`service.ray_app`) or a worker process of ``mcdrop serve --workers N``
(:func:`service.server.worker_app`). A seeded answer is the same from every replica; the header
says which one to look at in its logs and metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: The response header that names the replica which computed the answer.
REPLICA_HEADER = "x-mcdrop-replica"

Message = MutableMapping[str, Any]


class ReplicaHeader:
    """ASGI middleware: adds ``x-mcdrop-replica: <replica id>`` to every HTTP response."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Any
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)
