"""The import path that Serve configs name (``epserve.cluster.serve_app:build_app`` in deploy/serve.yaml and
the Helm chart's serveConfigV2): the application itself is cluster/serving/app.py."""

from .serving.app import build_app

__all__ = ["build_app"]
