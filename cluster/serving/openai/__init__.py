"""The OpenAI-compatible HTTP API: request models (requests.py), routes (routes.py), response bodies
(responses.py) and OpenAI's error shape (errors.py)."""

from .routes import install, router

__all__ = ["install", "router"]
