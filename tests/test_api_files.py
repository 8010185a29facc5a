"""Files users run directly: the generated gRPC modules and the Serve config."""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from epserve.cluster.api import codegen
from epserve.cluster.serving.config import ServerConfig

from helpers import ROOT



def test_generated_grpc_modules_are_fresh():
    fresh = codegen.generate()
    for name, text in fresh.items():
        committed = (codegen.OUT / name).read_text()
        assert committed == text, f"cluster/api/{name} is stale: run `python -m epserve.cluster.api.codegen`"


def test_serve_config_is_valid_and_builds():
    """What ``serve run deploy/serve.yaml`` does before it deploys: validate the file, import the builder
    named by import_path, call it with the file's args; the result is the Ingress deployment bound to them."""
    import importlib

    from ray.serve import Application

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "epserve.cluster.serve_app:build_app"
    module, attr = app.import_path.split(":")
    built = getattr(importlib.import_module(module), attr)(app.args)
    assert isinstance(built, Application)
    deployment = built._bound_deployment
    config = ServerConfig.from_dict(app.args)  # every setting of the file is one the server knows
    assert deployment.name == "Ingress" and deployment.init_args == (config,)
    assert deployment._deployment_config.graceful_shutdown_timeout_s >= app.args["drain_s"]
    assert config.cluster.shards == 2 and config.grpc_port == app.args["grpc_port"] == 50051
