"""The typed Python client of the mcdrop service, and the service's HTTP contract.

Its own distribution, ``mcdrop-client``: pydantic and httpx2, no torch, FastAPI or numpy, for
whoever only calls a service. ``mcdrop_client.schemas`` holds the request and response models.
"""

from mcdrop_client import client as _client
from mcdrop_client.client import *  # noqa: F403 (the whole client, by its names)

__all__ = _client.__all__
