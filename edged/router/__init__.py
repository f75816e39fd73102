"""MESS+ routing: pure decisions, an online satisfaction predictor, virtual queues, state file."""

from edged.router.config import RouterConfig, RouterConfigError
from edged.router.predictor import Features, Predictor
from edged.router.router import Decision, Router, RouterError
from edged.router.state import StateError

__all__ = [
    "Decision",
    "Features",
    "Predictor",
    "Router",
    "RouterConfig",
    "RouterConfigError",
    "RouterError",
    "StateError",
]
