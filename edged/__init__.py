"""edged: an on-device LLM router daemon.

A zoo of ONNX LLMs, a MESS+ router that picks the cheapest model likely to satisfy each request,
measured joules per request, a ZeroMQ + msgpack service under systemd.

The client is re-exported here; the parts live in `edged.zoo`, `edged.router`, `edged.energy`,
`edged.server` and `edged.replay`.
"""

from edged.client import AsyncClient, Client, ClientError, RemoteError, RequestTimeout

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "RemoteError",
    "RequestTimeout",
    "__version__",
]
