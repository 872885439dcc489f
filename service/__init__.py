"""The mcdrop REST service, its typed client and the ``mcdrop`` command.

Importing this package loads nothing heavy: ``service.client`` needs neither torch nor FastAPI.
"""
