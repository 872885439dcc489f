"""Dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.registry import Registry


# async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread handoff per
# dependency per request for a single attribute read.
async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def registry_and_settings(request: Request) -> tuple[Registry, Settings]:
    """The registry and settings, read from the app: the inference routes call this rather than
    declare the dependencies above, which FastAPI solves on every request (with their cache
    keys, about 50 µs of a one-row request's CPU, as much as a third of its model work)."""
    state = request.app.state
    return state.registry, state.settings


def header_lines(request: Request, name: str) -> str | None:
    """The header ``name``, its lines joined by ", " as RFC 9110 section 5.3 combines them (None
    if absent): a second line is read, not dropped, so that a length or coding sent twice is
    refused as the list it is rather than read as its first value."""
    values = request.headers.getlist(name)
    return ", ".join(values) if values else None
