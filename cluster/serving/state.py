"""What both servers (gRPC and OpenAI HTTP) serve from: one object per ingress replica, written by the
replica as the cluster starts, recovers and drains (cluster/serving/app.py), read by every request."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from epserve.actors.model_info import ModelInfo

from . import statuses
from .frontend_client import FrontendClient
from .security import BearerToken
from .statuses import Status
from .tokenizer import Tokenizer


@dataclass
class ServingState:
    model_name: str
    tokenizer: Tokenizer | None = None  # None: the checkpoint has none (token ids in and out only)
    token: BearerToken | None = None  # when set, every inference call must carry it
    client: FrontendClient | None = None  # while the cluster serves; None while it starts or recovers
    info: ModelInfo | None = None  # the served model, once the cluster has started
    draining: bool = False  # shutting down: new requests are refused
    stopped: str | None = None  # why the cluster gave up recovering: requests are refused with it
    created: int = field(default_factory=lambda: int(time.time()))  # the OpenAI model card's "created"

    @property
    def ready(self) -> bool:
        return self.client is not None

    def refusal(self, new_request: bool = True) -> tuple[Status, str] | None:
        """Why no request can be served now (and its status), or None. Draining refuses new requests only:
        the model can still be described."""
        if self.draining and new_request:
            return statuses.UNAVAILABLE, "the server is shutting down: retry elsewhere or later"
        if self.stopped:
            return statuses.STOPPED, f"the cluster stopped serving: {self.stopped}"
        if self.client is None or self.info is None:
            return statuses.NOT_READY, "the cluster is starting or recovering: retry shortly"
        return None


def model_name_of(checkpoint: str) -> str:
    """The served model's default name: the checkpoint directory's name."""
    return Path(checkpoint).resolve().name


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
