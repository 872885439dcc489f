"""The HTTP contract under its first name: the models of :mod:`mcdrop_client.schemas`.

The contract ships with the client's own distribution (``deploy/client``), which this one depends
on at the same version, so the service and every client parse one definition.
"""

from mcdrop_client import schemas as _contract
from mcdrop_client.schemas import *  # noqa: F403 (the whole contract, by its names)

__all__ = _contract.__all__
