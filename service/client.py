"""The typed client under its first name: ``from service.client import Client`` keeps working.

The client lives in :mod:`mcdrop_client` (``deploy/client``), its own distribution without torch
or FastAPI, so that a caller of the service installs only it; these are the same objects.
"""

from mcdrop_client import client as _client
from mcdrop_client.client import *  # noqa: F403 (the whole client, by its names)

__all__ = _client.__all__
