"""What both servers (gRPC and OpenAI HTTP) share: the engine client, the tokenizer, the model's name and
limits, readiness, the bearer token and whether the server drains. One object per ingress replica;
``client`` is None until the cluster is ready."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServingState:
    model_name: str
    checkpoint: str
    tokenizer: object | None = None  # cluster.tokenizer.Tokenizer when the checkpoint has one
    client: object | None = None  # cluster.frontend_client.FrontendClient once ready
    info: dict = field(default_factory=dict)  # Frontend.model_info()
    token: object | None = None  # cluster.security.BearerToken when inference calls need one
    draining: bool = False  # shutting down: new requests are refused (UNAVAILABLE / 503)
    stopped: str | None = None  # why the cluster gave up recovering: requests are refused with it

    @property
    def ready(self) -> bool:
        return self.client is not None

    @staticmethod
    def name_of(checkpoint: str) -> str:
        """The served model's name: the checkpoint directory's name."""
        return Path(checkpoint).resolve().name


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
