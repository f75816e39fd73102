"""edged: an on-device LLM router daemon.

A zoo of ONNX LLMs, a MESS+ router that picks the cheapest model likely to satisfy each request,
measured joules per request, a ZeroMQ + msgpack service under systemd.

The client is re-exported here; the parts live in `edged.zoo`, `edged.router`, `edged.energy`,
`edged.server` and `edged.replay`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edged.client import AsyncClient, Client, ClientError, RemoteError, RequestTimeout

_CLIENT = frozenset({"AsyncClient", "Client", "ClientError", "RemoteError", "RequestTimeout"})

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "RemoteError",
    "RequestTimeout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """The client names load `edged.client` (pyzmq, msgpack, asyncio) on first use, so that
    `import edged.zoo` for a local-only zoo does not pay for them (~16 MB of RSS)."""
    if name in _CLIENT:
        from edged import client

        return getattr(client, name)
    raise AttributeError(f"module 'edged' has no attribute {name!r}")
