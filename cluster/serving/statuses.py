"""How a refused request reads in each API: one table of the gRPC status code, the HTTP status and OpenAI's
error type for every kind of refusal, and ``of(exception)`` to find the kind of an exception from the
validation layer, the engine or the client."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from epserve.actors.engine.sampling import Overloaded, RequestError

from .frontend_client import Draining


@dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int
    type: str  # OpenAI's error type
    code: str | None = None  # OpenAI's error code


INVALID = Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
UNAUTHENTICATED = Status(grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key")
TOO_LARGE = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error", "request_too_large")
OVERLOADED = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "server_overloaded")
UNAVAILABLE = Status(grpc.StatusCode.UNAVAILABLE, 503, "server_error", "server_unavailable")  # draining
NOT_READY = Status(grpc.StatusCode.UNAVAILABLE, 503, "server_error", "model_not_ready")  # starting, recovering
STOPPED = Status(grpc.StatusCode.UNAVAILABLE, 503, "server_error", "cluster_stopped")  # recovery gave up

_BY_EXCEPTION = ((RequestError, INVALID), (Overloaded, OVERLOADED), (Draining, UNAVAILABLE))


def of(e: BaseException) -> Status | None:
    """The status of a refusal (a RequestError, Overloaded or Draining); None for any other exception."""
    return next((status for kind, status in _BY_EXCEPTION if isinstance(e, kind)), None)
