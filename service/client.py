"""The typed client under its first name: ``from service.client import Client`` keeps working.

The client lives in :mod:`mcdrop_client` (``deploy/client``), its own distribution without torch
or FastAPI, so that a caller of the service installs only it; these are the same objects.
"""

from mcdrop_client.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ClientError,
    DecodingError,
    InvalidRequestError,
    InvalidURLError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
    TransportError,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientError",
    "DecodingError",
    "InvalidRequestError",
    "InvalidURLError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
]
