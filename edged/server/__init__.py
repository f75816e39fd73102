"""The edged daemon: a ZeroMQ ROUTER socket in front of the zoo, the router and the meters."""

from edged.server.app import Overrides, Server, StartupError
from edged.server.sdnotify import Notifier
from edged.server.security import SecurityError

__all__ = ["Notifier", "Overrides", "SecurityError", "Server", "StartupError"]
