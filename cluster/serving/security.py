"""Optional transport security and authentication of the inference APIs.

* TLS: a certificate (chain) and its private key, PEM files. The gRPC endpoint listens with
  ``grpc.ssl_server_credentials``; Serve's HTTP proxy serves HTTPS from the same files (its ``http_options``
  ``ssl_certfile`` / ``ssl_keyfile``).
* A bearer token: one shared secret that every inference call carries (``authorization: Bearer <token>``,
  gRPC metadata or HTTP header); health checks stay open. The ingress replica reads it from a file or from
  one of its environment variables: never from a command-line value (``ps`` shows those) nor from the Serve
  config (Ray stores and shows that), so the settings only say where it is. It is never logged.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "EPSERVE_AUTH_TOKEN"  # where `epserve serve` and `epserve client` look when no file is given


@dataclass(frozen=True)
class TLSFiles:
    cert_file: str
    key_file: str

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())])

    def http_options(self) -> dict:
        """The same files for Serve's HTTP proxy."""
        return {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}


class BearerToken:
    """The shared secret; ``accepts`` compares in constant time. Its repr never shows it."""

    def __init__(self, token: str):
        token = token.strip()
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("the auth token must be non-empty printable text without spaces")
        self._token = token.encode()

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, value = (authorization or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(errors="replace"),
                                                                  self._token)

    @classmethod
    def load(cls, path: str | None = None, env: str | None = None) -> BearerToken | None:
        """The token in the file ``path`` or the environment variable ``env``; None when neither is given (no
        auth)."""
        token = load_token(path, env)
        return cls(token) if token is not None else None


def load_token(path: str | None = None, env: str | None = None) -> str | None:
    """The token in the file ``path`` or the environment variable ``env`` (None when neither is given). A
    source that is given but missing or empty is an error: auth fails closed."""
    if path and env:
        raise ValueError("give the auth token as a file or as an environment variable, not both")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the auth token file {path}: {e.strerror}") from None
        if not token:
            raise ValueError(f"the auth token file {path} is empty")
        return token
    if env:
        if not os.environ.get(env, "").strip():
            raise ValueError(f"the auth token variable {env} is not set in this process's environment")
        return os.environ[env].strip()
    return None
