"""edged: an on-device LLM router daemon.

A zoo of ONNX LLMs, a MESS+ router that picks the cheapest model likely to satisfy each request,
measured joules per request, a ZeroMQ + msgpack service under systemd.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
