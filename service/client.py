"""Typed Python client of the mcdrop service, sync and async, on httpx2.

Importing it loads neither torch nor FastAPI. Errors::

    ClientError                 base
    ├── InvalidRequestError     refused before sending (e.g. NaN, which JSON cannot carry)
    ├── TransportError          the service could not be reached
    └── APIError                the service answered with an error (status_code, code, message)
        ├── BadRequestError         400 / 422: inputs or options to fix
        ├── NotFoundError           404
        ├── PayloadTooLargeError    413
        ├── ServiceUnavailableError 503: model still loading
        └── ServerError             5xx

Example::

    with Client("http://localhost:8000") as mc:
        result = mc.uncertainty("digits", rows, n_samples=100, seed=7)
        print(result.results[0].mutual_information)

Tests can pass a ``starlette.testclient.TestClient`` (an ``httpx2.Client``) as ``http=`` to talk
to an app in process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self, TypeVar

import httpx2
from pydantic import BaseModel

from service.schemas import (
    Health,
    ModelInfo,
    ModelList,
    PredictResponse,
    Readiness,
    UncertaintyResponse,
)

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 60.0

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ClientError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
]

T = TypeVar("T", bound=BaseModel)


class ClientError(Exception):
    """Base of the client's errors."""


class InvalidRequestError(ClientError, ValueError):
    """The request cannot be sent as JSON (NaN or infinite numbers, non-numbers)."""


class TransportError(ClientError):
    """The request did not get an HTTP answer (connection refused, timeout, ...)."""


class APIError(ClientError):
    """The service answered with an error status; ``message`` is the server's explanation."""

    def __init__(self, status_code: int, code: str, message: str, details: list[Any]) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details


class BadRequestError(APIError):
    """400/422: the request needs fixing (the message says what)."""


class NotFoundError(APIError):
    """404: no such model (or path)."""


class PayloadTooLargeError(APIError):
    """413: the body is above the server's size limit."""


class ServiceUnavailableError(APIError):
    """503: the model is still loading (retry) or failed to load."""


class ServerError(APIError):
    """5xx: the server failed."""


def _error(response: httpx2.Response) -> APIError:
    try:
        body = response.json()["error"]
        code, message, details = body["code"], body["message"], body.get("details", [])
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500], []
    status = response.status_code
    kind: type[APIError]
    if status in (400, 422):
        kind = BadRequestError
    elif status == 404:
        kind = NotFoundError
    elif status == 413:
        kind = PayloadTooLargeError
    elif status == 503:
        kind = ServiceUnavailableError
    elif status >= 500:
        kind = ServerError
    else:
        kind = APIError
    return kind(status, code, message, details)


def _parse(response: httpx2.Response, model: type[T], ok: Sequence[int] = (200,)) -> T:
    if response.status_code not in ok:
        raise _error(response)
    return model.model_validate_json(response.content)


def _uncertainty_body(
    inputs: Sequence[Any],
    n_samples: int | None,
    seed: int | None,
    level: float,
    return_samples: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(inputs), "level": level}
    if n_samples is not None:
        body["n_samples"] = n_samples
    if seed is not None:
        body["seed"] = seed
    if return_samples:
        body["return_samples"] = True
    return body


class Client:
    """Blocking client.

    Args:
        base_url: where the service runs.
        timeout: seconds per request.
        http: an existing ``httpx2.Client`` to use instead (e.g. Starlette's TestClient).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        http: httpx2.Client | None = None,
    ) -> None:
        self._owns = http is None
        self._http = http or httpx2.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx2.TransportError as exc:
            raise TransportError(f"cannot reach the mcdrop service: {exc}") from exc
        except (ValueError, TypeError) as exc:  # json encoding of NaN/inf or non-numbers
            raise InvalidRequestError(f"cannot encode the request as JSON: {exc}") from exc

    def health(self) -> Health:
        return _parse(self._request("GET", "/health"), Health)

    def ready(self) -> Readiness:
        """Readiness (does not raise on 503: look at ``status``)."""
        return _parse(self._request("GET", "/ready"), Readiness, ok=(200, 503))

    def models(self) -> list[ModelInfo]:
        return _parse(self._request("GET", "/models"), ModelList).models

    def model(self, name: str) -> ModelInfo:
        return _parse(self._request("GET", f"/models/{name}"), ModelInfo)

    def predict(self, name: str, inputs: Sequence[Any]) -> PredictResponse:
        """Deterministic prediction of rows ``inputs``."""
        response = self._request("POST", f"/models/{name}/predict", json={"inputs": list(inputs)})
        return _parse(response, PredictResponse)

    def uncertainty(
        self,
        name: str,
        inputs: Sequence[Any],
        *,
        n_samples: int | None = None,
        seed: int | None = None,
        level: float = 0.95,
        return_samples: bool = False,
    ) -> UncertaintyResponse:
        """MC-dropout uncertainty of rows ``inputs``."""
        body = _uncertainty_body(inputs, n_samples, seed, level, return_samples)
        return _parse(
            self._request("POST", f"/models/{name}/uncertainty", json=body), UncertaintyResponse
        )


class AsyncClient:
    """Asynchronous client; same methods as :class:`Client`, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        self._owns = http is None
        self._http = http or httpx2.AsyncClient(base_url=base_url, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx2.TransportError as exc:
            raise TransportError(f"cannot reach the mcdrop service: {exc}") from exc
        except (ValueError, TypeError) as exc:  # json encoding of NaN/inf or non-numbers
            raise InvalidRequestError(f"cannot encode the request as JSON: {exc}") from exc

    async def health(self) -> Health:
        return _parse(await self._request("GET", "/health"), Health)

    async def ready(self) -> Readiness:
        return _parse(await self._request("GET", "/ready"), Readiness, ok=(200, 503))

    async def models(self) -> list[ModelInfo]:
        return _parse(await self._request("GET", "/models"), ModelList).models

    async def model(self, name: str) -> ModelInfo:
        return _parse(await self._request("GET", f"/models/{name}"), ModelInfo)

    async def predict(self, name: str, inputs: Sequence[Any]) -> PredictResponse:
        response = await self._request(
            "POST", f"/models/{name}/predict", json={"inputs": list(inputs)}
        )
        return _parse(response, PredictResponse)

    async def uncertainty(
        self,
        name: str,
        inputs: Sequence[Any],
        *,
        n_samples: int | None = None,
        seed: int | None = None,
        level: float = 0.95,
        return_samples: bool = False,
    ) -> UncertaintyResponse:
        body = _uncertainty_body(inputs, n_samples, seed, level, return_samples)
        return _parse(
            await self._request("POST", f"/models/{name}/uncertainty", json=body),
            UncertaintyResponse,
        )
