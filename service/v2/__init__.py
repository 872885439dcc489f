"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API) over mcdrop's models:
:mod:`~service.v2.routes` (endpoints), :mod:`~service.v2.codec` (tensors on the wire),
:mod:`~service.v2.outputs` (the named output tensors), :mod:`~service.v2.schemas` (JSON)."""
