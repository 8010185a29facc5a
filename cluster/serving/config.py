"""The server's settings: one dataclass with the cluster's settings inside, parsed once where settings come in
(``epserve serve``'s options; the application args of deploy/serve.yaml and of the Helm chart's serveConfigV2,
through ``build_app``). Each default is written here, and a setting this server does not know is refused with
a one-line error that names it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import ClusterConfig, known_fields
from .security import BearerToken, TLSFiles


@dataclass
class ServerConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model_name: str | None = None  # the OpenAI model name; None: the checkpoint directory's name
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # Prometheus: the whole cluster as one scrape target on its own port (None: none; 0: any free port);
    # /metrics on the HTTP port either way
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    drain_s: float = 30.0  # on shutdown, requests in flight may run on this long (then UNAVAILABLE / 503)
    # A request whose front-end is lost moves to another (frontend_client.py) at most this often; one more
    # loss ends it with UNAVAILABLE / 503. 0: it ends with the first
    max_migrations: int = 3
    tls_cert_file: str | None = None  # PEM files: gRPC over TLS (Serve's HTTP proxy takes the same files)
    tls_key_file: str | None = None
    # Where the bearer token is (never the token itself: Ray stores and shows these settings): a file on the
    # ingress replica's node, or an environment variable of the replica. Neither: no authentication
    auth_token_file: str | None = None
    auth_token_env: str | None = None

    def __post_init__(self):
        if isinstance(self.cluster, dict):
            self.cluster = ClusterConfig.from_dict(self.cluster)
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
                raise ValueError(f"{name} must be a port number (0 to 65535), got {port!r}")
        if isinstance(self.drain_s, bool) or not isinstance(self.drain_s, (int, float)) or self.drain_s < 0:
            raise ValueError(f"drain_s must be a number of seconds >= 0, got {self.drain_s!r}")
        if isinstance(self.max_migrations, bool) or not isinstance(self.max_migrations, int) or \
                self.max_migrations < 0:
            raise ValueError(f"max_migrations must be an integer >= 0, got {self.max_migrations!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if self.auth_token_file and self.auth_token_env:
            raise ValueError("give the auth token as a file or as an environment variable, not both")

    @classmethod
    def from_dict(cls, data: dict | None) -> ServerConfig:
        return cls(**known_fields(cls, data or {}, "server settings"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tls(self) -> TLSFiles | None:
        return TLSFiles(self.tls_cert_file, self.tls_key_file) if self.tls_cert_file else None

    @property
    def needs_token(self) -> bool:
        return bool(self.auth_token_file or self.auth_token_env)

    def bearer_token(self) -> BearerToken | None:
        """The token, read from where the settings say (None: no authentication); an error if it is missing."""
        return BearerToken.load(self.auth_token_file, self.auth_token_env)

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
