"""Shared pieces of the benchmark scripts: checkpoints, workloads and the writer of docs sections."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import epserve.actors  # noqa: F401 - first, before torch allocates: the package sets torch's allocator up
import torch
from epserve.actors.model.host_memory import keep_freed_memory

keep_freed_memory()  # malloc as in the `epserve` program and the actors, before any thread starts

ROOT = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
RELIABILITY_MD = ROOT / "docs" / "reliability.md"


def checkpoint(preset: str, layout: str = "released", seed: int = 0, router_skew: float = 0.0) -> Path:
    """A random-weight checkpoint of a preset, made once under the epserve cache directory."""
    from epserve.actors.cache import cache_dir
    from epserve.cluster.fixtures.checkpoint import preset as make_preset
    from epserve.cluster.fixtures.checkpoint import write_checkpoint

    path = cache_dir() / (f"{preset}-{layout}-seed{seed}" + (f"-skew{router_skew:g}" if router_skew else ""))
    if not (path / "config.json").exists():
        print(f"making the {preset} checkpoint in {path} ...", file=sys.stderr, flush=True)
        write_checkpoint(make_preset(preset), path, seed=seed, layout=layout, progress=True, router_skew=router_skew)
    return path


def fixed_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what the code paths depend on


def machine() -> str:
    """The CPU a figure came from (model, matrix ISA and the flags the kernels choose by), torch, threads."""
    from epserve.actors.model import precision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    flags = " ".join(f for f in ISA_FLAGS if f in precision.cpu_flags()) or "none listed"
    return (f"{os.cpu_count()} cores, {cpu}, ISA {precision.cpu_isa()} (flags: {flags}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def write_section(heading: str, body: str, path: Path = PERFORMANCE_MD) -> None:
    """Replace (or append) the section ``## heading`` of a docs file (docs/performance.md unless ``path``),
    leaving its other sections as they are."""
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else f"# {path.stem.capitalize()}\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_revision() -> str:
    """The commit measured, marked when the code had changes beyond it (docs/, which the scripts write,
    does not count). ``EPSERVE_REVISION`` names it where the tree has no git metadata (a copy on another
    machine)."""
    if os.environ.get("EPSERVE_REVISION"):
        return os.environ["EPSERVE_REVISION"]
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                         ":!docs"], cwd=ROOT, text=True).strip()
        return f"{rev} with uncommitted changes" if dirty else rev
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
