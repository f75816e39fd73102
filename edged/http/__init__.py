"""OpenAI-compatible HTTP front, Prometheus /metrics and a live status page (`edged http`).

An optional part (the `http` extra: Starlette, uvicorn, prometheus_client): a separate process
that is a client of the daemon's socket, so the ZeroMQ daemon needs none of it. docs/http.md.
"""

from edged.http.app import HttpConfig, create_app
from edged.http.openai import HttpError
from edged.http.server import HttpConfigError, serve

__all__ = ["HttpConfig", "HttpConfigError", "HttpError", "create_app", "serve"]
