"""A CPU process keeps the memory it frees (actors/model/host_memory.py): on a thread other than the main one (as an
actor's engine runs), a step's large tensor comes from the process's one heap, which is never trimmed, not from
a mapping of its own that goes back to the kernel when the tensor is freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from epserve.actors.model.host_memory import KEEP_FREED_MEMORY, actor_env

# Allocates 64 MB on a new thread and prints whether it lies in the heap (``[heap]`` in /proc/self/maps: the
# memory brk grows, kept); with argv[1] == "keep", after keep_freed_memory().
STEP = """
import json, sys, threading
from epserve.actors.model.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
where = []
def step():
    at = torch.empty(16 << 20).data_ptr()
    heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
    where.append(any(int(lo, 16) <= at < int(hi, 16) for lo, hi in (r.split("-") for r in heap)))
thread = threading.Thread(target=step)
thread.start()
thread.join()
print(json.dumps({"kept": kept, "in_heap": where[0]}))
"""


def large_step(how: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    out = subprocess.run([sys.executable, "-c", STEP, how], env=environ, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_large_tensor_comes_from_the_kept_heap():
    assert large_step("default") == {"kept": None, "in_heap": False}  # glibc's default: a mapping of its own
    assert large_step("keep") == {"kept": True, "in_heap": True}
    assert large_step("default", GLIBC_TUNABLES=KEEP_FREED_MEMORY)["in_heap"]  # an actor's way in


def test_actors_keep_freed_memory_on_cpus_unless_told(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert actor_env(use_gpu=False) == {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}
    assert actor_env(use_gpu=True) == {}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # the operator's word stands
    assert actor_env(use_gpu=False) == {}


GIVE_BACK = """
import json, threading
from epserve.actors.model import host_memory
host_memory.keep_freed_memory()
import torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def step():
    torch.ones(256 << 20)  # 1 GB, touched and freed
thread = threading.Thread(target=step)
thread.start()
thread.join()
kept = rss()
host_memory.give_back_freed_memory()
print(json.dumps({"kept": kept, "after": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_goes_back_to_the_kernel_when_asked():
    """A process that drops an engine and starts another process (a benchmark: vLLM's server after our
    in-process engine) hands the kept blocks back."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], env=environ, capture_output=True, text=True,
                         timeout=120, check=True)
    rss = json.loads(out.stdout)
    assert rss["kept"] - rss["after"] > 0.8 * (1 << 30), rss
