"""The typed Python client of the mcdrop service, and the service's HTTP contract.

Its own distribution, ``mcdrop-client``: pydantic and httpx2, no torch, FastAPI or numpy, for
whoever only calls a service. ``mcdrop_client.schemas`` holds the request and response models.
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
