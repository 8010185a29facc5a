"""Files users run directly: the generated gRPC modules and the Serve config."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from epserve.cluster.api import codegen
from epserve.cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent


def test_generated_grpc_modules_are_fresh():
    fresh = codegen.generate()
    for name, text in fresh.items():
        committed = (codegen.OUT / name).read_text()
        assert committed == text, f"cluster/api/{name} is stale: run `python -m epserve.cluster.api.codegen`"


def test_serve_config_is_valid_and_builds():
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "epserve.cluster.serve_app:build_app"
    cluster = ClusterConfig.from_dict(app.args["cluster"])
    assert cluster.shards == 2 and app.args["grpc_port"] == 50051
